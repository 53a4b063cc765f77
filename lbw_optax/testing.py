"""Property checks for optax transformations: the bar every lbw_optax transformation passes.

Hold your own policy, wrapper or optimizer to the same checks the library's tests use::

  from lbw_optax import testing

  testing.check_transformation(lambda learning_rate: my_guarded_adamw(learning_rate))

or call the checks one by one from pytest, chex or hypothesis tests. Each ``assert_*`` raises
``AssertionError`` naming what failed and returns nothing unless documented. The module imports
only jax, optax and numpy.

Every check passes the loss as ``value=`` (a transformation that does not need it ignores it;
a plain ``optax.GradientTransformation`` is wrapped with ``optax.with_extra_args_support``).

Property tests over many sequences should compile once: :func:`run_sequence` scans a whole
sequence inside one ``jax.jit`` that is cached per transformation object, so a hypothesis test
that builds its transformation once (at module level) and varies only the values pays for one
compilation, not one per example::

  TX = lbw_optax.guard(optax.adamw(1e-2))

  @hypothesis.given(st.lists(st.floats(-10, 10), min_size=40, max_size=40))
  def test_finite(factors):
      grads = testing.scaled(PARAMS, factors)
      testing.assert_finite_under(TX, PARAMS, grads, values=2.0 + jnp.asarray(factors))
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import optax

from lbw_optax._testing_inputs import (
    _assert_tree_finite,
    _assert_trees_equal,
    _extra_args,
    _leaves_all_zero,
    example_grads,
    example_loss,
    example_params,
    run_sequence,
    scaled,
)

__all__ = [
    "assert_accepts_schedule",
    "assert_converges",
    "assert_donatable",
    "assert_dtypes_preserved",
    "assert_extra_args_accepted",
    "assert_finite_under",
    "assert_identity_when_pinned",
    "assert_map_params_compatible",
    "assert_no_host_callback",
    "assert_no_retrace",
    "assert_state_dtypes_stable",
    "assert_works_in_chain",
    "assert_works_in_multisteps",
    "assert_works_with_inject_hyperparams",
    "check_transformation",
    "example_grads",
    "example_loss",
    "example_params",
    "host_callbacks",
    "run_sequence",
    "scaled",
]

Factory = Callable[..., optax.GradientTransformation]


def assert_finite_under(tx, params, grads, values=None, *, apply_updates: bool = True):
    """Every update, every state and the final parameters stay finite over a sequence of
    gradients and losses that may hold NaN, Inf and extreme values (what a guard promises; a
    bare clipping that passes NaN through does not).

    Returns:
      ``(updates, states, params)`` from :func:`run_sequence`, for further checks.
    """
    updates, states, final = run_sequence(tx, params, grads, values, apply_updates=apply_updates)
    _assert_tree_finite(updates, "updates")
    _assert_tree_finite(states, "state")
    _assert_tree_finite(final, "parameters")
    return updates, states, final


def assert_identity_when_pinned(
    tx, reference, params, grads, values=None, *, rtol: float = 0.0, atol: float = 0.0
):
    """``tx`` gives exactly (or within ``rtol``/``atol``) the updates of ``reference`` over a
    sequence: a governed transformation whose controls are pinned must be its inner optimizer.

    Both run in one jitted scan each, where XLA may fuse the two programs differently: an
    identity that is bit-exact step by step can differ here in the last bits (``rtol=1e-6``).

    Returns:
      ``(updates, states)`` of ``tx``.
    """
    got, states, _ = run_sequence(tx, params, grads, values)
    want, _, _ = run_sequence(reference, params, grads, values)
    _assert_trees_equal(got, want, "updates differ from the reference", rtol, atol)
    return got, states


# ---------------------------------------------------------------------------------------------
# Single checks.


def assert_no_retrace(tx, params=None, *, steps: int = 100, spike_at: int | None = 60):
    """A jitted step traces once over ``steps`` steps of changing gradients and losses (a
    ``spike_at`` step 1000× larger), and parameters and state stay finite."""
    tx = _extra_args(tx)
    params = example_params() if params is None else params
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(grads, state, params, loss):
        traces.append(1)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        spike = 1e3 if i == spike_at else 1.0
        grads = example_grads(params, i, spike=spike)
        params, state = step(grads, state, params, example_loss(i, spike=spike))
    if len(traces) != 1:
        raise AssertionError(f"the step was traced {len(traces)} times over {steps} steps")
    _assert_tree_finite((params, state), "after the steps")


def assert_extra_args_accepted(tx, params=None) -> None:
    """``update`` accepts (and ignores) a keyword argument it does not know (checked by
    tracing, without compiling)."""
    tx = _extra_args(tx)
    params = example_params() if params is None else params
    update = functools.partial(tx.update, value=example_loss(0), some_unknown_arg=jnp.ones(3))
    updates, _ = jax.eval_shape(update, example_grads(params, 0), tx.init(params), params)
    if jax.tree.structure(updates) != jax.tree.structure(params):
        raise AssertionError("the updates do not have the structure of the parameters")


def assert_dtypes_preserved(tx, dtypes: Sequence[Any] = (jnp.float32, jnp.bfloat16)) -> None:
    """Updates come back finite and in the parameters' dtype, for each of ``dtypes``."""
    tx = _extra_args(tx)
    for dtype in dtypes:
        params = example_params(dtype)
        state = tx.init(params)
        step = jax.jit(tx.update)
        for i in range(3):
            updates, state = step(example_grads(params, i), state, params, value=example_loss(i))
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
            if u.dtype != p.dtype:
                raise AssertionError(f"{jnp.dtype(dtype).name} parameters got {u.dtype} updates")
        _assert_tree_finite(updates, f"{jnp.dtype(dtype).name} updates")


