"""Shared settings of the training-loop tests: a very small model on short sequences."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lbw.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent

# 1 layer, hidden 64: a few milliseconds per step on a laptop CPU.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 1,
    "head_dim": 16,
}
TINY_FLAGS = [f"--model-override={k}={v}" for k, v in TINY.items()]


def tiny_config(out_dir, **overrides) -> TrainConfig:
    values = dict(
        model="tiny_qwen2_5_3b",
        model_overrides=TINY,
        seq_len=32,
        batch_size=4,
        steps=20,
        log_every=1,
        eval_batches=2,
        out_dir=str(out_dir),
        quiet=True,
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(path) if r["kind"] == "train"}


def cli_env(cache_dir) -> dict[str, str]:
    """Environment of ``python -m lbw.train.cli`` subprocesses: the repository on the path and a
    persistent compilation cache shared by the test's subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


PYTHON = sys.executable


def load_checkpoint(config: TrainConfig, step: int):
    """The ``(state, meta)`` saved at ``step`` by the run of ``config``."""
    from flax import nnx

    from lbw.train import Checkpointer, build_model, make_optimizer

    model, wrt = build_model(config, 259)
    optimizer, _ = make_optimizer(config, model, wrt)  # As the run built it.
    abstract = {"params": nnx.state(model, wrt), "optimizer": nnx.state(optimizer)}
    checkpointer = Checkpointer(Path(config.out_dir) / "checkpoints", keep=100, every=1)
    try:
        return checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
