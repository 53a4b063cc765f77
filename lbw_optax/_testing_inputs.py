"""The inputs and the sequence runner of :mod:`lbw_optax.testing` (re-exported there)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------------------------------------
# Inputs.


def example_params(dtype=jnp.float32) -> dict[str, Any]:
    """A small tree: a (4, 6) matrix under ``dense/kernel``, a (6,) ``bias`` and a (1,) ``gain``."""
    return {
        "dense": {"kernel": jnp.linspace(-1.0, 1.0, 24, dtype=dtype).reshape(4, 6)},
        "bias": jnp.full((6,), 0.1, dtype),
        "gain": jnp.ones((1,), dtype),
    }


def example_grads(params, step: int, *, spike: float = 1.0):
    """Deterministic, step-dependent gradients shaped like ``params`` (``spike`` times larger)."""
    phase = jnp.float32(step)
    return jax.tree.map(
        lambda p: (
            spike * (jnp.sin(phase + jnp.arange(p.size, dtype=jnp.float32)) + 0.3).reshape(p.shape)
        ).astype(p.dtype),
        params,
    )


def example_loss(step: int, *, spike: float = 1.0) -> jax.Array:
    """A slowly falling float32 loss, ``spike`` times larger."""
    return jnp.float32(spike * (2.0 + 1.0 / (1.0 + step)))


def scaled(tree, factors) -> Any:
    """A sequence of gradients: ``tree`` times each of ``factors``, stacked on a leading axis
    (NaN and Inf factors give NaN and Inf gradients)."""
    factors = jnp.asarray(factors, jnp.float32)
    return jax.tree.map(
        lambda x: (factors.reshape((-1,) + (1,) * x.ndim) * x.astype(jnp.float32)).astype(x.dtype),
        tree,
    )


def _extra_args(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(tx)


def _leaves_all_zero(tree) -> bool:
    return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def _assert_tree_finite(tree, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            raise AssertionError(f"{what}: non-finite values at {jax.tree_util.keystr(path)}")


def _assert_trees_equal(got, want, what: str, rtol: float = 0.0, atol: float = 0.0) -> None:
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    if got_def != want_def:
        raise AssertionError(f"{what}: tree structures differ: {got_def} != {want_def}")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if rtol == 0.0 and atol == 0.0:
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: leaf {i}")
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what}: leaf {i}")


# ---------------------------------------------------------------------------------------------
# Sequences, compiled once.


@functools.lru_cache(maxsize=128)
def _scanner(tx: optax.GradientTransformation, with_value: bool, apply_updates: bool):
    update = _extra_args(tx).update

    def body(carry, xs):
        params, state = carry
        grads, value = xs
        kwargs = {"value": value} if with_value else {}
        updates, state = update(grads, state, params, **kwargs)
        if apply_updates:
            params = optax.apply_updates(params, updates)
        return (params, state), (updates, state)

    @jax.jit
    def scan(params, state, grads, values):
        (params, _), (updates, states) = jax.lax.scan(body, (params, state), (grads, values))
        return updates, states, params

    return scan


def run_sequence(tx, params, grads, values=None, *, apply_updates: bool = False, state=None):
    """Runs ``tx`` over a whole sequence in one jitted ``lax.scan``.

    The compiled scan is cached per ``tx`` object (and shapes): reuse one transformation across
    the examples of a property test and it compiles once.

    Args:
      tx: the transformation.
      params: the parameters (passed to ``update`` at every step).
      grads: a tree like ``params`` with a leading time axis (see :func:`scaled`).
      values: the loss per step, shape ``(T,)``, passed as ``value=``; ``None``: no ``value``.
      apply_updates: whether each step's updates are applied to the parameters.
      state: the initial state (default ``tx.init(params)``).

    Returns:
      ``(updates, states, params)``: the updates and the state after each step, stacked on a
      leading time axis, and the final parameters.
    """
    state = tx.init(params) if state is None else state
    steps = jax.tree.leaves(grads)[0].shape[0]
    with_value = values is not None
    values = jnp.zeros((steps,), jnp.float32) if values is None else jnp.asarray(values)
    return _scanner(tx, with_value, apply_updates)(params, state, grads, values)


def _step(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)
