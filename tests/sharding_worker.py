"""Runs of the tiny model on several meshes in one process, for ``tests/test_sharding.py``.

Run as ``python -m tests.sharding_worker OUT_DIR [MESH ...]`` with 8 fake CPU devices in the
environment (``XLA_FLAGS=--xla_force_host_platform_device_count=8``): trains the reference on one
device and the same run on every given mesh, resumes the first mesh's checkpoint of step 10 on
``data=8,fsdp=1``, and prints one JSON object of each run's per-step losses and telemetry.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax

from tests.train_helpers import read_jsonl, tiny_config
from train import train

STEPS = 20
RESUME_STEP = 10
RESUME_MESH = "data=8,fsdp=1"


def config(out_dir, mesh: str, **overrides):
    values = dict(optimizer="lbw+sgg", batch_size=8, steps=STEPS, mesh=mesh, eval_every=10)
    values.update(overrides)
    return tiny_config(out_dir, **values)


def lines(out_dir: Path) -> dict:
    records = read_jsonl(out_dir / "metrics.jsonl")
    train_lines = [r for r in records if r["kind"] == "train"]
    return {
        "losses": {r["step"]: r["loss"] for r in train_lines},
        "telemetry": {r["step"]: r["telemetry"] for r in train_lines},
        "eval": {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"},
    }


def main(out: str, *meshes: str) -> None:
    out = Path(out)
    results = {"devices": jax.device_count()}
    train(config(out / "one", ""))
    results["one"] = lines(out / "one")
    for i, mesh in enumerate(meshes):
        every = RESUME_STEP if i == 0 else 0
        train(config(out / mesh, mesh, checkpoint_every=every))
        results[mesh] = lines(out / mesh)
    if meshes:
        resumed = out / "resumed"
        shutil.copytree(out / meshes[0], resumed)
        train(
            config(
                resumed,
                RESUME_MESH,
                checkpoint_every=RESUME_STEP,
                resume=True,
                resume_step=RESUME_STEP,
            )
        )
        results["resumed"] = lines(resumed)
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
