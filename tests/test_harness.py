"""Every transformation in lbw_optax passes the checks of lbw_optax.testing (see
tests/harness.py to add one), and each check fails on a transformation that breaks it."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lbw_optax
from lbw_optax import _testing_inputs, testing
from tests.harness import CASES

cases = pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES],
)


def _tx(case):
    return case.make(learning_rate=case.learning_rate)


@cases
def test_jit_does_not_retrace_over_100_steps(case):
    testing.assert_no_retrace(_tx(case))


@cases
def test_unknown_extra_args_are_accepted(case):
    testing.assert_extra_args_accepted(_tx(case))


@cases
def test_dtypes_are_preserved(case):
    testing.assert_dtypes_preserved(_tx(case), (jnp.float32, jnp.bfloat16))


@cases
def test_state_and_params_can_be_donated(case):
    testing.assert_donatable(_tx(case))


@cases
def test_works_inside_chain(case):
    testing.assert_works_in_chain(_tx(case))


@cases
def test_works_inside_multisteps(case):
    testing.assert_works_in_multisteps(_tx(case))


@cases
def test_works_with_inject_hyperparams(case):
    # Where the governor's limiter would bind, ten times the rate is (on purpose) not ten times
    # the update: check the injection at a rate whose tenfold it does not cap.
    learning_rate = case.learning_rate if case.linear_in_lr else 1e-4
    testing.assert_works_with_inject_hyperparams(case.make, learning_rate)


@cases
def test_jitted_step_has_no_host_callback(case):
    testing.assert_no_host_callback(_tx(case))


@cases
def test_converges_on_a_quadratic(case):
    testing.assert_converges(_tx(case))


@cases
def test_state_is_compatible_with_map_params(case):
    testing.assert_map_params_compatible(_tx(case))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="SGG's re-clustering lax.cond mixes the moments' dtype with float32",
            ),
        )
        if "sgg" in c.name
        else c
        for c in CASES
    ],
    ids=lambda c: c.name,
)
def test_moments_cast_to_bfloat16_with_map_params_still_update(case):
    testing.assert_map_params_compatible(_tx(case), dtype=jnp.bfloat16)


@cases
def test_state_dtypes_are_stable_under_cond_and_x64(case):
    testing.assert_state_dtypes_stable(lambda: _tx(case))


@cases
def test_accepts_a_schedule_as_learning_rate(case):
    testing.assert_accepts_schedule(case.make, case.learning_rate)


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
    optimizer = nnx.Optimizer(model, _tx(case), wrt=nnx.Param)
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


def test_nnx_step_donates_model_and_optimizer():
    model = _TinyModel(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, lbw_optax.lbw_adamw(1e-2), wrt=nnx.Param)
    x = jnp.linspace(-1, 1, 8).reshape(2, 4)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        optimizer.update(model, grads, value=loss)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(3)]
    assert all(np.isfinite(losses))


def test_check_transformation_runs_every_check_on_a_plain_optimizer():
    testing.check_transformation(optax.adamw, 1e-2)
    with pytest.raises(ValueError, match="unknown checks"):
        testing.check_transformation(optax.adamw, skip=("assert_nothing",))


# --- each check detects what it checks ----------------------------------------------------------


def _stateful(init, update):
    return optax.GradientTransformationExtraArgs(init, update)


def test_donation_check_detects_a_shared_buffer_and_donatable_mends_it():
    def init(params):
        zero = jnp.zeros([], jnp.float32)
        return (zero, zero, params)  # One zero twice, and the parameters themselves.

    tx = _stateful(init, lambda u, s, p=None, **kw: (u, s))
    with pytest.raises(AssertionError, match="appear twice"):
        testing.assert_donatable(tx)
    testing.assert_donatable(lbw_optax.donatable(tx))


def test_retrace_detector_detects_a_state_that_changes_type():
    # An int32 counter in the initial state comes back as float32: traced twice.
    tx = _stateful(
        lambda p: jnp.zeros([], jnp.int32),
        lambda u, s, p=None, **kw: (u, (s + 1).astype(jnp.float32)),
    )
    with pytest.raises(AssertionError, match="traced 2 times"):
        testing.assert_no_retrace(tx)


def test_host_callback_detector_detects_callbacks():
    def with_print(x):
        jax.debug.print("{x}", x=x)
        return x

    def with_pure_callback(x):
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    assert testing.host_callbacks(with_print, jnp.ones(2)) != []
    assert testing.host_callbacks(with_pure_callback, jnp.ones(2)) != []
    assert testing.host_callbacks(jnp.sin, jnp.ones(2)) == []


def test_dtype_and_convergence_checks_detect_failures():
    to_f32 = optax.stateless(lambda u, p=None: jax.tree.map(lambda x: x.astype(jnp.float32), u))
    with pytest.raises(AssertionError, match="bfloat16 parameters got float32"):
        testing.assert_dtypes_preserved(to_f32)
    with pytest.raises(AssertionError, match="not converged"):
        testing.assert_converges(optax.sgd(1e-6))
    with pytest.raises(AssertionError, match="all zero"):
        testing.assert_works_in_chain(optax.sgd(0.0))


def test_state_dtype_check_detects_a_state_that_changes_dtype():
    def update(u, count, p=None, **kw):
        return u, (count + 1).astype(jnp.int16)

    tx = _stateful(lambda p: jnp.zeros([], jnp.int32), update)
    with pytest.raises(AssertionError, match="state's dtypes change"):
        testing.assert_state_dtypes_stable(lambda: tx)


def test_schedule_check_detects_an_ignored_schedule():
    def make(learning_rate):
        return optax.sgd(learning_rate if not callable(learning_rate) else 1.0)

    with pytest.raises(AssertionError, match="schedule vs constant"):
        testing.assert_accepts_schedule(make, 1e-2)


def test_sequence_checks_compile_once_and_detect_nonfinite_and_non_identity():
    params = testing.example_params()
    tx = optax.sgd(1e-2)
    grads = testing.scaled(params, [1.0, 2.0, 3.0])
    updates, _, final = testing.run_sequence(tx, params, grads, apply_updates=True)
    np.testing.assert_allclose(updates["bias"][:, 0], [-1e-3, -2e-3, -3e-3], rtol=1e-6)
    np.testing.assert_allclose(final["bias"], params["bias"] * (1 - 6e-2), rtol=1e-6)
    compiled = _testing_inputs._scanner(tx, False, True)._cache_size()
    testing.run_sequence(tx, params, testing.scaled(params, [5.0, -1.0, 0.0]), apply_updates=True)
    assert _testing_inputs._scanner(tx, False, True)._cache_size() == compiled == 1
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_finite_under(tx, params, testing.scaled(params, [1.0, np.nan, 1.0]))
    testing.assert_identity_when_pinned(tx, optax.sgd(1e-2), params, grads)
    with pytest.raises(AssertionError, match="differ from the reference"):
        testing.assert_identity_when_pinned(tx, optax.sgd(2e-2), params, grads)


def test_the_testing_page_example_runs():
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "testing.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, str(page), "exec"), {"__name__": "testing_page_example"})
