"""The public API: what IDEs and help() show, and the helpers around the guard's state."""

import dataclasses
import inspect

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
