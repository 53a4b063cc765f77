"""The probe used to choose the governor's defaults: quick-suite runs of policy variants.

Usage::

    python -m benchmarks.governor_probe VARIANTS.json [--lrs 1e-3,3e-3,1e-2,3e-2] [--seeds 0,1]

``VARIANTS.json`` maps a variant name to ``{"optimizer": NAME, "knobs": {...}, "config": {...}}``:
``optimizer`` is a registered ``lbw-train`` optimizer, or ``"governor"`` to build
``lbw_optax.guard(adamw, policy=lbw_optax.governor_policy(**knobs))`` (over global-norm
clipping at ``"clip"``, then AdamW, when the variant has that key; over the registered
optimizer ``"inner"`` instead of AdamW when it has that one); ``config`` overrides
:class:`~train.config.TrainConfig` fields, ``model`` and ``model_overrides`` included.
Unless overridden, every run uses the quick suite's setting (the shipped WikiText-2 sample, the
2-layer tiny Qwen2.5-3B-style preset, 200 steps of 8×64 tokens, warm-up 20, cosine). Each run
prints its final eval perplexity and mean logged effective scale; the last lines are a table of
means over seeds per variant and learning rate.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import statistics

from lbw.train.stress import QUICK_TRAIN


def _run(name: str, variant: dict, lr: float, seed: int, out: str) -> tuple:
    import optax

    import lbw_optax
    from lbw.train.config import TrainConfig
    from lbw.train.loop import train
    from lbw.train.optimizers import available_optimizers, build_optimizer, register_optimizer

    optimizer = variant.get("optimizer", "governor")
    if optimizer == "governor":
        optimizer = f"probe-{name}"
        knobs = variant.get("knobs", {})
        if optimizer not in available_optimizers():

            @register_optimizer(optimizer, guarded=True)
            def _probe(config, schedule):
                policy = lbw_optax.governor_policy(**knobs)
                inner = optax.adamw(schedule, **config.adamw_args)  # The built-in "adamw".
                if "inner" in variant:  # A registered optimizer, e.g. "mechanic".
                    inner_config = dataclasses.replace(config, optimizer=variant["inner"])
                    inner = build_optimizer(inner_config, schedule)
                if "clip" in variant:  # What a practitioner runs: clipping, then AdamW.
                    inner = optax.chain(optax.clip_by_global_norm(variant["clip"]), inner)
                return lbw_optax.guard(inner, policy=policy)

    fields = dict(QUICK_TRAIN, eval_every=200, model_overrides={"num_layers": 2})
    fields.update(variant.get("config", {}))
    config = TrainConfig(
        model=fields.pop("model", "tiny_qwen2_5_3b"),
        optimizer=optimizer,
        learning_rate=lr,
        seed=seed,
        quiet=True,
        out_dir=os.path.join(out, f"{name}_{lr:g}_s{seed}"),
        overwrite=True,  # A probe re-run replaces the last one.
        **fields,
    )
    try:
        summary = train(config)
    except Exception as error:  # A diverged unguarded run is a result, not a crash.
        return name, lr, seed, float("nan"), None, type(error).__name__
    return name, lr, seed, summary["eval_perplexity"], _mean_logged_scale(config.out_dir), ""


def _mean_logged_scale(run_dir: str) -> float | None:
    """The mean of the guard's effective scale over the logged steps (every ``log_every``);
    unlike ``1 − control_energy / steps``, right for a boosted scale above 1 too."""
    scales = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            tel = record.get("telemetry") or {}
            if record.get("kind") == "train" and "effective_scale" in tel:
                scales.append(tel["effective_scale"])
    return statistics.mean(scales) if scales else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="runs/governor-probe")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with open(args.variants) as f:
        variants = json.load(f)
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [(n, v, lr, s) for n, v in variants.items() for lr in lrs for s in seeds]
    results = []
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_run, *job, args.out) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results.append(r)
            print(*r, flush=True)
    print("\nvariant | " + " | ".join(f"{lr:g}" for lr in lrs) + " | mean")
    for name in variants:
        cells = []
        for lr in lrs:
            ppl = [r[3] for r in results if r[0] == name and r[1] == lr]
            sc = [r[4] for r in results if r[0] == name and r[1] == lr and r[4] is not None]
            cell = f"{statistics.mean(ppl):.2f}"
            if sc:
                cell += f" ({statistics.mean(sc):.2f})"
            cells.append(cell)
        grid = statistics.mean(r[3] for r in results if r[0] == name)
        print(f"{name} | " + " | ".join(cells) + f" | {grid:.2f}", flush=True)


if __name__ == "__main__":
    main()
