"""The optimizer part of a run: ``OptimizerConfig`` and its ``build()``, ``TrainConfig.optim``, the
parts of a ``TrainConfig`` and the resume rule that compares them."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax
from lbw.train import FaultConfig, OptimizerConfig, TrainConfig, learning_rate_schedule
from lbw.train.config import PARTS, OptimizerPart, SessionPart, part
from lbw.train.run_dir import changed_fields, normalised


def _params():
    return {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}


def _grads():
    return {"w": jnp.full((4, 3), 0.5), "b": jnp.full((3,), -1.0)}


def test_build_gives_the_schedule_and_an_optimizer_that_takes_the_loss():
    config = OptimizerConfig(optimizer="lbw", learning_rate=3e-3, warmup_steps=2)
    schedule, tx = config.build(10)
    want = learning_rate_schedule(config, 10)
    for count in range(12):
        assert float(schedule(count)) == pytest.approx(float(want(count)))
    assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(3e-3)
    state = tx.init(_params())
    updates, _ = tx.update(_grads(), state, _params(), value=jnp.asarray(2.0))
    chex.assert_tree_all_finite(updates)
    assert lbw_optax.telemetry(state)  # A guard: its telemetry is in the state.


@pytest.mark.parametrize("optimizer", ["lbw", "lbw+clip"])
def test_optimizer_args_of_a_guard_are_its_policys_arguments(optimizer):
    """``{"max_boost": 2.0}`` turns the governor's boost on; without arguments the guard is
    built from the policy's name, as before; an unknown argument is a one-line error."""
    boosted = OptimizerConfig(optimizer=optimizer, optimizer_args={"max_boost": 2.0})
    state = boosted.build(10)[1].init(_params())
    assert float(optax.tree_utils.tree_get(state, "boost")) == 1.0
    plain = OptimizerConfig(optimizer=optimizer).build(10)[1].init(_params())
    assert isinstance(optax.tree_utils.tree_get(plain, "boost"), optax.MaskedNode)
    reference = OptimizerConfig(
        optimizer=optimizer, policy="reference", optimizer_args={"every": 2}
    )
    assert optax.tree_utils.tree_get(reference.build(10)[1].init(_params()), "scale") is not None
    bad = OptimizerConfig(optimizer=optimizer, optimizer_args={"max_bost": 2.0})
    with pytest.raises(ValueError, match=r"\['max_bost'\] are not arguments of governor_policy"):
        bad.build(10)


def test_build_matches_the_registered_factory_on_the_schedule():
    config = OptimizerConfig(optimizer="adamw", learning_rate=1e-2, schedule="constant")
    _, tx = config.build(5)
    plain = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
    got, _ = tx.update(_grads(), tx.init(_params()), _params(), value=jnp.asarray(1.0))
    want, _ = plain.update(_grads(), plain.init(_params()), _params())
    chex.assert_trees_all_close(got, want)


def test_build_applies_the_faults_learning_rate_shock():
    faults = FaultConfig(lr_shock_start=3, lr_shock_steps=2, lr_shock_factor=10.0)
    config = OptimizerConfig(schedule="constant", learning_rate=1e-3)
    plain, shocked = config.build(8).schedule, config.build(8, faults=faults).schedule
    ratios = [float(shocked(c)) / float(plain(c)) for c in range(6)]
    np.testing.assert_allclose(ratios, [1, 1, 10, 10, 1, 1], rtol=1e-6)


def test_build_is_shared_by_equal_configs_and_by_learning_rates_held_in_the_state():
    a = OptimizerConfig(optimizer="lbw", learning_rate=1e-3, optimizer_args={})
    assert a.build(10) is OptimizerConfig(optimizer="lbw", learning_rate=1e-3).build(10)
    assert a.build(10).tx is not OptimizerConfig(optimizer="lbw", learning_rate=2e-3).build(10).tx
    assert a.build(10).tx is not a.build(11).tx
    in_state = dataclasses.replace(a, peak_lr_in_state=True)
    other = dataclasses.replace(in_state, learning_rate=5e-2)
    assert in_state.build(10).tx is other.build(10).tx
    assert float(in_state.build(10).schedule(5)) == pytest.approx(
        float(learning_rate_schedule(dataclasses.replace(a, learning_rate=1.0), 10)(5))
    )


def test_build_accumulates_gradients():
    config = OptimizerConfig(learning_rate=1e-2)
    _, tx = config.build(10, grad_accum=2)
    assert tx is not config.build(10).tx
    state = tx.init(_params())
    first, state = tx.update(_grads(), state, _params(), value=jnp.asarray(1.0))
    chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, _grads()))  # Accumulating.
    second, _ = tx.update(_grads(), state, _params(), value=jnp.asarray(1.0))
    assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(second))  # The update.


