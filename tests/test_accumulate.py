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


def _run(tx, grads, losses, params):
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g, loss in zip(grads, losses, strict=True):
        updates, state = step(g, state, params, value=jnp.asarray(loss))
        out.append(updates)
    return out, state


def test_the_guard_reads_the_mean_loss_of_the_window():
    params = testing.example_params()
    grads = [testing.example_grads(params, i) for i in range(4)]
    tx = lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-3), every_k=4)
    _, state = _run(tx, grads, MICRO_LOSSES, params)
    record = lbw_optax.telemetry(state)
    assert float(record["loss"]) == 4.0
    assert int(record["step"]) == 1
    # optax.MultiSteps alone hands the guard the last micro-batch's loss.
    plain = optax.MultiSteps(lbw_optax.lbw_adamw(1e-3), every_k_schedule=4)
    _, plain_state = _run(plain, grads, MICRO_LOSSES, params)
    assert float(lbw_optax.telemetry(plain_state)["loss"]) == 10.0


def test_second_window_starts_afresh():
    params = testing.example_params()
    grads = [testing.example_grads(params, i) for i in range(4)]
    tx = lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-3), every_k=2)
    _, state = _run(tx, grads, (1.0, 3.0, 5.0, 9.0), params)
    assert float(lbw_optax.telemetry(state)["loss"]) == 7.0
    assert float(state.value_sum) == 0.0


def test_updates_are_those_of_multisteps():
    params = testing.example_params()
    grads = [testing.example_grads(params, i) for i in range(6)]
    ours, _ = _run(lbw_optax.accumulate_gradients(optax.adamw(1e-2), 3), grads, [1.0] * 6, params)
    theirs, _ = _run(optax.MultiSteps(optax.adamw(1e-2), 3), grads, [1.0] * 6, params)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)
    assert all(not any(jax.tree.leaves(jax.tree.map(jnp.any, u))) for u in ours[:2])


def test_a_nan_gradient_spoils_one_window_only():
    params = testing.example_params()
    good = testing.example_grads(params, 0)
    nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), good)
    grads = [nan, good, good, good]
    tx = lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-3), every_k=2)
    updates, state = _run(tx, grads, (jnp.nan, 1.0, 1.0, 1.0), params)
    chex.assert_trees_all_equal(updates[1], jax.tree.map(jnp.zeros_like, good))  # Held.
    chex.assert_tree_all_finite(updates[3])
    assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates[3]))
    record = lbw_optax.telemetry(state)
    assert int(record["nonfinite_steps"]) == 1 and float(record["loss"]) == 1.0
    # optax.MultiSteps alone keeps the NaN in its sums: no later update.
    plain = optax.MultiSteps(lbw_optax.lbw_adamw(1e-3), every_k_schedule=2)
    plain_updates, _ = _run(plain, grads, (jnp.nan, 1.0, 1.0, 1.0), params)
    assert not any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(plain_updates[3]))


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


TX = lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-2), every_k=2)


def test_property_checks():
    testing.assert_no_retrace(TX)
    testing.assert_extra_args_accepted(TX)
    testing.assert_dtypes_preserved(TX, (jnp.float32, jnp.bfloat16))
    testing.assert_no_host_callback(TX)
    testing.assert_state_dtypes_stable(
        lambda: lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-2), every_k=2)
    )
    np.testing.assert_equal(TX.init(testing.example_params()).value_sum.dtype, np.float32)
