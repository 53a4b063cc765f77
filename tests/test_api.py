"""The public API: what IDEs and help() show, and the helpers around the guard's state."""

import dataclasses
import inspect

import chex
import jax
import jax.numpy as jnp
import optax
import optax.contrib
import pytest

import lbw_optax


@pytest.mark.parametrize(
    ("factory", "policy_class"),
    [
        (lbw_optax.governor_policy, lbw_optax.GovernorPolicy),
        (lbw_optax.reference_policy, lbw_optax.ReferencePolicy),
    ],
)
def test_policy_factories_show_every_knob_with_its_default(factory, policy_class):
    parameters = inspect.signature(factory).parameters
    fields = {f.name: f.default for f in dataclasses.fields(policy_class)}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())
    assert {name: p.default for name, p in parameters.items()} == fields
    # Each knob is documented in the factory's docstring.
    for name in fields:
        assert f"  {name}" in inspect.getdoc(factory) or f", {name}" in inspect.getdoc(factory)
    assert factory() == policy_class()
    with pytest.raises(TypeError):
        factory(not_a_knob=1)


def _restored_without_a_target(state):
    """``state`` as an Orbax checkpoint restored without a target gives it back: each
    NamedTuple a dict of its fields, each tuple a list, each MaskedNode ``None``."""
    if isinstance(state, optax.MaskedNode):
        return None
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return {k: _restored_without_a_target(v) for k, v in zip(state._fields, state, strict=True)}
    if isinstance(state, tuple | list):
        return [_restored_without_a_target(v) for v in state]
    if isinstance(state, dict):
        return {k: _restored_without_a_target(v) for k, v in state.items()}
    return state


PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}


def test_telemetry_of_a_state_restored_without_a_target_is_an_error_not_empty():
    state = optax.chain(optax.clip(1.0), lbw_optax.lbw_adamw(1e-3)).init(PARAMS)
    restored = _restored_without_a_target(state)
    with pytest.raises(ValueError, match=r"fields of GuardState.*restored without a target"):
        lbw_optax.telemetry(restored)
    # A state without governance is still no error.
    assert lbw_optax.telemetry(_restored_without_a_target(optax.adamw(1e-3).init(PARAMS))) == {}


def test_telemetry_of_a_real_orbax_restore_without_a_target_is_an_error(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    state = lbw_optax.lbw_adamw(1e-3).init(PARAMS)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state")
    assert isinstance(restored, dict)
    with pytest.raises(ValueError, match=r"fields of GuardState"):
        lbw_optax.telemetry(restored)


# --- schedule-free evaluation parameters ------------------------------------------------------


def _after_steps(tx, steps=3):
    state, params = tx.init(PARAMS), PARAMS
    for k in range(steps):
        grads = jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.1 * (k + 1)), params)
        updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        params = optax.apply_updates(params, updates)
    return state, params


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_optax_schedule_free_eval_params_reads_a_guards_inner_state():
    state, params = _after_steps(lbw_optax.guard(optax.contrib.schedule_free_adamw(1e-2)))
    want = optax.contrib.schedule_free_eval_params(state.inner_state, params)
    chex.assert_trees_all_equal(optax.contrib.schedule_free_eval_params(state, params), want)
    # A guard over an optimizer that is not schedule-free: optax's own error.
    state, params = _after_steps(lbw_optax.lbw_adamw(1e-2), steps=1)
    with pytest.raises(ValueError, match="requires a ScheduleFreeState"):
        optax.contrib.schedule_free_eval_params(state, params)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sf: sf,
        lambda sf: lbw_optax.guard(sf),
        lambda sf: optax.chain(optax.clip(1.0), lbw_optax.guard(sf)),
        lambda sf: optax.MultiSteps(lbw_optax.guard(sf), every_k_schedule=1),
        lambda sf: optax.inject_hyperparams(lambda learning_rate: lbw_optax.guard(sf))(
            learning_rate=1.0
        ),
    ],
    ids=["bare", "guard", "chain", "MultiSteps", "inject_hyperparams"],
)
def test_schedule_free_eval_params_finds_the_schedule_free_state_at_any_depth(wrap):
    schedule_free = optax.contrib.schedule_free_adamw(1e-2)
    state, params = _after_steps(wrap(schedule_free))
    inner = [
        n
        for n in jax.tree.leaves(
            state, is_leaf=lambda n: isinstance(n, optax.contrib.ScheduleFreeState)
        )
        if isinstance(n, optax.contrib.ScheduleFreeState)
    ]
    want = optax.contrib.schedule_free_eval_params(inner[0], params)
    chex.assert_trees_all_equal(lbw_optax.schedule_free_eval_params(state, params), want)


def test_schedule_free_eval_params_without_a_schedule_free_state_says_so():
    state, params = _after_steps(lbw_optax.lbw_adamw(1e-2), steps=1)
    with pytest.raises(ValueError, match=r"no optax\.contrib\.schedule_free state"):
        lbw_optax.schedule_free_eval_params(state, params)


# --- tensor names -------------------------------------------------------------------------------


def test_tensor_names_label_the_per_tensor_vectors_in_their_order():
    # Distinct norms, an empty tensor (not sensed) and nesting, so that order matters.
    params = {
        "z_last": jnp.full((2, 2), 3.0),
        "empty": jnp.zeros((0, 3)),
        "block": {"kernel": jnp.full((3, 2), 1.0), "bias": jnp.full((2,), 2.0)},
    }
    names = lbw_optax.tensor_names(params)
    assert names == ["block/bias", "block/kernel", "z_last"]
    tx = lbw_optax.lbw_adamw(1e-2)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, tx.init(params), params, value=jnp.float32(1.0))
    norms = lbw_optax.telemetry(state)["tensor_param_norms"]
    assert len(norms) == len(names)
    leaf = {"block/bias": params["block"]["bias"], "block/kernel": params["block"]["kernel"]}
    leaf["z_last"] = params["z_last"]
    for name, norm in zip(names, norms, strict=True):
        assert float(norm) == pytest.approx(float(jnp.linalg.norm(leaf[name])))


def test_tensor_names_of_a_flax_model_match_what_the_guard_senses():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, lbw_optax.lbw_adamw(1e-2), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads, value=jnp.float32(1.0))
    names = lbw_optax.tensor_names(nnx.state(model, nnx.Param))
    assert names[:2] == ["layers/0/bias/value", "layers/0/kernel/value"] and len(names) == 4
    norms = lbw_optax.telemetry(optimizer.opt_state)["tensor_update_norms"]
    assert len(norms) == len(names)