def test_an_optimizer_config_is_hashable_and_validates_its_values():
    a = OptimizerConfig(optimizer_args={"recluster_every": 10})
    assert hash(a) == hash(OptimizerConfig(optimizer_args={"recluster_every": 10}))
    assert a != OptimizerConfig(optimizer_args={"recluster_every": 11})
    for bad in ({"learning_rate": 0.0}, {"min_lr_ratio": 2.0}, {"clip_threshold": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OptimizerConfig(**bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)  # The run's config checks its optimizer part.
    with pytest.raises(ValueError, match="Unknown optimizer 'nope'"):
        OptimizerConfig(optimizer="nope").build(10)


def test_train_config_optim_is_its_optimizer_part_with_the_layout():
    config = TrainConfig(optimizer="lbw+sgg", b2=0.95, optimizer_args={"recluster_every": 3})
    optim = config.optim
    assert isinstance(optim, OptimizerConfig)
    assert part(optim, OptimizerPart) == part(config, OptimizerPart)
    assert optim.optimizer == "lbw+sgg" and optim.b2 == 0.95 and not optim.stacked
    assert TrainConfig(scan_layers=True).optim.stacked
    assert TrainConfig(model_overrides={"scan_layers": True}).optim.stacked
    assert not TrainConfig(scan_layers=True, model_overrides={"scan_layers": False}).optim.stacked


def test_the_parts_hold_every_field_of_a_train_config_once():
    names = [f.name for cls in PARTS for f in dataclasses.fields(cls)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"b2": 0.95}, ["b2"]),  # Optimizer part.
        ({"optimizer_args": {"recluster_every": 4}}, ["optimizer_args"]),
        ({"learning_rate": 2e-3, "steps": 50}, ["learning_rate", "steps"]),
        ({"model_overrides": {"num_layers": 1}}, ["model_overrides"]),  # Model part.
        ({"seq_len": 64}, ["seq_len"]),  # Data part.
        ({"faults": FaultConfig(nan_loss_steps=(3,))}, ["faults"]),  # Run part.
        ({"log_every": 1, "out_dir": "elsewhere", "mesh": "data=1", "quiet": True}, []),
        ({"checkpoint_every": 2, "eval_every": 5, "export_to": "x", "tensorboard": False}, []),
    ],
)
def test_resume_refuses_a_change_to_any_part_but_the_session(change, refused):
    saved = normalised(TrainConfig())
    assert changed_fields(saved, dataclasses.replace(TrainConfig(), **change)) == refused
    session = {f.name for f in dataclasses.fields(SessionPart)}
    assert not set(refused) & session


def test_resume_reads_a_saved_config_that_predates_a_field_as_its_default():
    saved = normalised(TrainConfig(b2=0.95))
    del saved["peak_lr_in_state"], saved["grad_accum"]  # A run saved before these fields.
    assert changed_fields(saved, TrainConfig(b2=0.95)) == []
    assert changed_fields(saved, TrainConfig(b2=0.95, grad_accum=2)) == ["grad_accum"]
    # A config.json written by a flat TrainConfig reads back as the same config.
    assert TrainConfig.from_dict(TrainConfig(b2=0.95).to_dict()) == TrainConfig(b2=0.95)


def _first_step_ratio(tx) -> float:
    """``‖Δθ‖ / ‖θ‖`` of the first step of ``tx`` at a learning rate the limit cuts."""
    params = {"w": jnp.ones((10, 10))}
    grads = {"w": jnp.full((10, 10), 0.3)}
    updates, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(2.0))
    return float(optax.tree.norm(updates) / optax.tree.norm(params))


def test_the_governor_over_clipping_limits_tensors_at_its_own_limit():
    """By name over clipped gradients (lbw_adamw's default, ``lbw+clip``) the governor limits
    each tensor's step at ``CLIPPED_MAX_UPDATE_RATIO`` of its norm, 3.5 % otherwise; a knob
    given on top keeps that default, and an explicit limit or a policy instance wins."""
    clipped = lbw_optax.CLIPPED_MAX_UPDATE_RATIO
    assert clipped == 0.025
    ratio = _first_step_ratio
    assert ratio(lbw_optax.lbw_adamw(1.0, weight_decay=0.0)) == pytest.approx(clipped, rel=1e-4)
    assert ratio(lbw_optax.lbw_adamw(1.0, weight_decay=0.0, clip_threshold=None)) == (
        pytest.approx(0.035, rel=1e-4)
    )
    instance = lbw_optax.guard(
        optax.adam(1.0), policy=lbw_optax.governor_policy(), clip_threshold=1.0
    )
    assert ratio(instance) == pytest.approx(0.035, rel=1e-4)

    def train(optimizer, **args):
        config = OptimizerConfig(
            optimizer=optimizer,
            learning_rate=1.0,
            schedule="constant",
            warmup_steps=0,
            weight_decay=0.0,
            optimizer_args=args,
        )
        return ratio(config.build(10)[1])

    assert train("lbw+clip") == pytest.approx(clipped, rel=1e-4)
    assert train("lbw+clip", max_boost=2.0) == pytest.approx(clipped, rel=1e-4)
    assert train("lbw+clip", max_update_ratio=0.03) == pytest.approx(0.03, rel=1e-4)
    assert train("lbw") == pytest.approx(0.035, rel=1e-4)
