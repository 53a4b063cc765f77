"""Which tensors the governor's per-tensor limiter cuts in a training run, and when.

Usage::

    python -m benchmarks.limiter_tensors RUN_DIR [RUN_DIR ...] [--limit 0.035] [--anneal 0.5]

Reads a run folder written by ``lbw-train`` with the governor (its ``metrics.jsonl`` logs the
per-tensor norms at every ``log_every`` step; the suites' archives leave them out) and prints,
for each tensor that reached half the limit, how many logged steps the limiter cut it and its
largest relative update ``scale·‖u‖ / max(‖θ‖, floor·√n)`` before the cut. The limit in force is
recomputed as :func:`lbw_optax.governor_policy` does: ``limit · min(1, ‖u‖ / peak ‖u‖)^anneal``.
Several run folders (seeds of one cell) are summed. The tensors are named by building the run's
model (``summary.json``'s config) and flattening its trainable parameters in the guard's order.
"""

import argparse
import collections
import json
import os

FLOOR = 0.02  # governor_policy's param_floor default.


def tensor_names(model: str, model_overrides: dict | None = None) -> list[str]:
    """The names of ``model``'s non-empty parameters, in the order the guard senses them."""
    import jax
    from flax import nnx

    from lbw import models

    decoder = models.Decoder(models.get_config(model, **(model_overrides or {})), rngs=nnx.Rngs(0))
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(decoder, nnx.Param))[0]
    return [_path_name(path) for path, leaf in flat if leaf.size]


def _path_name(path) -> str:
    keys = (getattr(k, "key", getattr(k, "idx", k)) for k in path)
    return "/".join(str(k) for k in keys if str(k) not in (".value", "value"))


def limit_in_force(telemetry: dict, limit: float, anneal: float) -> float:
    """The annealed per-tensor limit of the logged step."""
    peak = telemetry.get("peak_update_norm")
    if not anneal or not isinstance(peak, int | float) or peak <= 0:
        return limit
    return limit * min(1.0, telemetry["update_norm"] / peak) ** anneal


def cuts(records: list[dict], *, limit: float, anneal: float, floor: float = FLOOR):
    """``(binds, peak_ratio, steps)``: per tensor index, the logged steps it was cut and its
    largest ratio before the cut, and the number of logged steps read."""
    binds, peak_ratio, steps = collections.Counter(), collections.defaultdict(float), 0
    for record in records:
        tel = record.get("telemetry") or {}
        if record.get("kind") != "train" or "tensor_update_norms" not in tel:
            continue
        steps += 1
        bound = limit_in_force(tel, limit, anneal)
        norms = zip(
            tel["tensor_update_norms"], tel["tensor_param_norms"], tel["tensor_sizes"], strict=True
        )
        for i, (update, param, size) in enumerate(norms):
            ratio = tel["scale"] * update / max(param, floor * size**0.5)
            peak_ratio[i] = max(peak_ratio[i], ratio)
            binds[i] += ratio > bound
    return binds, peak_ratio, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--limit", type=float, default=0.035)
    parser.add_argument("--anneal", type=float, default=0.5)
    args = parser.parse_args()
    total, peak, steps, names = collections.Counter(), collections.defaultdict(float), 0, None
    for run in args.runs:
        with open(os.path.join(run, "summary.json")) as f:
            config = json.load(f)["config"]
        names = names or tensor_names(config["model"], config.get("model_overrides"))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        binds, ratios, n = cuts(records, limit=args.limit, anneal=args.anneal)
        sensed = next(
            (r["telemetry"] for r in records if "tensor_sizes" in (r.get("telemetry") or {})),
            None,
        )
        if sensed is None:
            raise SystemExit(f"{run}: no per-tensor norms logged (not a governor run?)")
        logged = len(sensed["tensor_sizes"])
        if logged != len(names):
            raise SystemExit(
                f"{run}: {logged} sensed tensors, but the model has {len(names)} (a scanned "
                "layout senses each layer of a stacked tensor); this reads unrolled runs"
            )
        total.update(binds)
        steps += n
        for i, r in ratios.items():
            peak[i] = max(peak[i], r)
    print(
        f"{len(args.runs)} run(s), {steps} logged steps; the tensors that reached half the limit:"
    )
    print("| tensor | logged steps cut | largest ratio |\n|---|---|---|")
    for i, name in enumerate(names):
        if peak[i] >= args.limit / 2:
            print(f"| {name} | {total[i]} | {peak[i]:.3f} |")


if __name__ == "__main__":
    main()
