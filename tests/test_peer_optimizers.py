"""The training loop's peer optimizers and the guard over other inner optimizers."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax
from lbw.train import TrainConfig, build_optimizer, learning_rate_schedule, train
from lbw.train.optimizers import available_optimizers
from lbw_optax import testing
from tests.train_helpers import read_jsonl, tiny_config

NEW_PEERS = (
    "stable-adamw",
    "prodigy",
    "dadapt-adamw",
    "mechanic",
    "schedule-free-adamw",
    "reduce-on-plateau",
    "apply-if-finite",
)


def _toy():
    """A least-squares problem on a matrix and a bias (Muon needs a 2-D tensor)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    params = {"w": jnp.zeros((6, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}

    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - target) ** 2)

    return params, loss_fn


def _run_toy(config: TrainConfig, steps: int = 8):
    tx = build_optimizer(config, learning_rate_schedule(config))
    params, loss_fn = _toy()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, losses, float(loss_fn(params))


def _config(**overrides) -> TrainConfig:
    values = dict(learning_rate=1e-2, steps=8, warmup_steps=2, schedule="cosine")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("name", NEW_PEERS)
def test_new_peers_train_a_few_steps_without_nan(name):
    lr = 1.0 if name in ("prodigy", "dadapt-adamw") else 1e-2
    params, _, losses, final = _run_toy(_config(optimizer=name, learning_rate=lr))
    chex.assert_tree_all_finite(params)
    assert all(math.isfinite(v) for v in losses)
    assert final < losses[0], (name, losses[0], final)


@pytest.mark.parametrize("inner", ["adamw", "lion", "muon", "adafactor", "sgd"])
def test_guard_governs_other_inner_optimizers(inner):
    # Lion and Muon hold a momentum; Adafactor (without momentum) and SGD's trace hold no
    # field the governor reads as Adam's first moment: the guard works either way.
    config = _config(optimizer="lbw", inner=inner, learning_rate=3e-3)
    params, state, losses, final = _run_toy(config)
    chex.assert_tree_all_finite(params)
    record = lbw_optax.telemetry(state)
    assert int(record["step"]) == 8 and 0 < float(record["scale"]) <= 1
    assert final < losses[0]


def test_unknown_inner_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown inner optimizer 'adam'.*lion"):
        build_optimizer(_config(optimizer="lbw", inner="adam"), lambda c: 1e-3)


def test_lbw_clip_is_the_guard_over_clipping_then_adamw():
    config = _config(optimizer="lbw+clip", clip_threshold=0.5, policy="reference")
    tx = build_optimizer(config, 1e-2)
    reference = lbw_optax.guard(
        optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=1e-4)),
        policy="reference",
    )
    unclipped = lbw_optax.guard(optax.adamw(1e-2, weight_decay=1e-4), policy="reference")
    params = {"w": jnp.ones((2, 3))}
    states = [t.init(params) for t in (tx, reference, unclipped)]
    for norm in (100.0, 1.0):  # Adam normalises step 1; step 2 shows the clipped history.
        grads = {"w": jnp.full((2, 3), norm / math.sqrt(6))}
        out = []
        for i, t in enumerate((tx, reference, unclipped)):
            u, states[i] = t.update(grads, states[i], params, value=jnp.float32(2.0))
            out.append(u)
    chex.assert_trees_all_close(out[0], out[1], rtol=1e-6)
    assert not np.allclose(out[0]["w"], out[2]["w"], rtol=1e-3)


def test_optimizer_args_reach_the_peer_factory():
    for args, reclustered in (({"recluster_every": 2}, True), ({}, False)):
        _, state, _, _ = _run_toy(_config(optimizer="sgg", optimizer_args=args), steps=2)
        assert (float(optax.tree.get(state, "SGGState").model_mda) > 0) == reclustered
    with pytest.raises(TypeError, match="bogus"):
        build_optimizer(_config(optimizer="zclip", optimizer_args={"bogus": 1}), 1e-3)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_schedule_free_is_evaluated_at_its_averaged_parameters(tmp_path):
    from lbw.train.step import raw

    summary = train(tiny_config(tmp_path, optimizer="schedule-free-adamw", steps=6, eval_every=6))
    assert summary["status"] == "completed" and math.isfinite(summary["eval_loss"])
    # The evaluation point differs from the trained (y) parameters and leaves them in place.
    from flax import nnx

    from lbw.train.model import build_model
    from lbw.train.step import evaluate, evaluate_optimizer_point

    config = tiny_config(tmp_path / "b", optimizer="schedule-free-adamw", steps=2)
    model, wrt = build_model(config, 256)
    tx = build_optimizer(config, learning_rate_schedule(config))
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 2, 9)), jnp.int32)

    def loss_fn(m):
        return jnp.mean(m(tokens[0, :, :-1]) ** 2)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss_fn)(model), value=jnp.float32(1.0))

    for _ in range(3):
        step(model, optimizer)
    before = raw(nnx.state(model, wrt))
    at_x = evaluate_optimizer_point(config.optimizer, model, optimizer, wrt, np.asarray(tokens))
    at_y = evaluate(model, np.asarray(tokens))
    chex.assert_trees_all_equal(raw(nnx.state(model, wrt)), before)
    assert at_x != at_y


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [
        ("lbw", {"inner": "lion", "learning_rate": 3e-4}),
        ("lbw", {"inner": "muon"}),
        ("prodigy", {"learning_rate": 1.0, "warmup_steps": 2}),
    ],
)
def test_through_the_training_loop(tmp_path, optimizer, extra):
    config = tiny_config(tmp_path, optimizer=optimizer, steps=4, **extra)
    summary = train(config)
    assert summary["status"] == "completed" and math.isfinite(summary["loss"])
    lines = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in lines)
    if optimizer == "lbw":
        assert lines[-1]["telemetry"]["step"] == 4


@pytest.mark.parametrize("name", available_optimizers())
def test_every_registered_optimizer_can_be_donated(name):
    config = _config(optimizer=name)
    testing.assert_donatable(build_optimizer(config, learning_rate_schedule(config)))
