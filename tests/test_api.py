"""The public API: what IDEs and help() show, and the helpers around the guard's state."""

import dataclasses
import inspect

import jax.numpy as jnp
import optax
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
