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

from lbw.train import train
from tests.train_helpers import read_jsonl, tiny_config

STEPS = 20
RESUME_STEP = 10
RESUME_MESH = "data=8,fsdp=1"
TRANSFORM_STEPS = 12


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


def transform_telemetry(mesh: str, steps: int = TRANSFORM_STEPS) -> dict:
    """The guard + SGG transformation alone, fed the same gradients and losses on ``mesh``
    (``""``: one device): its per-step telemetry. Isolates the transformation's statistics from
    the gradients' rounding, which differs with the layout."""
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import lbw_optax
    from lbw.train import build_model, build_optimizer, learning_rate_schedule, sharding

    cfg = config("unused", mesh, steps=steps)
    model, wrt = build_model(cfg, 259)
    params = nnx.state(model, wrt)
    tx = build_optimizer(cfg, learning_rate_schedule(cfg))
    rng = np.random.default_rng(0)
    place = (lambda t: t) if not mesh else (lambda t: sharding.shard(t, sharding.make_mesh(mesh)))
    params = place(params)
    state = place(tx.init(params))
    losses = 3.0 + rng.random(steps)
    losses[steps // 2] = 30.0  # A loss spike, so the regime logic runs too.

    @jax.jit
    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    out = {}
    for k in range(steps):
        grads = jax.tree.map(
            lambda p: jnp.asarray(1e-3 + rng.standard_normal(p.shape) * 1e-2, p.dtype), params
        )
        params, state = step(params, state, place(grads), jnp.float32(losses[k]))
        tel = jax.device_get(lbw_optax.telemetry(state))
        out[k + 1] = {name: np.asarray(v).item() for name, v in tel.items() if np.ndim(v) == 0}
    return out


def main(out: str, *meshes: str) -> None:
    out = Path(out)
    results = {"devices": jax.device_count()}
    results["transform"] = {m: transform_telemetry(m) for m in ("", *meshes)}
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
