"""Data sources, batching, data position, optimizer registry, schedules, faults, config, CLI."""

from __future__ import annotations

import dataclasses
import gzip
import re
import subprocess
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax
from lbw import models
from lbw.train import (
    Batches,
    DataError,
    DataPosition,
    DataStream,
    FaultConfig,
    TrainConfig,
    available_optimizers,
    build_optimizer,
    eval_set,
    learning_rate_schedule,
    load_text,
    register_optimizer,
    tokenize,
)
from lbw.train.cli import build_parser, config_from_args
from lbw.train.data import SHIPPED_DIR
from lbw.train.faults import loss_factor, perturb_grads
from tests.train_helpers import PYTHON, ROOT, cli_env

BYTES = models.ByteTokenizer()


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)


# Sources.


def test_shipped_sample_trains_on_valid_and_evaluates_on_test():
    text = load_text(TrainConfig())
    with gzip.open(SHIPPED_DIR / "valid.txt.gz", "rt", encoding="utf-8") as f:
        assert text.train == f.read()
    assert len(text.train.encode()) == 1_121_681
    assert len(text.eval.encode()) == 1_256_449
    assert "validation split" in text.description and "test split" in text.description
    assert "Creative Commons" in (SHIPPED_DIR / "README.md").read_text()


def test_local_files_through_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.txt").write_text("third\n")
    (tmp_path / "c.txt").write_text("held out\n")
    config = TrainConfig(
        data="files",
        train_files=(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")),
        eval_files=(str(tmp_path / "c.txt"),),
        data_dir=str(tmp_path / "cache"),
    )
    text = load_text(config)
    assert text.train == "first line\nsecond line\nthird\n"
    assert text.eval == "held out\n"


def test_tfds_data_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        text = load_text(TrainConfig(data="tfds:lm1b", eval_split="test"))
    assert text.train.count("\n") == 40 and text.eval.count("\n") == 40
    assert "TFDS lm1b" in text.description
    tokens = tokenize(text.train, BYTES)
    batches = Batches(tokens, seq_len=8, batch_size=2, seed=0)
    assert batches.next().shape == (2, 9)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TrainConfig(data="wikitext3"), "Unknown data source 'wikitext3'"),
        (TrainConfig(data="hf:"), "give a dataset name"),
        (TrainConfig(data="files"), "needs train_files"),
        (
            TrainConfig(data="files", train_files=("/nonexistent.txt",), eval_files=("x",)),
            "no such file '/nonexistent.txt'",
        ),
    ],
)
def test_unknown_sources_and_missing_files_are_clear_errors(config, message):
    with pytest.raises(DataError, match=message):
        load_text(config)


def test_empty_and_too_short_text_are_clear_errors():
    with pytest.raises(DataError, match="training text is empty"):
        tokenize(" \n", BYTES, what="training text")
    with pytest.raises(DataError, match=r"fewer than one batch of 4.*at least 33 tokens"):
        Batches(_tokens(32), seq_len=8, batch_size=4, seed=0)
    Batches(_tokens(33), seq_len=8, batch_size=4, seed=0)  # Exactly one batch fits.
    with pytest.raises(DataError, match="evaluation text"):
        eval_set(_tokens(10), seq_len=8, batch_size=4, num_batches=2)


# Batching and position.


def test_batches_are_seeded_windows_covering_each_epoch_once():
    tokens = np.arange(8 * 10 + 1, dtype=np.uint16)  # 10 windows of 9 tokens.
    a = Batches(tokens, seq_len=8, batch_size=3, seed=1)
    assert a.batches_per_epoch == 3  # The 10th window is dropped from each epoch.
    epoch = np.concatenate([a.next() for _ in range(3)])
    assert a.position == DataPosition(1, 0)
    np.testing.assert_array_equal(epoch[:, 1:], epoch[:, :-1] + 1)  # Contiguous windows.
    starts = epoch[:, 0] // 8
    assert len(set(starts.tolist())) == 9
    again = Batches(tokens, seq_len=8, batch_size=3, seed=1)
    np.testing.assert_array_equal(np.concatenate([again.next() for _ in range(3)]), epoch)
    other = Batches(tokens, seq_len=8, batch_size=3, seed=2)
    assert not np.array_equal(np.concatenate([other.next() for _ in range(3)]), epoch)
    next_epoch = np.concatenate([a.next() for _ in range(3)])
    assert not np.array_equal(next_epoch, epoch)  # A fresh permutation each epoch.


