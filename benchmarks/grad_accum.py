"""Memory and time of gradient accumulation (``--grad-accum K``) at a fixed batch per update.

For each K, ``lbw-train``'s jitted step (``train.make_train_step``, the optimizer of
``--optimizer`` wrapped in ``lbw_optax.accumulate_gradients`` for K > 1) runs K micro-batches of
``--batch / K`` sequences per optimizer update. The script prints, per K:

* XLA's memory analysis of the compiled step: ``temp`` (activations and workspace of one
  micro-step), ``args`` (parameters, optimizer state and the batch, accumulated gradients
  included) and their sum, the step's footprint;
* the median time of one optimizer update (its K micro-steps), timed alternately for all K in
  one process (``--repeats`` rounds, each timing ``--updates`` updates per K, the order
  reversed every other round), after a compiling warm-up.

    python -m benchmarks.grad_accum            # --remat: the same with --remat
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lbw import models
from lbw.train import TrainConfig, build_model, make_optimizer, make_train_step


def build(config: TrainConfig):
    """The model, optimizer and jitted step of ``config``, as the loop builds them."""
    model, wrt = build_model(config, models.ByteTokenizer.vocab_size)
    optimizer, _ = make_optimizer(config, model, wrt)
    return model, optimizer, make_train_step(config, wrt)


def memory(step, model, optimizer, tokens) -> dict[str, int]:
    """XLA's memory analysis of ``step`` compiled for ``tokens``, in bytes."""
    analysis = step.lower(model, optimizer, tokens).compile().memory_analysis()
    temp, args = analysis.temp_size_in_bytes, analysis.argument_size_in_bytes
    return {"temp": temp, "args": args, "total": temp + args}


def time_updates(step, model, optimizer, micro: list[jax.Array], updates: int) -> float:
    """Seconds per optimizer update over ``updates`` updates of ``len(micro)`` micro-steps."""
    start = time.perf_counter()
    for _ in range(updates):
        out = [step(model, optimizer, tokens) for tokens in micro]
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_qwen2_5_3b", help="model preset")
    parser.add_argument("--optimizer", default="lbw", help="registered optimizer name")
    parser.add_argument("--batch", type=int, default=16, help="sequences per update")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="values of K")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--remat", action="store_true", help="recompute block activations")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (args.batch, args.seq_len + 1), dtype=np.int32)
    runs = {}
    for k in args.ks:
        config = TrainConfig(
            model=args.model,
            optimizer=args.optimizer,
            batch_size=args.batch // k,
            grad_accum=k,
            seq_len=args.seq_len,
            remat=args.remat,
        )
        model, optimizer, step = build(config)
        micro = [jnp.asarray(b) for b in np.split(tokens, k)]
        mem = memory(step, model, optimizer, micro[0])
        time_updates(step, model, optimizer, micro, 1)  # Compiles.
        runs[k] = (step, model, optimizer, micro, mem, [])
    for r in range(args.repeats):
        for k in args.ks if r % 2 == 0 else reversed(args.ks):
            step, model, optimizer, micro, _, times = runs[k]
            times.append(time_updates(step, model, optimizer, micro, args.updates))

    print(
        f"{args.model}, {args.optimizer}, {args.batch} x {args.seq_len} tokens per update, "
        f"remat {args.remat}; "
        f"{platform.machine()} {jax.default_backend()}, JAX {jax.__version__}\n"
    )
    header = ("K", "micro-batch", "XLA temp", "XLA args", "temp + args", "time per update")
    print(f"| {' | '.join(header)}, median (min-max) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(runs[args.ks[0]][5])
    for k, (*_, mem, times) in runs.items():
        median = statistics.median(times)
        mb = {key: f"{value / 2**20:.1f} MiB" for key, value in mem.items()}
        print(
            f"| {k} | {args.batch // k} | {mb['temp']} | {mb['args']} | {mb['total']} | "
            f"{1e3 * median:.0f} ms ({1e3 * min(times):.0f}-{1e3 * max(times):.0f}), "
            f"{median / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
