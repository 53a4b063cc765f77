"""Every transformation in lbw_optax passes these (see tests/harness.py to add one)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lbw_optax
from tests.harness import CASES, host_callbacks, loss_at, make_grads, make_params

cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


@cases
def test_jit_does_not_retrace_over_100_steps(case):
    chex.clear_trace_counter()
    params = make_params()
    tx = case.make(learning_rate=case.learning_rate)
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params, loss):
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for i in range(100):
        spike = 1e3 if i == 60 else 1.0
        params, state = step(make_grads(params, i, spike=spike), state, params, loss_at(i))
    chex.assert_tree_all_finite((params, state))


@cases
def test_unknown_extra_args_are_accepted(case):
    params = make_params()
    tx = case.make(learning_rate=case.learning_rate)
    state = tx.init(params)
    updates, _ = tx.update(
        make_grads(params, 0), state, params, value=loss_at(0), some_unknown_arg=jnp.ones(3)
    )
    chex.assert_trees_all_equal_shapes(updates, params)


@cases
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dtypes_are_preserved(case, dtype):
    params = make_params(dtype)
    tx = case.make(learning_rate=case.learning_rate)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(3):
        updates, state = step(make_grads(params, i), state, params, value=loss_at(i))
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)


@cases
def test_works_inside_chain(case):
    params = make_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), case.make(learning_rate=case.learning_rate))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(make_grads(params, 0), state, params, value=loss_at(0))
    chex.assert_tree_all_finite(updates)
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


@cases
def test_works_inside_multisteps(case):
    params = make_params()
    tx = optax.MultiSteps(case.make(learning_rate=case.learning_rate), every_k_schedule=2)
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(make_grads(params, 0), state, params, value=loss_at(0))
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    updates, state = step(make_grads(params, 1), state, params, value=loss_at(1))
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
    chex.assert_tree_all_finite(updates)


@cases
def test_works_with_inject_hyperparams(case):
    params = make_params()
    tx = optax.inject_hyperparams(case.make)(learning_rate=case.learning_rate)
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = make_grads(params, 0)
    small, _ = step(grads, state, params, value=loss_at(0))
    state.hyperparams["learning_rate"] = jnp.asarray(10 * case.learning_rate)
    large, _ = step(grads, state, params, value=loss_at(0))
    for s, big in zip(jax.tree.leaves(small), jax.tree.leaves(large), strict=True):
        np.testing.assert_allclose(10 * np.asarray(s), np.asarray(big), rtol=1e-4, atol=1e-7)


class _TinyModel(nnx.Module):
    """Has an RMSNorm whose parameter is called ``scale``, the telemetry pitfall."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.RMSNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


@cases
def test_works_with_nnx_optimizer(case):
    model = _TinyModel(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, case.make(learning_rate=case.learning_rate), wrt=nnx.Param)
    x = jnp.linspace(-1, 1, 8).reshape(2, 4)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        optimizer.update(model, grads, value=loss)
        return loss

    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    losses = [float(train_step(model, optimizer)) for _ in range(5)]
    after = nnx.state(model, nnx.Param)
    assert all(np.isfinite(losses))
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)
    record = lbw_optax.telemetry(optimizer.opt_state)
    if record:  # A governed transformation: its record is readable despite RMSNorm's "scale".
        counters = [v for k, v in record.items() if k == "step" or k.endswith("_count")]
        assert counters and all(int(c) == 5 for c in counters)
    if "step" in record:
        assert isinstance(record["scale"], jax.Array)
    if "sgg_count" in record:  # Per-tensor fields come back as trees of arrays.
        assert all(isinstance(s, jax.Array) for s in jax.tree.leaves(record["cluster_scales"]))


@cases
def test_jitted_step_has_no_host_callback(case):
    params = make_params()
    tx = case.make(learning_rate=case.learning_rate)
    state = tx.init(params)
    found = host_callbacks(tx.update, make_grads(params, 0), state, params, value=loss_at(0))
    assert found == []


def test_host_callback_detector_detects_callbacks():
    def with_print(x):
        jax.debug.print("{x}", x=x)
        return x

    def with_pure_callback(x):
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    assert host_callbacks(with_print, jnp.ones(2)) != []
    assert host_callbacks(with_pure_callback, jnp.ones(2)) != []
    assert host_callbacks(jnp.sin, jnp.ones(2)) == []
