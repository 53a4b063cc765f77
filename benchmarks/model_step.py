"""Tokens per second of one jitted train step (forward + backward + AdamW) per model preset.

Every preset is measured in the same process with the same batch shape: build each model,
compile its step and run warm-up steps; then time the presets in interleaved rounds (``--rounds``
rounds of ``--steps`` steps each, every step waiting for its loss), so that background load falls
on all of them alike, and report the median throughput with its min–max.

    python -m benchmarks.model_step                         # the tiny presets, full and LoRA
    python -m benchmarks.model_step --presets qwen2_5_0_5b --dtype bfloat16 --batch 8 --seq 512

Modes: ``full`` trains every base weight (``nnx.Param``); ``lora`` adds rank-8 adapters on
q, k, v, o and trains only them (``nnx.LoRAParam``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lbw import models


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


class Run:
    """One (preset, mode) pair: its model, optimizer, compiled step and the step times so far."""

    def __init__(self, config: models.ModelConfig, mode: str, args):
        self.config, self.mode = config, mode
        self.model = models.Decoder(config, rngs=nnx.Rngs(0))
        self.wrt = nnx.Param
        if mode == "lora":
            models.add_lora(self.model, rank=8, alpha=16.0, rngs=nnx.Rngs(1))
            self.wrt = models.LORA_PARAMS
        self.optimizer = nnx.Optimizer(self.model, optax.adamw(1e-4), wrt=self.wrt)
        self.step = make_step(self.wrt)
        shape = (args.batch, args.seq + 1)
        self.tokens = jax.random.randint(jax.random.key(0), shape, 0, config.vocab_size)
        self.tokens_per_step = args.batch * args.seq
        self.times: list[float] = []

        start = time.perf_counter()
        self.run_step()
        self.compile_s = time.perf_counter() - start
        for _ in range(args.warmup):
            self.run_step()

    def run_step(self) -> float:
        start = time.perf_counter()
        self.step(self.model, self.optimizer, self.tokens).block_until_ready()
        return time.perf_counter() - start

    def time_steps(self, n: int) -> None:
        self.times.extend(self.run_step() for _ in range(n))

    def row(self) -> str:
        median = self.tokens_per_step / statistics.median(self.times)
        spread = (
            f"{self.tokens_per_step / max(self.times):,.0f}–"
            f"{self.tokens_per_step / min(self.times):,.0f}"
        )
        trained = sum(x.size for x in jax.tree.leaves(nnx.state(self.model, self.wrt)))
        return (
            f"{self.config.name:<22}{self.mode:<6}{models.count_params(self.config):>14,}"
            f"{trained:>14,}{median:>19,.0f}{spread:>21}{self.compile_s:>11.1f}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(models.TINY_PRESETS))
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per preset per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs visible, "
        f"load average {load}"
    )
    print(
        f"batch {args.batch} × seq {args.seq} = {args.batch * args.seq} tokens/step, "
        f"{args.warmup} warm-up steps, then {args.rounds} rounds of {args.steps} timed steps "
        f"per preset (interleaved), compute dtype {args.dtype}, AdamW\n"
    )
    runs = [
        Run(models.get_config(name, dtype=jnp.dtype(args.dtype)), mode, args)
        for name in args.presets
        for mode in args.modes
    ]
    for _ in range(args.rounds):
        for run in runs:
            run.time_steps(args.steps)

    header = (
        f"{'preset':<22}{'mode':<6}{'params':>14}{'trained':>14}"
        f"{'tokens/s (median)':>19}{'min–max':>21}{'compile s':>11}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        print(run.row())


if __name__ == "__main__":
    main()