def assert_donatable(tx, params=None) -> None:
    """A jitted step that donates the state and the parameters runs twice.

    Donation is how a training loop reuses the state's memory (``jax.jit(step,
    donate_argnums=...)``); it fails when ``init`` puts one array in two places of the state,
    or the parameters themselves in it.
    """
    tx = _extra_args(tx)
    params = example_params() if params is None else params
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # The caller's stay.
    state = tx.init(params)
    leaves = [x for x in jax.tree.leaves((params, state)) if isinstance(x, jax.Array)]
    shared = len(leaves) - len({id(x) for x in leaves})
    if shared:
        raise AssertionError(
            f"init gave {shared} array(s) that appear twice in (params, state): donation fails"
        )

    def step(params, state, grads, value):
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    for i in range(2):
        params, state = step(params, state, example_grads(params, i), example_loss(i))
    _assert_tree_finite(params, "parameters after two donated steps")


def assert_works_in_chain(tx, params=None) -> None:
    """Inside ``optax.chain`` (after a clipping), the updates are finite and not all zero."""
    params = example_params() if params is None else params
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    state = chained.init(params)
    updates, _ = jax.jit(chained.update)(
        example_grads(params, 0), state, params, value=example_loss(0)
    )
    _assert_tree_finite(updates, "updates")
    if _leaves_all_zero(updates):
        raise AssertionError("the chained updates are all zero")


def assert_works_in_multisteps(tx, params=None, every_k: int = 2) -> None:
    """Under ``optax.MultiSteps``: zero updates while accumulating, finite non-zero ones on the
    ``every_k``-th step."""
    params = example_params() if params is None else params
    multi = optax.MultiSteps(_extra_args(tx), every_k_schedule=every_k)
    state = multi.init(params)
    step = jax.jit(multi.update)
    for i in range(every_k):
        updates, state = step(example_grads(params, i), state, params, value=example_loss(i))
        if i < every_k - 1 and not _leaves_all_zero(updates):
            raise AssertionError(f"MultiSteps applied an update at mini-step {i}")
    _assert_tree_finite(updates, "updates")
    if _leaves_all_zero(updates):
        raise AssertionError(f"MultiSteps applied no update at mini-step {every_k - 1}")


