"""Tokens per second of one jitted train step (forward + backward + AdamW) per model preset.

Every preset is measured in the same process, one after the other, with the same batch shape:
build the model, compile the step, run warm-up steps, then time ``--steps`` steps one by one
(each waits for its loss) and report the median throughput with its min–max.

    python benchmarks/model_step.py                         # the tiny presets, full and LoRA
    python benchmarks/model_step.py --presets qwen2_5_0_5b --dtype bfloat16 --batch 8 --seq 512

Modes: ``full`` trains every base weight (``nnx.Param``); ``lora`` adds rank-8 adapters on
q, k, v, o and trains only them (``nnx.LoRAParam``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models


def make_step(wrt):
    """A jitted train step that returns only the loss."""

    def loss_fn(model, tokens):
        return models.cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])

    @nnx.jit
    def step(model, optimizer, tokens):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))
        loss, grads = grad_fn(model, tokens)
        optimizer.update(model, grads, value=loss)
        return loss

    return step


def measure(config: models.ModelConfig, mode: str, args) -> dict:
    model = models.Decoder(config, rngs=nnx.Rngs(0))
    wrt = nnx.Param
    if mode == "lora":
        models.add_lora(model, rank=8, alpha=16.0, rngs=nnx.Rngs(1))
        wrt = models.LORA_PARAMS
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=wrt)
    step = make_step(wrt)
    tokens = jax.random.randint(
        jax.random.key(0), (args.batch, args.seq + 1), 0, config.vocab_size, jnp.int32
    )

    start = time.perf_counter()
    step(model, optimizer, tokens).block_until_ready()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step(model, optimizer, tokens).block_until_ready()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(model, optimizer, tokens).block_until_ready()
        times.append(time.perf_counter() - start)

    tokens_per_step = args.batch * args.seq
    trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    return dict(
        preset=config.name,
        mode=mode,
        params=models.count_params(config),
        trained=trained,
        compile_s=compile_s,
        median=tokens_per_step / statistics.median(times),
        low=tokens_per_step / max(times),
        high=tokens_per_step / min(times),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(models.TINY_PRESETS))
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs visible")
    print(
        f"batch {args.batch} × seq {args.seq} = {args.batch * args.seq} tokens/step, "
        f"{args.warmup} warm-up + {args.steps} timed steps, compute dtype {args.dtype}, "
        "AdamW\n"
    )
    header = (
        f"{'preset':<22}{'mode':<6}{'params':>14}{'trained':>14}"
        f"{'tokens/s (median)':>19}{'min–max':>21}{'compile s':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in args.presets:
        config = models.get_config(name, dtype=jnp.dtype(args.dtype))
        for mode in args.modes:
            r = measure(config, mode, args)
            spread = f"{r['low']:,.0f}–{r['high']:,.0f}"
            print(
                f"{r['preset']:<22}{r['mode']:<6}{r['params']:>14,}{r['trained']:>14,}"
                f"{r['median']:>19,.0f}{spread:>21}{r['compile_s']:>11.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
