"""Throughput of the ``lbw-train`` loop against a minimal hand-written JAX loop.

Both loops train the same model preset on the same batches (the shipped WikiText-2 sample,
byte-level tokens, the same seeded order) with the same optimizer and learning-rate schedule:

* ``lbw-train``: ``train.train(TrainConfig(...))``, i.e. everything the CLI runs (data stream,
  ``@nnx.jit`` step with the NaN check, telemetry line every ``--log-every`` steps with
  ``lbw_optax.telemetry``); its tokens/s is the summary's steady-state figure, which excludes the
  first (compiling) step and the final evaluation;
* minimal: ``nnx.split`` once, then a ``jax.jit`` step over ``(params, opt_state, tokens)`` with
  donated buffers, ``jax.value_and_grad``, ``tx.update(..., value=loss)`` and
  ``optax.apply_updates``, timed from after its compiling step to a final
  ``block_until_ready``.

The two run alternately ``--repeats`` times in one process, in ABBA order; the script prints
each side's median tokens/s with its min–max and the ratio of the medians
(``lbw-train / minimal``).

    python -m benchmarks.loop_overhead
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lbw import models
from lbw.train import (
    Batches,
    TrainConfig,
    build_model,
    load_text,
    tokenize,
    train,
)


def minimal_loop(config: TrainConfig, batches: list) -> float:
    """Tokens/s of a hand-written jitted loop over ``batches`` (the first one compiles)."""
    model, _ = build_model(config, models.ByteTokenizer.vocab_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = config.optim.build(config.steps, faults=config.faults).tx  # The loop's optimizer.
    # Fresh buffers: init may share one constant between state leaves, which donation forbids.
    opt_state = jax.tree.map(jnp.copy, tx.init(params))

    def step(params, opt_state, tokens):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
            return models.cross_entropy_loss(logits, tokens[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state, loss = step(params, opt_state, jnp.asarray(batches[0]))
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for batch in batches[1:]:
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
    jax.block_until_ready((params, opt_state, loss))
    elapsed = time.perf_counter() - start
    return (len(batches) - 1) * batches[0][:, 1:].size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_qwen2_5_3b", help="model preset")
    parser.add_argument("--optimizer", default="lbw", help="registered optimizer name")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="steps per repeat (1 compiles)")
    parser.add_argument("--log-every", type=int, default=10, help="lbw-train telemetry interval")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        config = TrainConfig(
            model=args.model,
            optimizer=args.optimizer,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            steps=args.steps,
            log_every=args.log_every,
            eval_batches=1,
            out_dir=out_dir,
            overwrite=True,  # Every repeat trains afresh in the same folder.
            quiet=True,
        )
        tokens = tokenize(load_text(config).train, models.ByteTokenizer())
        stream = Batches(tokens, seq_len=config.seq_len, batch_size=config.batch_size, seed=0)
        batches = [stream.next() for _ in range(config.steps)]

        loop, hand = [], []
        for repeat in range(args.repeats):  # ABBA order: neither side always runs first.
            if repeat % 2 == 0:
                loop.append(train(config)["tokens_per_s"])
                hand.append(minimal_loop(config, batches))
            else:
                hand.append(minimal_loop(config, batches))
                loop.append(train(config)["tokens_per_s"])

    def stats(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    result = {
        "model": args.model,
        "optimizer": args.optimizer,
        "batch": [args.batch_size, args.seq_len],
        "steps_timed_per_repeat": args.steps - 1,
        "repeats": args.repeats,
        "lbw_train_tokens_per_s": stats(loop),
        "minimal_tokens_per_s": stats(hand),
        "ratio": statistics.median(loop) / statistics.median(hand),
        "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}",
    }
    for name, key in (("lbw-train", "lbw_train_tokens_per_s"), ("minimal", "minimal_tokens_per_s")):
        s = result[key]
        print(f"{name:>9}: {s['median']:9.0f} tokens/s (min {s['min']:.0f}, max {s['max']:.0f})")
    print(f"    ratio: {result['ratio']:.3f} (lbw-train / minimal, medians)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