def test_data_stream_state_restores_position_and_rng_mid_burst():
    faults = FaultConfig(corrupt_start=3, corrupt_steps=4)

    def stream():
        return DataStream(
            Batches(_tokens(2000), seq_len=16, batch_size=4, seed=5), faults, vocab_size=259, seed=5
        )

    full = stream()
    batches = [full.batch(step) for step in range(1, 9)]
    assert all(b.max() < 256 for b in batches[:2] + batches[6:])  # Real bytes.
    assert max(b.max() for b in batches[2:6]) >= 256  # Random ids over the whole vocabulary.
    first = stream()
    for step in range(1, 5):
        first.batch(step)
    saved = first.state()
    resumed = stream()
    resumed.restore(saved)
    for step in range(5, 9):
        np.testing.assert_array_equal(resumed.batch(step), batches[step - 1])


def test_eval_set_is_the_first_windows_in_order():
    tokens = np.arange(100, dtype=np.uint16)
    got = eval_set(tokens, seq_len=8, batch_size=2, num_batches=3)
    assert got.shape == (3, 2, 9)
    np.testing.assert_array_equal(got.reshape(-1, 9)[:, 0], np.arange(0, 48, 8))
    assert eval_set(tokens, seq_len=8, batch_size=2, num_batches=99).shape[0] == 6


# Optimizers, schedules, faults.


def test_registry_names_and_errors():
    assert {"adamw", "adamw+clip", "lbw", "sgg", "lbw+sgg"} <= set(available_optimizers())
    params = {"w": jnp.ones(3)}
    for name in ("adamw", "adamw+clip", "lbw"):
        for policy in ("governor", "reference"):
            tx = build_optimizer(TrainConfig(optimizer=name, policy=policy), lambda c: 1e-3)
            state = tx.init(params)
            updates, _ = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
            assert jnp.all(jnp.isfinite(updates["w"]))
    with pytest.raises(ValueError, match=r"Unknown optimizer 'nope'; known: .*adamw, adamw\+clip"):
        build_optimizer(TrainConfig(optimizer="nope"), lambda c: 1e-3)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("adamw")(lambda config, lr: optax.sgd(lr))


def test_sgg_names_resolve_lazily():
    for name in ("sgg", "lbw+sgg"):
        config = TrainConfig(optimizer=name)
        if hasattr(lbw_optax, "sgg_adamw"):
            tx = build_optimizer(config, lambda c: 1e-3)
            tx.init({"w": jnp.ones(3)})
        else:
            with pytest.raises(ValueError, match=r"needs lbw_optax\.sgg_adamw"):
                build_optimizer(config, lambda c: 1e-3)


def test_registered_peer_is_usable_by_name():
    name = "test-sgd-peer"
    if name not in available_optimizers():
        register_optimizer(name)(lambda config, lr: optax.sgd(lr))
    tx = build_optimizer(TrainConfig(optimizer=name), lambda c: 0.5)
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), value=1.0)
    np.testing.assert_allclose(updates["w"], -0.5)


def test_schedules_warm_up_then_decay_or_hold():
    cosine = learning_rate_schedule(
        TrainConfig(learning_rate=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    )
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.55)
    assert float(cosine(110)) == pytest.approx(0.1)
    constant = learning_rate_schedule(
        TrainConfig(learning_rate=1.0, warmup_steps=4, steps=100, schedule="constant")
    )
    assert [float(constant(c)) for c in (0, 2, 4, 99)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    shocked = learning_rate_schedule(
        TrainConfig(
            learning_rate=1.0,
            schedule="constant",
            faults=FaultConfig(lr_shock_start=3, lr_shock_steps=2, lr_shock_factor=7.0),
        )
    )
    # count c serves step c + 1: steps 3 and 4 are shocked.
    assert [float(shocked(c)) for c in range(5)] == pytest.approx([1, 1, 7, 7, 1])


def test_faults_apply_only_at_their_steps_without_retracing():
    faults = FaultConfig(
        grad_spike_steps=(2,), grad_spike_factor=10.0, nan_grad_steps=(3,), nan_loss_steps=(4,)
    )
    traces = []

    @jax.jit
    def apply(step):
        traces.append(step)
        grads = perturb_grads({"w": jnp.ones(2, jnp.bfloat16)}, step, faults)
        return grads, loss_factor(step, faults)

    out = {s: apply(jnp.int32(s)) for s in (1, 2, 3, 4)}
    assert len(traces) == 1
    assert out[1][0]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out[1][0]["w"], 1.0)
    np.testing.assert_array_equal(out[2][0]["w"], 10.0)
    assert jnp.all(jnp.isnan(out[3][0]["w"]))
    assert [bool(jnp.isnan(out[s][1])) for s in (1, 2, 3, 4)] == [False, False, False, True]
    assert FaultConfig().any is False and faults.any is True


