"""End-to-end runs of the training loop on a tiny model, in process."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lbw_optax
from lbw import models
from lbw.train import (
    FaultConfig,
    NonFiniteError,
    build_model,
    make_optimizer,
    make_train_step,
    train,
)
from lbw.train.cli import main
from tests.train_helpers import TINY, load_checkpoint, read_jsonl, tiny_config, train_losses

BASE = dict(steps=50, learning_rate=3e-3, warmup_steps=5, schedule="constant", eval_every=25)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    summary = train(tiny_config(out, **BASE))
    return out, summary


def test_loss_falls_over_50_steps(base_run):
    out, summary = base_run
    losses = train_losses(out / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 51))
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(46, 51)])
    assert last < first - 1.0, (first, last)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [25, 50]
    assert evals[-1]["eval_loss"] < math.log(models.ByteTokenizer.vocab_size) - 1.0
    assert summary["status"] == "completed"
    assert summary["eval_loss"] == evals[-1]["eval_loss"]
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert json.loads((out / "summary.json").read_text())["step"] == 50


def test_line_fields_and_no_guard_telemetry_for_adamw(base_run):
    out, _ = base_run
    lines = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    for line in lines:
        for key in LINE_FIELDS:
            assert key in line, key
        assert line["perplexity"] == pytest.approx(math.exp(line["loss"]))
        assert line["telemetry"] == {}
    assert all(r["tokens_per_s"] > 0 for r in lines[1:])  # Step 1 is the compile.
    walls = [r["wall_time_s"] for r in lines]
    assert walls == sorted(walls)


LINE_FIELDS = (
    "step",
    "loss",
    "perplexity",
    "learning_rate",
    "tokens_per_s",
    "step_time_s",
    "wall_time_s",
    "nonfinite",
    "telemetry",
)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_faults_reach_the_run(base_run, tmp_path):
    base = train_losses(base_run[0] / "metrics.jsonl")
    faults = FaultConfig(
        grad_spike_steps=(6,),
        grad_spike_factor=1e4,
        corrupt_start=8,
        corrupt_steps=2,
        lr_shock_start=11,
        lr_shock_steps=2,
        lr_shock_factor=10.0,
    )
    train(tiny_config(tmp_path, **{**BASE, "steps": 12, "eval_every": 0}, faults=faults))
    lines = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"}
    hit = {s: r["loss"] for s, r in lines.items()}
    assert all(base[s] == hit[s] for s in range(1, 7))  # Same data and params up to the spike.
    assert hit[7] != base[7]  # The spiked update changed the parameters.
    assert hit[8] > base[8] + 0.5 and hit[9] > base[9] + 0.5  # Random tokens: near-uniform loss.
    lrs = {s: r["learning_rate"] for s, r in lines.items()}
    assert lrs[10] == pytest.approx(3e-3)
    assert lrs[11] == lrs[12] == pytest.approx(3e-2)


def test_lora_step_changes_only_adapters():
    config = tiny_config("unused", lora_rank=4)
    model, wrt = build_model(config, 259)
    optimizer, _ = make_optimizer(config, model, wrt)
    before_base = jax.tree.map(np.asarray, nnx.state(model, models.BASE_PARAMS))
    before_lora = jax.tree.map(np.asarray, nnx.state(model, models.LORA_PARAMS))
    assert jax.tree.leaves(before_lora)
    step = make_train_step(config, wrt)
    tokens = jax.random.randint(jax.random.key(0), (4, 33), 0, 256)
    for _ in range(3):
        step(model, optimizer, tokens)
    chex.assert_trees_all_equal(before_base, nnx.state(model, models.BASE_PARAMS))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before_lora, nnx.state(model, models.LORA_PARAMS)
    )
    assert all(jax.tree.leaves(changed))


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_lora_run_checkpoints_only_adapters(tmp_path):
    config = tiny_config(tmp_path, lora_rank=4, steps=4, checkpoint_every=4)
    summary = train(config)
    state, _ = load_checkpoint(config, 4)
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])
    ]
    assert paths and all("lora_a" in p or "lora_b" in p for p in paths), paths
    assert summary["trainable_params"] == sum(x.size for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_export_then_lora_on_the_exported_base(tmp_path):
    base_config = tiny_config(tmp_path / "base", steps=5, export_to=str(tmp_path / "model"))
    train(base_config)
    exported = models.load_pretrained(tmp_path / "model")
    config = tiny_config(tmp_path / "lora", init_from=str(tmp_path / "model"), lora_rank=4)
    model, wrt = build_model(config, 259)
    assert wrt is models.LORA_PARAMS
    # The base weights are the exported ones, not a fresh initialisation...
    # (LoRA wraps each target in a ``base_module``, so compare the leaves in order.)
    want = jax.tree.leaves(nnx.state(exported, nnx.Param))
    got = jax.tree.leaves(nnx.state(model, models.BASE_PARAMS))
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh, _ = build_model(tiny_config("unused"), 259)
    assert not np.array_equal(
        nnx.state(fresh, nnx.Param)["embed_tokens"]["embedding"][...],
        nnx.state(model, models.BASE_PARAMS)["embed_tokens"]["embedding"][...],
    )
    # ... and the zero-initialised adapters leave the function unchanged.
    tokens = jnp.arange(32)[None] % 200
    np.testing.assert_allclose(model(tokens), exported(tokens), rtol=1e-5, atol=1e-5)
    summary = train(config)
    assert summary["status"] == "completed"
    assert summary["trainable_params"] < sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def test_init_from_a_checkpoint_of_another_shape_names_the_field(tmp_path):
    train(tiny_config(tmp_path / "base", steps=1, export_to=str(tmp_path / "model")))
    config = tiny_config(
        tmp_path / "x", init_from=str(tmp_path / "model"), model_overrides={**TINY, "num_layers": 3}
    )
    with pytest.raises(ValueError, match=f"num_layers: checkpoint {TINY['num_layers']}, model 3"):
        build_model(config, 259)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        build_model(tiny_config(tmp_path / "y", init_from=str(tmp_path / "nothing")), 259)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_guard_holds_injected_nan_and_training_continues(tmp_path):
    faults = FaultConfig(nan_loss_steps=(5,), nan_grad_steps=(8,))
    config = tiny_config(tmp_path, optimizer="lbw", steps=12, checkpoint_every=12, faults=faults)
    summary = train(config)
    assert summary["status"] == "completed"
    lines = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"}
    assert lines[5]["loss"] is None and lines[5]["nonfinite"] == 1
    assert lines[8]["nonfinite"] == 1 and math.isfinite(lines[8]["loss"])
    for s in (5, 8):
        assert lines[s]["telemetry"]["regime_name"] == "NONFINITE"
        assert lines[s]["telemetry"]["held"] is True
    assert all(math.isfinite(lines[s]["loss"]) for s in (6, 7, 9, 10, 11, 12))
    assert summary["telemetry"]["nonfinite_steps"] == 2
    guard_fields = set(lbw_optax.telemetry(lbw_optax.lbw_adamw(1e-3).init({"w": jnp.ones(2)})))
    for line in lines.values():
        assert guard_fields <= set(line["telemetry"]), guard_fields - set(line["telemetry"])
        assert line["telemetry"]["step"] == line["step"]
    state, _ = load_checkpoint(config, 12)
    chex.assert_tree_all_finite(state["params"])


def test_without_guard_nan_stops_the_run_naming_the_step(tmp_path):
    faults = FaultConfig(nan_loss_steps=(5,))
    config = tiny_config(tmp_path, steps=12, log_every=4, checkpoint_every=6, faults=faults)
    with pytest.raises(NonFiniteError, match=r"Step 5: the loss or gradients are NaN/Inf") as e:
        train(config)
    assert e.value.step == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["nonfinite_step"] == 5
    # The checkpoint due at step 6 was not written: it would have held NaN parameters.
    assert not (tmp_path / "checkpoints" / "6").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [4]


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_cli_exit_status_and_message_for_nonfinite_loss(tmp_path, capsys):
    from tests.train_helpers import TINY_FLAGS

    args = [
        "--seq-len=32",
        "--batch-size=4",
        "--steps=6",
        "--log-every=3",
        "--eval-batches=2",
        f"--out-dir={tmp_path}",
        "--nan-loss-steps=2",
        "--quiet",
        *TINY_FLAGS,
    ]
    assert main(args) == 3
    assert "lbw-train: error: Step 2: the loss or gradients are NaN/Inf" in capsys.readouterr().err


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_lbw_sgg_lines_log_per_tensor_cluster_fields(tmp_path):
    """Every telemetry field is logged, SGG's per-tensor ones by parameter path."""
    train(tiny_config(tmp_path, optimizer="lbw+sgg", steps=2))
    line = read_jsonl(tmp_path / "metrics.jsonl")[0]
    tel = line["telemetry"]
    assert {"model_mda", "sgg_count", "regime_name"} <= set(tel)
    model, _ = build_model(tiny_config("unused"), 259)
    kernel = "layers/0/mlp/down_proj/kernel"
    assert kernel.split("/")[-1] in nnx.state(model, nnx.Param)["layers"][0]["mlp"]["down_proj"]
    for field in ("cluster_scales", "cluster_sizes", "cluster_mda"):
        assert kernel in tel[field], sorted(tel[field])
        assert len(tel[field][kernel]) == 3  # One value per cluster.
    assert all(math.isfinite(x) for v in tel["cluster_scales"].values() for x in v)
    assert not any("layernorm" in k for k in tel["cluster_scales"])  # Skipped: no empty lists.


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_grad_accum_is_one_batch_of_k_times_the_size(tmp_path):
    """K=2 micro-batches of 2 sequences make the same updates as one batch of 4 (AdamW)."""
    common = dict(steps=3, schedule="constant", learning_rate=3e-3)
    runs = {}
    for name, values in (("k2", dict(batch_size=2, grad_accum=2)), ("k1", dict(batch_size=4))):
        model_dir = tmp_path / f"{name}-model"
        config = tiny_config(tmp_path / name, export_to=str(model_dir), **common, **values)
        summary = train(config)
        runs[name] = (train_losses(tmp_path / name / "metrics.jsonl"), model_dir, summary)
    (k2_losses, k2_model, k2), (k1_losses, k1_model, _) = runs["k2"], runs["k1"]
    assert sorted(k2_losses) == [1, 2, 3]
    for step in k2_losses:
        assert k2_losses[step] == pytest.approx(k1_losses[step], rel=1e-5)
    want = nnx.to_flat_state(nnx.state(models.load_pretrained(k1_model), nnx.Param))
    got = nnx.to_flat_state(nnx.state(models.load_pretrained(k2_model), nnx.Param))
    # The key bias's gradient is zero up to rounding (softmax ignores a shift shared by all
    # keys), and AdamW's normalisation turns rounding into whole steps: left out.
    pairs = [(p, a[...], b[...]) for (p, a), (_, b) in zip(got, want, strict=True)]
    pairs = [(p, a, b) for p, a, b in pairs if p[-2:] != ("k_proj", "bias")]
    assert len(pairs) == len(want) - 1
    for path, a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert k2["telemetry"] == {}


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_grad_accum_guard_reads_each_update_mean_loss_and_holds_a_nan(tmp_path):
    faults = FaultConfig(nan_loss_steps=(2,))
    train(tiny_config(tmp_path, optimizer="lbw", grad_accum=2, steps=4, faults=faults))
    lines = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"}
    assert lines[2]["loss"] is None and lines[2]["nonfinite"] == 1
    assert lines[2]["telemetry"]["regime_name"] == "NONFINITE"
    for step in (1, 3, 4):  # The guard read the mean of the two micro-losses, as logged.
        tel = lines[step]["telemetry"]
        assert tel["step"] == step and tel["loss"] == pytest.approx(lines[step]["loss"], rel=1e-5)
    assert lines[4]["telemetry"]["nonfinite_steps"] == 1