def assert_works_with_inject_hyperparams(
    make: Factory, learning_rate: float = 1e-2, params=None, *, rtol: float = 1e-4
) -> None:
    """``optax.inject_hyperparams(make)(learning_rate=...)`` works and the injected learning
    rate acts: ten times the rate gives ten times the first update."""
    params = example_params() if params is None else params
    tx = optax.inject_hyperparams(make)(learning_rate=learning_rate)
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = example_grads(params, 0)
    small, _ = step(grads, state, params, value=example_loss(0))
    state.hyperparams["learning_rate"] = jnp.asarray(10 * learning_rate)
    large, _ = step(grads, state, params, value=example_loss(0))
    _assert_trees_equal(
        large, jax.tree.map(lambda s: 10 * s, small), "10× learning rate", rtol, 1e-7
    )


_HOST_PRIMITIVES = ("callback", "debug_print", "debug_callback")


def host_callbacks(fn, *args, **kwargs) -> list[str]:
    """Names of host-callback primitives anywhere in the jaxpr of ``fn(*args, **kwargs)``
    (sub-jaxprs included), plus ``"lowered"`` if the lowered module calls back to the host."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if any(name in eqn.primitive.name for name in _HOST_PRIMITIVES):
                found.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    bound = functools.partial(fn, **kwargs)
    walk(jax.make_jaxpr(bound)(*args).jaxpr)
    if "callback" in jax.jit(bound).lower(*args).as_text():
        found.append("lowered")
    return found


def assert_no_host_callback(tx, params=None) -> None:
    """The update has no host callback (no print, no ``pure_callback``): it never syncs."""
    tx = _extra_args(tx)
    params = example_params() if params is None else params
    found = host_callbacks(
        tx.update, example_grads(params, 0), tx.init(params), params, value=example_loss(0)
    )
    if found:
        raise AssertionError(f"the update calls back to the host: {found}")


def _parabola(dtype=jnp.float32):
    """A mixed 1-D and 2-D quadratic target (optax's common test problem) and its loss."""
    start = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
    target = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

    def loss(params):
        return sum(jnp.sum((p - t) ** 2) for p, t in zip(params, target, strict=True))

    return start, target, loss


def assert_converges(tx, *, steps: int = 2000, rtol: float = 3e-2, atol: float = 3e-2) -> None:
    """Minimising a quadratic (a vector and a matrix, optax's common test problem) for
    ``steps`` steps in one ``lax.scan`` reaches the minimum within ``rtol``/``atol``."""
    tx = _extra_args(tx)
    params, target, loss = _parabola()

    def body(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params, value=value)
        return (optax.apply_updates(params, updates), state), None

    run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), length=steps)[0][0])
    final = run(params, tx.init(params))
    _assert_trees_equal(final, target, f"not converged after {steps} steps", rtol, atol)


def assert_map_params_compatible(tx, params=None, *, dtype=None) -> None:
    """``optax.tree.map_params`` maps the state: the identity map leaves it equal and ``update``
    traces with the mapped state (checked without compiling).

    Args:
      tx: the transformation.
      params: the parameters (default :func:`example_params`).
      dtype: if given, the parameter-shaped float leaves of the state (the moments) are also
        cast to ``dtype`` with ``map_params``, as when keeping moments in bfloat16, and
        ``update`` must still trace.
    """
    tx = _extra_args(tx)
    params = example_params() if params is None else params
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    _assert_trees_equal(mapped, state, "map_params with the identity")
    update = functools.partial(tx.update, value=example_loss(0))
    jax.eval_shape(update, example_grads(params, 0), mapped, params)
    if dtype is not None:
        cast = optax.tree.map_params(
            tx, lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, state
        )
        try:
            jax.eval_shape(update, example_grads(params, 0), cast, params)
        except TypeError as error:
            raise AssertionError(f"update fails on a state cast to {dtype}: {error}") from error


