"""lbw_optax.accumulate_gradients: optax.MultiSteps whose inner transformation reads the mean
loss of the accumulation window."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax
from lbw_optax import testing

MICRO_LOSSES = (1.0, 2.0, 3.0, 10.0)
PARAMS = testing.example_params()
# Built once, so that the tests share their compilations.
GOVERNED = lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-3), every_k=4)
PLAIN = optax.MultiSteps(lbw_optax.lbw_adamw(1e-3), every_k_schedule=4)
_STEPS = {id(tx): jax.jit(tx.update) for tx in (GOVERNED, PLAIN)}


def _run(tx, grads, losses, params=PARAMS):
    state = tx.init(params)
    step = _STEPS.get(id(tx)) or jax.jit(tx.update)
    out = []
    for g, loss in zip(grads, losses, strict=True):
        updates, state = step(g, state, params, value=jnp.asarray(loss, jnp.float32))
        out.append(updates)
    return out, state


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_the_guard_reads_the_mean_loss_of_the_window():
    grads = [testing.example_grads(PARAMS, i) for i in range(4)]
    _, state = _run(GOVERNED, grads, MICRO_LOSSES)
    record = lbw_optax.telemetry(state)
    assert float(record["loss"]) == 4.0
    assert int(record["step"]) == 1
    # optax.MultiSteps alone hands the guard the last micro-batch's loss.
    _, plain_state = _run(PLAIN, grads, MICRO_LOSSES)
    assert float(lbw_optax.telemetry(plain_state)["loss"]) == 10.0


def test_second_window_starts_afresh():
    grads = [testing.example_grads(PARAMS, i) for i in range(8)]
    _, state = _run(GOVERNED, grads, (*MICRO_LOSSES, 5.0, 6.0, 7.0, 2.0))
    assert float(lbw_optax.telemetry(state)["loss"]) == 5.0
    assert int(lbw_optax.telemetry(state)["step"]) == 2
    assert float(state.value_sum) == 0.0


def test_updates_are_those_of_multisteps():
    grads = [testing.example_grads(PARAMS, i) for i in range(6)]
    ours, _ = _run(lbw_optax.accumulate_gradients(optax.adamw(1e-2), 3), grads, [1.0] * 6)
    theirs, _ = _run(optax.MultiSteps(optax.adamw(1e-2), 3), grads, [1.0] * 6)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)
    assert all(not any(jax.tree.leaves(jax.tree.map(jnp.any, u))) for u in ours[:2])


def test_a_nan_gradient_spoils_one_window_only():
    good = testing.example_grads(PARAMS, 0)
    nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), good)
    grads = [nan, *[good] * 7]
    losses = (jnp.nan, *[1.0] * 7)
    updates, state = _run(GOVERNED, grads, losses)
    chex.assert_trees_all_equal(updates[3], jax.tree.map(jnp.zeros_like, good))  # Held.
    chex.assert_tree_all_finite(updates[7])
    assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates[7]))
    record = lbw_optax.telemetry(state)
    assert int(record["nonfinite_steps"]) == 1 and float(record["loss"]) == 1.0
    # optax.MultiSteps alone keeps the NaN in its sums: no later update.
    plain_updates, _ = _run(PLAIN, grads, losses)
    assert not any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(plain_updates[7]))


def test_without_value_it_is_multisteps():
    params = testing.example_params()
    tx = lbw_optax.accumulate_gradients(optax.sgd(0.1), every_k=2)
    state = tx.init(params)
    grads = testing.example_grads(params, 0)
    u1, state = tx.update(grads, state, params)
    u2, state = tx.update(grads, state, params)
    chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, grads))
    chex.assert_trees_all_close(u2, jax.tree.map(lambda g: -0.1 * g, grads), rtol=1e-6)


@pytest.mark.parametrize("every_k", [0, 1.5, True])
def test_bad_every_k(every_k):
    with pytest.raises(ValueError, match="every_k"):
        lbw_optax.accumulate_gradients(optax.sgd(0.1), every_k)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_property_checks():
    """The wrapper's share of lbw_optax.testing's checks (around a cheap inner optimizer: the
    guard passes them on its own)."""
    make = lambda: lbw_optax.accumulate_gradients(optax.adamw(1e-2), every_k=2)
    tx = make()
    testing.assert_no_retrace(tx)
    testing.assert_extra_args_accepted(tx)
    testing.assert_dtypes_preserved(tx, (jnp.float32, jnp.bfloat16))
    testing.assert_no_host_callback(tx)
    testing.assert_state_dtypes_stable(make)
    np.testing.assert_equal(tx.init(PARAMS).value_sum.dtype, np.float32)
