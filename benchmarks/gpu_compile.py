"""What governance costs on a GPU, measured without one: compile for an H100, count the kernels.

    pip install -e ".[train,gpu-aot]"      # the CUDA compiler plugin (no driver needed)
    python -m benchmarks.gpu_compile --out results/benchmarks/gpu-compile.md

The CUDA plugin compiles for a GPU described by a ``GpuTargetConfig`` (``benchmarks/targets/
h100.txtpb``: an H100 80GB HBM3) on a CPU machine (``jax.experimental.topologies``). Every
program is compiled from abstract shapes with the state and parameters donated, as a training
loop runs it, so nothing is allocated. For each optimizer, at a model preset (the Qwen2.5-0.5B
one by default), unrolled and scanned layouts:

1. the optimizer step (update + apply) on the preset's parameter tree;
2. the whole train step (forward, backward, optimizer) on a batch of ``--batch`` sequences of
   ``--seq-len`` tokens, bf16 compute.

Printed per program: kernels, reduction kernels, scalar-only kernels (every output a single
element), HLO bytes per parameter (each kernel's operands and outputs), and an estimated time:
a roofline per kernel (bytes at the card's bandwidth, matrix flops at its bf16 peak) plus a fixed
cost per kernel launch (``--kernel-us``; 10 µs fits what clipping and the governor added per
kernel on the measured H200 run), each as a ratio to AdamW's. The estimate is a model, not a
measurement: it leaves out overlap, caches and occupancy; its ratios are what the cost targets
are checked on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import hlo_kernels
from lbw import models
from lbw.train.config import TrainConfig
from lbw.train.optimizers import build_optimizer

TARGET = Path(__file__).resolve().parent / "targets" / "h100.txtpb"
H100_BF16_FLOPS = 989e12  # Dense bf16 tensor-core peak of an H100 SXM.

# Label -> TrainConfig overrides of the optimizer.
OPTIMIZERS = {
    "adamw": dict(optimizer="adamw"),
    "clip(1.0)+adamw": dict(optimizer="adamw+clip", clip_threshold=1.0),
    "lbw(reference)": dict(optimizer="lbw", policy="reference"),
    "lbw(governor)": dict(optimizer="lbw", policy="governor"),
    "lbw+clip(governor)": dict(optimizer="lbw+clip", clip_threshold=1.0),
    # The opt-in trust-ratio floor over the default (results/governor-probe/v5.md).
    "lbw+clip(governor+boost)": dict(
        optimizer="lbw+clip", clip_threshold=1.0, optimizer_args={"max_boost": 3.0, "release": 0.03}
    ),
    "sgg": dict(optimizer="sgg"),
}


def gpu_device(target: Path = TARGET):
    """The first device of a one-GPU topology described by ``target`` (no GPU needed)."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target.read_text(), topology="1x1x1"
    )
    return topology.devices[0]


def bandwidth_of(target: Path = TARGET) -> float:
    for line in target.read_text().splitlines():
        if line.strip().startswith("memory_bandwidth:"):
            return float(line.split(":")[1])
    raise ValueError(f"{target} names no memory_bandwidth")


