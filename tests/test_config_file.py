"""``lbw-train --config FILE``: a TOML or YAML file gives any TrainConfig field under its flag's
name; flags on the command line override it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from lbw.train import TrainConfig
from lbw.train.cli import build_parser, field_flags, main, parse_config
from tests.train_helpers import TINY_FLAGS, train_losses

# One value per field of TrainConfig (and FaultConfig), by the flag's name, each unlike the
# default where the config allows it.
EVERY_FIELD = {
    "model": "tiny_qwen2_5_7b",
    "model-override": {"num_layers": 2, "rms_norm_eps": 1e-5},
    "tokenizer": "tokenizer-dir",
    "lora-rank": 4,
    "lora-alpha": 8.0,
    "lora-targets": ["q_proj", "v_proj"],
    "init-from": "base-model",
    "scan-layers": True,
    "remat": True,
    "optimizer": "lbw",
    "lr": 3e-4,
    "schedule": "constant",
    "warmup-steps": 7,
    "min-lr-ratio": 0.2,
    "weight-decay": 0.01,
    "b1": 0.8,
    "b2": 0.95,
    "eps": 1e-6,
    "clip-threshold": 0.5,
    "policy": "reference",
    "peak-lr-in-state": True,
    "inner": "lion",
    "optimizer-arg": {"recluster_every": 10},
    "data": "files",
    "train-files": ["a.txt", "b.txt"],
    "eval-files": ["c.txt"],
    "train-split": "train[:90%]",
    "eval-split": "test",
    "text-field": "content",
    "data-dir": "cache",
    "seq-len": 64,
    "batch-size": 2,
    "grad-accum": 3,
    "steps": 99,
    "seed": 5,
    "eval-every": 11,
    "eval-batches": 3,
    "log-every": 4,
    "out-dir": "runs/from-file",
    "checkpoint-every": 6,
    "keep-checkpoints": 2,
    "resume": True,
    "resume-step": 12,
    "overwrite": False,
    "quiet": True,
    "progress-every": 5.5,
    "tensorboard": False,
    "export-to": "exported",
    "grad-spike-steps": [3, 9],
    "grad-spike-factor": 50.0,
    "nan-loss-steps": [4],
    "nan-grad-steps": [5, 6],
    "corrupt-start": 8,
    "corrupt-steps": 2,
    "lr-shock-start": 10,
    "lr-shock-steps": 3,
    "lr-shock-factor": 4.0,
    "mesh": "data=1",
}


def _toml(values: dict) -> str:
    """``values`` as TOML (strings, numbers, booleans, lists and inline tables)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def _field_values(config: TrainConfig) -> dict:
    """Field name -> value, the fault fields flattened, as the flags name them."""
    values = dataclasses.asdict(config)
    values.update(values.pop("faults"))
    return values


def _flag_fields() -> dict[str, str]:
    """Each field's flag name (the first, as --help shows it) -> the field."""
    actions = {id(a): a for a in field_flags(build_parser()).values()}.values()
    return {a.option_strings[0][2:]: a.dest for a in actions}


def test_every_field_is_settable_from_the_file_under_its_flag_name(tmp_path):
    flags = _flag_fields()
    assert set(EVERY_FIELD) == set(flags)  # A new field needs its flag here, and in the file.
    assert set(flags.values()) == set(_field_values(TrainConfig()))
    for suffix, text in ((".toml", _toml(EVERY_FIELD)), (".yaml", yaml.safe_dump(EVERY_FIELD))):
        path = tmp_path / f"run{suffix}"
        path.write_text(text)
        _, _, config = parse_config([f"--config={path}"])
        got = _field_values(config)
        for flag, field in flags.items():
            want = EVERY_FIELD[flag]
            want = tuple(want) if isinstance(got[field], tuple) else want
            assert got[field] == want, (suffix, flag)


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        "seq-len = 64\nlr = 1e-2\nmodel-override = {num_layers = 2, head_dim = 16}\nquiet = true\n"
    )
    argv = [f"--config={path}", "--seq-len=32", "--model-override=num_layers=1", "--no-quiet"]
    _, _, config = parse_config(argv)
    assert config.seq_len == 32 and config.learning_rate == 1e-2 and not config.quiet
    assert config.model_overrides == {"num_layers": 1, "head_dim": 16}


def test_a_run_from_a_config_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    overrides = dict(kv.split("=", 1) for kv in (f[len("--model-override=") :] for f in TINY_FLAGS))
    values = {"seq-len": 32, "batch-size": 4, "eval-batches": 2, "steps": 2, "log-every": 1}
    values["model-override"] = {k: int(v) for k, v in overrides.items()}
    path.write_text(yaml.safe_dump({**values, "out-dir": str(tmp_path / "run")}))
    assert main([f"--config={path}", "--quiet"]) == 0
    assert sorted(train_losses(tmp_path / "run" / "metrics.jsonl")) == [1, 2]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())["config"]
    assert saved["model_overrides"]["num_layers"] == 1 and saved["seq_len"] == 32
    capsys.readouterr()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("seq_len = 64\n", "did you mean 'seq-len'"),
        ("sequence = 64\n", "unknown key 'sequence'"),
        ('steps = "many"\n', "--steps"),
        ("quiet = 1\n", "quiet must be true or false"),
        ("model-override = 3\n", "model-override must be a table"),
        ("seq-len = [1, 2]\n", "seq-len takes one value"),
        ("seq-len = \n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, named):
    path = tmp_path / "run.toml"
    path.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([f"--config={path}", f"--out-dir={out}"])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"lbw-train: error: --config {path}: ") and named in lines[0]
    assert not out.exists()


def test_a_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([f"--config={tmp_path / 'nope.toml'}"])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "cannot read it" in lines[0], lines