@contextlib.contextmanager
def _x64(enabled: bool) -> Iterator[None]:
    old = jax.config.jax_enable_x64
    try:
        jax.config.update("jax_enable_x64", enabled)
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def assert_state_dtypes_stable(
    make: Callable[[], optax.GradientTransformation], dtypes=(jnp.float32, jnp.float64)
) -> None:
    """The state after an update has the dtypes and shapes of the state before it, so that
    ``lax.cond`` (and ``lax.scan``, checkpoint restore) can choose between them: checked as in
    optax, by a ``lax.cond`` between an update and no update, for float32 parameters and, with
    x64 enabled, float64 ones (the loss is passed in float16 to confuse promotion).

    Args:
      make: builds the transformation (called inside the x64 context).
      dtypes: the parameter dtypes; float64 ones run with ``jax_enable_x64``.
    """
    for dtype in dtypes:
        with _x64(jnp.dtype(dtype).itemsize == 8):
            tx = _extra_args(make())
            params = jnp.array([-1.0, 10.0, 1.0], dtype)

            @jax.jit
            def step(params, state, tx=tx):
                value, grads = jax.value_and_grad(lambda p: jnp.sum((p - 1.0) ** 2))(params)
                cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
                updates, state = jax.lax.cond(
                    cond,
                    lambda: tx.update(grads, state, params, value=value.astype(jnp.float16)),
                    lambda: (jnp.zeros_like(params), state),
                )
                return optax.apply_updates(params, updates), state

            state = tx.init(params)
            try:
                for _ in range(2):
                    params, state = step(params, state)
            except TypeError as error:
                raise AssertionError(
                    f"{jnp.dtype(dtype).name} parameters: the state's dtypes change in update: "
                    f"{error}"
                ) from error
            if params.dtype != jnp.dtype(dtype):
                raise AssertionError(f"{jnp.dtype(dtype).name} parameters became {params.dtype}")


def assert_accepts_schedule(
    make: Factory, learning_rate: float = 1e-2, params=None, *, steps: int = 3
) -> None:
    """A schedule as ``learning_rate`` works and a constant schedule gives the updates of the
    constant."""
    params = example_params() if params is None else params
    results = []
    for lr in (learning_rate, optax.constant_schedule(learning_rate)):
        tx = _extra_args(make(learning_rate=lr))
        state = tx.init(params)
        step = jax.jit(tx.update)
        for i in range(steps):
            updates, state = step(example_grads(params, i), state, params, value=example_loss(i))
        results.append(updates)
    _assert_trees_equal(results[1], results[0], "schedule vs constant", 1e-6, 1e-9)


# ---------------------------------------------------------------------------------------------
# Everything.


def check_transformation(
    make: Factory,
    learning_rate: float = 1e-2,
    *,
    convergence_learning_rate: float | None = None,
    skip: Sequence[str] = (),
) -> None:
    """Runs every check of this module on the transformation ``make(learning_rate=...)``.

    Args:
      make: builds the transformation from a ``learning_rate`` keyword (a float or a schedule);
        ``optax.inject_hyperparams`` must be able to drive it.
      learning_rate: the learning rate of the checks.
      convergence_learning_rate: the learning rate of :func:`assert_converges` (default:
        ``learning_rate``).
      skip: names of checks to leave out (e.g. ``("assert_accepts_schedule",)``).

    Raises:
      AssertionError: naming the first check that failed.
    """
    tx = lambda: make(learning_rate=learning_rate)
    checks = {
        "assert_no_retrace": lambda: assert_no_retrace(tx()),
        "assert_extra_args_accepted": lambda: assert_extra_args_accepted(tx()),
        "assert_dtypes_preserved": lambda: assert_dtypes_preserved(tx()),
        "assert_donatable": lambda: assert_donatable(tx()),
        "assert_works_in_chain": lambda: assert_works_in_chain(tx()),
        "assert_works_in_multisteps": lambda: assert_works_in_multisteps(tx()),
        "assert_works_with_inject_hyperparams": lambda: assert_works_with_inject_hyperparams(
            make, learning_rate
        ),
        "assert_no_host_callback": lambda: assert_no_host_callback(tx()),
        "assert_converges": lambda: assert_converges(
            make(learning_rate=convergence_learning_rate or learning_rate)
        ),
        "assert_map_params_compatible": lambda: assert_map_params_compatible(tx()),
        "assert_state_dtypes_stable": lambda: assert_state_dtypes_stable(tx),
        "assert_accepts_schedule": lambda: assert_accepts_schedule(make, learning_rate),
    }
    unknown = sorted(set(skip) - set(checks))
    if unknown:
        raise ValueError(f"skip names unknown checks {unknown}; known: {sorted(checks)}")
    for name, check in checks.items():
        if name in skip:
            continue
        try:
            check()
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error
