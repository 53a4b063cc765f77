"""``--init-from DIR`` takes the model from the checkpoint's ``config.json`` (``--model`` is then
optional, and a conflicting one is a one-line error), and ``--seq-len`` is checked against the
model's ``max_position_embeddings``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from lbw import models
from lbw.train import TrainConfig, build_model
from lbw.train.cli import main

FLAGS = ["--batch-size=4", "--eval-batches=2", "--log-every=1", "--quiet", "--steps=1"]
SHAPE = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    max_position_embeddings=64,
)
LAYOUTS = {
    "qwen2": dict(arch="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "llama": dict(arch="llama", qkv_bias=False, tie_embeddings=False, rope_theta=1e4),
}


def _hf_folder(tmp_path, layout: str):
    """A tiny Hugging Face-format checkpoint of ``layout`` (Qwen2 or LLaMA)."""
    config = models.ModelConfig(name=layout, **SHAPE, **LAYOUTS[layout])
    folder = tmp_path / f"hf-{layout}"
    models.save_pretrained(models.Decoder(config, rngs=nnx.Rngs(1)), folder)
    return folder


def _run(capsys, args) -> tuple[int, list[str]]:
    try:
        status = main(args)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("layout", ["qwen2", "llama"])
def test_init_from_takes_the_model_from_config_json(tmp_path, capsys, layout):
    folder = _hf_folder(tmp_path, layout)
    config = TrainConfig(init_from=str(folder), seq_len=32)
    assert config.model is None
    model, _ = build_model(config, models.ByteTokenizer.vocab_size)
    saved = models.load_pretrained(folder)
    assert model.config == dataclasses.replace(saved.config, name=folder.name)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(saved, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))

    # A --model whose architecture differs: one line that names the fields and the fix.
    out = tmp_path / "run"
    args = [*FLAGS, "--seq-len=32", f"--init-from={folder}", f"--out-dir={out}"]
    status, err = _run(capsys, [*args, "--model=tiny_qwen2_5_3b"])
    assert status == 2 and len(err) == 1 and err[0].startswith("lbw-train: error: "), err
    assert "hidden_size: checkpoint 32, model 128" in err[0] and "drop --model" in err[0]
    assert not out.exists()


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_a_run_from_a_checkpoint_without_model(tmp_path, capsys):
    folder = _hf_folder(tmp_path, "qwen2")
    out = tmp_path / "run"
    args = [*FLAGS, "--seq-len=32", f"--init-from={folder}", f"--out-dir={out}"]
    status, err = _run(capsys, [*args, f"--export-to={tmp_path / 'export'}"])
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == folder.name and summary["config"]["model"] is None
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    written = json.loads((folder / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        assert exported[key] == written[key], key


def test_seq_len_beyond_max_position_embeddings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    status, err = _run(capsys, [*FLAGS, "--seq-len=100000", f"--out-dir={out}"])
    assert status == 2 and len(err) == 1, err
    assert "--seq-len 100000" in err[0] and "max_position_embeddings 2048" in err[0]
    assert not out.exists()  # No empty metrics.jsonl left behind.
    folder = _hf_folder(tmp_path, "llama")  # max_position_embeddings 64.
    status, err = _run(
        capsys, [*FLAGS, "--seq-len=65", f"--init-from={folder}", f"--out-dir={out}"]
    )
    assert status == 2 and "max_position_embeddings 64" in err[0], err
    assert not out.exists()