def abstract_model(config: models.ModelConfig):
    """``(graphdef, abstract params, abstract rest)`` of the decoder, without allocating."""
    model = nnx.eval_shape(lambda: models.Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _on(device, tree):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def make_optimizer(overrides: dict) -> optax.GradientTransformationExtraArgs:
    config = TrainConfig(learning_rate=1e-3, steps=1000, warmup_steps=100, **overrides)
    return build_optimizer(config, lambda count: 1e-3 * jnp.ones([], jnp.float32))


def optimizer_step_text(tx, params, device) -> str:
    """The optimized HLO of ``(params, state, grads, loss) -> (params, state)``, donated."""
    state = jax.eval_shape(tx.init, params)

    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    loss = jax.ShapeDtypeStruct((), jnp.float32)
    args = _on(device, (params, state, params, loss))
    return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()


def train_step_text(tx, graphdef, params, rest, device, batch: int, seq_len: int) -> str:
    """The optimized HLO of a whole train step on ``[batch, seq_len + 1]`` tokens, donated."""
    state = jax.eval_shape(tx.init, params)

    def step(params, state, tokens):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            logits = model(tokens[:, :-1])
            return models.cross_entropy_loss(logits, tokens[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    args = _on(device, (params, state, tokens))
    return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()


@dataclasses.dataclass
class Row:
    program: str
    layout: str
    method: str
    counts: hlo_kernels.Counts
    compile_s: float


def measure(args) -> tuple[list[Row], int]:
    device = gpu_device(Path(args.target))
    bandwidth = bandwidth_of(Path(args.target))
    rows, num_params = [], 0
    for layout in args.layouts:
        config = dataclasses.replace(
            models.get_config(args.model), scan_layers=layout == "scanned", dtype=jnp.bfloat16
        )
        graphdef, params, rest = abstract_model(config)
        num_params = sum(x.size for x in jax.tree.leaves(params))
        for method in args.methods:
            # Scanned, the guard limits each stacked layer (models.stacked_layers).
            tx = make_optimizer(dict(OPTIMIZERS[method], scan_layers=layout == "scanned"))
            for program in args.programs:
                start = time.perf_counter()
                if program == "optimizer step":
                    text = optimizer_step_text(tx, params, device)
                else:
                    text = train_step_text(
                        tx, graphdef, params, rest, device, args.batch, args.seq_len
                    )
                seconds = time.perf_counter() - start
                counts = hlo_kernels.count(text, bandwidth=bandwidth, peak_flops=H100_BF16_FLOPS)
                rows.append(Row(program, layout, method, counts, seconds))
                print(
                    f"{program:14s} {layout:8s} {method:20s} kernels {counts.kernels:5d} "
                    f"bytes/param {counts.bytes / num_params:6.1f} "
                    f"est {counts.estimated_s(args.kernel_us * 1e-6) * 1e3:8.2f} ms "
                    f"(compile {seconds:.1f} s)",
                    flush=True,
                )
    return rows, num_params


def table(rows: list[Row], num_params: int, kernel_s: float) -> list[str]:
    lines = []
    for program in dict.fromkeys(r.program for r in rows):
        for layout in dict.fromkeys(r.layout for r in rows):
            group = [r for r in rows if r.program == program and r.layout == layout]
            if not group:
                continue
            base = next((r for r in group if r.method == "adamw"), group[0]).counts
            lines += [
                f"### {program}, {layout} layers",
                "",
                "| method | kernels | × adamw | reduction kernels | scalar-only kernels "
                "| copy kernels | HLO bytes / param | × adamw | est. ms | × adamw | compile s |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in group:
                c = r.counts
                est, base_est = c.estimated_s(kernel_s), base.estimated_s(kernel_s)
                lines.append(
                    f"| {r.method} | {c.kernels:,} | {c.kernels / base.kernels:.2f} "
                    f"| {c.reduction_kernels:,} | {c.scalar_kernels:,} | {c.copy_kernels:,} "
                    f"| {c.bytes / num_params:.1f} | {c.bytes / base.bytes:.3f} "
                    f"| {est * 1e3:.2f} | {est / base_est:.3f} | {r.compile_s:.0f} |"
                )
            lines.append("")
    return lines


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2_5_0_5b")
    parser.add_argument("--layouts", default="unrolled,scanned", type=lambda s: s.split(","))
    parser.add_argument("--methods", default=",".join(OPTIMIZERS), type=lambda s: s.split(","))
    parser.add_argument(
        "--programs", default="optimizer step,train step", type=lambda s: s.split(",")
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--kernel-us", type=float, default=10.0)
    parser.add_argument("--target", default=str(TARGET))
    parser.add_argument("--out", default=None, help="write the tables to this Markdown file")
    args = parser.parse_args(argv)
    # Before any backend starts: the CUDA plugin's driver checks stay off on a CPU machine.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    unknown = sorted(set(args.methods) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(OPTIMIZERS)}")
    start, commit = time.perf_counter(), _commit()  # The code the figures come from.
    rows, num_params = measure(args)
    command = "python -m benchmarks.gpu_compile " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        f"# GPU cost without a GPU: {args.model} ({num_params:,} parameters), compiled for an H100",
        "",
        f"Command: `{command.strip()}`. Commit: {commit}. "
        f"Date: {datetime.date.today().isoformat()}.",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, no GPU; "
        f"JAX {jax.__version__}, "
        f"CUDA plugin compiling for `{Path(args.target).name}` (3.35 TB/s, bf16 peak "
        f"{H100_BF16_FLOPS / 1e12:.0f} TFLOP/s); train step: batch {args.batch}×{args.seq_len}, "
        f"bf16 compute, float32 parameters; est. ms = Σ roofline + kernels × {args.kernel_us:g} "
        f"µs. Wall: {time.perf_counter() - start:.0f} s.",
        "",
    ]
    text = "\n".join(header + table(rows, num_params, args.kernel_us * 1e-6))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
