"""One training run of the governor with chosen knobs: the probe used to pick its defaults.

Usage: ``python benchmarks/governor_probe.py LR '{"damping": 0.2}' TAG``; prints the eval
perplexity, the mean logged scale and the control counters. Every other setting is fixed:
``tiny_qwen2_5_3b``, seq 64, batch 8, 200 steps, warm-up 20, cosine, seed 0, the shipped data.
"""

import json
import sys

import lbw_optax
from train.config import TrainConfig
from train.loop import train
from train.optimizers import register_optimizer


def main() -> None:
    lr, knobs, tag = float(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

    @register_optimizer("governor-probe", guarded=True)
    def _probe(config, schedule):
        policy = lbw_optax.governor_policy(**knobs)
        return lbw_optax.lbw_adamw(schedule, weight_decay=config.weight_decay, policy=policy)

    config = TrainConfig(
        optimizer="governor-probe",
        learning_rate=lr,
        steps=200,
        seq_len=64,
        batch_size=8,
        warmup_steps=20,
        log_every=10,
        quiet=True,
        out_dir=f"runs/governor-probe/{tag}_{lr}",
        overwrite=True,  # A probe re-run replaces the last one.
    )
    summary = train(config)
    with open(f"{config.out_dir}/metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    scales = [d["telemetry"]["scale"] for d in lines if d.get("kind") == "train"]
    t = summary["telemetry"]
    print(
        tag,
        lr,
        round(summary["eval_perplexity"], 3),
        "mean scale",
        round(sum(scales) / len(scales), 3),
        {k: t.get(k) for k in ("control_active_steps", "regime_switches")},
    )


if __name__ == "__main__":
    main()