# Config and CLI.


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        TrainConfig(seq_len=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="resume_step needs resume"):
        TrainConfig(resume_step=3)
    with pytest.raises(ValueError, match="steps count from 1"):
        FaultConfig(nan_loss_steps=(0,))
    config = TrainConfig(faults=FaultConfig(grad_spike_steps=(5, 3)), lora_rank=2)
    assert config.faults.grad_spike_steps == (3, 5)
    assert TrainConfig.from_dict(config.to_dict()) == config


def _flat_fields(config) -> dict[str, tuple[str, Any]]:
    """``{name: (annotation kind, value)}`` of the fields, nested dataclasses' flattened."""
    out = {}
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat_fields(value))
        else:
            out[field.name] = (re.sub(r"Literal\[.*?\]", "Literal", str(hints[field.name])), value)
    return out


def test_flags_round_trip_to_the_config_for_every_field_type():
    parser = build_parser()
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    flags = [
        *("--model=tiny_llama", "--model-override=num_layers=2", "--model-override=dtype=x"),
        *("--tokenizer=tok", "--lora-rank=4", "--lora-alpha=8", "--lora-targets=q_proj,v_proj"),
        *("--optimizer=lbw", "--policy=reference", "--lr=3e-4", "--schedule=constant"),
        *("--peak-lr-in-state", "--mesh=data=1,fsdp=1", "--data=files"),
        *("--train-files", "a.txt", "b.txt", "--eval-files", "c.txt"),
        *("--grad-spike-steps=5,9", "--nan-loss-steps", "7", "--corrupt-start=3"),
        *("--lr-shock-factor=5", "--resume", "--resume-step=10"),
    ]
    expected = TrainConfig(
        model="tiny_llama",
        model_overrides={"num_layers": 2, "dtype": "x"},
        tokenizer="tok",
        lora_rank=4,
        lora_alpha=8.0,
        lora_targets=("q_proj", "v_proj"),
        optimizer="lbw",
        policy="reference",
        learning_rate=3e-4,
        schedule="constant",
        peak_lr_in_state=True,
        mesh="data=1,fsdp=1",
        data="files",
        train_files=("a.txt", "b.txt"),
        eval_files=("c.txt",),
        faults=FaultConfig(
            grad_spike_steps=(5, 9), nan_loss_steps=(7,), corrupt_start=3, lr_shock_factor=5.0
        ),
        resume=True,
        resume_step=10,
    )
    assert config_from_args(parser.parse_args(flags)) == expected
    # The flags above set a field of every kind of annotation the config has.
    fields, defaults = _flat_fields(expected), _flat_fields(TrainConfig())
    changed = {kind for name, (kind, value) in fields.items() if value != defaults[name][1]}
    assert changed == {kind for kind, _ in fields.values()}


def test_a_config_field_is_a_flag_documented_by_its_docstring_entry():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(TrainConfig):
        """A config with one more field.

        Schedule:
          warmup_power: exponent of the warm-up curve, e.g. ``2.0``.
        """

        warmup_power: float = 1.0

    parser = build_parser(Extended)
    text = " ".join(parser.format_help().split())
    assert "schedule: --warmup-power WARMUP_POWER exponent of the warm-up curve, e.g. 2.0 " in text
    assert "(default: 1.0)" in text
    assert all(action.help for action in parser._actions)  # Every field has its entry.
    args = parser.parse_args(["--warmup-power=2", "--steps=3"])
    assert config_from_args(args, Extended) == Extended(warmup_power=2.0, steps=3)
    assert "trains on its validation split and evaluates on its test split" in text


def test_hf_source_reads_a_local_dataset_directory(tmp_path):
    # A directory in the Hub layout (one file per split) loads through the same code path as a
    # dataset from the Hub or the cache.
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.txt").write_text("alpha\nbeta\n")
    (tmp_path / "ds" / "validation.txt").write_text("gamma\n")
    text = load_text(TrainConfig(data=f"hf:{tmp_path / 'ds'}", data_dir=str(tmp_path / "cache")))
    assert (text.train, text.eval) == ("alpha\nbeta\n", "gamma\n")


def test_unreachable_wikitext103_is_a_clear_error(tmp_path):
    code = (
        "from train import TrainConfig, DataError, load_text\n"
        "try:\n"
        f"    load_text(TrainConfig(data='wikitext103', data_dir={str(tmp_path)!r}))\n"
        "except DataError as e:\n"
        "    print(e)\n"
    )
    env = {**cli_env(tmp_path / "jax"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert "Could not load Hugging Face dataset 'Salesforce/wikitext'" in done.stdout, done.stderr
    assert "reachable on the Hub or already in the datasets cache" in done.stdout
