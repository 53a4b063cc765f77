"""The suite's records: reading runs, the per-run line of ``runs.jsonl`` and its targets."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lbw.train.config import TrainConfig
from lbw.train.stress.spec import BASELINE, SPIKE_FACTOR, TARGET_FACTOR, Run, SuiteSpec

FINISHED = ("completed", "nonfinite")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``summary.json`` if it is complete (a finished status), else ``None``."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("status") in FINISHED else None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def count_loss_spikes(
    lines: Iterable[Mapping[str, Any]], *, warmup: int, every: int, factor: float = SPIKE_FACTOR
) -> int:
    """Loss spikes in a run's train lines (see :mod:`train.stress` for the definition).

    Lines logged more often than ``every`` steps are first averaged over windows of ``every``
    steps, so runs logged at different intervals are counted alike.
    """
    windows: dict[int, list[float | None]] = {}
    for line in lines:
        if line.get("kind") == "train" and line["step"] > warmup:
            windows.setdefault(-(-line["step"] // every), []).append(line.get("loss"))
    count, best, inside = 0, math.inf, False
    for key in sorted(windows):
        values = windows[key]
        if all(_finite(v) for v in values):
            loss = sum(values) / len(values)
            bad = loss > factor * best
            best = min(best, loss)
        else:
            bad = True
        if bad and not inside:
            count += 1
        inside = bad
    return count


def mean_scale(telemetry: Mapping[str, Any]) -> float | None:
    """The guard's mean applied scale over the run, ``1 − control_energy / steps``."""
    if "control_energy" not in telemetry or not telemetry.get("step"):
        return None
    return 1.0 - float(telemetry["control_energy"]) / float(telemetry["step"])


def scale_trace(lines: Iterable[Mapping[str, Any]], steps: int) -> list[float]:
    """The per-step applied scale from a run logged every step: the guard's
    ``effective_scale`` (its per-tensor limits included, 0 on a held step), or for older runs
    ``scale`` (0 on a held step).

    Raises:
      ValueError: if a step in ``1..steps`` has no telemetry line.
    """
    by_step = {}
    for line in lines:
        tel = line.get("telemetry") or {}
        if line.get("kind") != "train":
            continue
        if "effective_scale" in tel:
            by_step[line["step"]] = float(tel["effective_scale"])
        elif "scale" in tel:
            by_step[line["step"]] = 0.0 if tel.get("held") else float(tel["scale"])
    missing = [s for s in range(1, steps + 1) if s not in by_step]
    if missing:
        raise ValueError(
            f"the scale trace lacks steps {missing[:5]}…: the replayed run must log every step."
        )
    return [by_step[s] for s in range(1, steps + 1)]


def _telemetry_summary(tel: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "control_energy" in tel:
        out = {
            "mean_scale": mean_scale(tel),
            "control_active_steps": tel.get("control_active_steps"),
            "regime_switches": tel.get("regime_switches"),
            "control_energy": tel.get("control_energy"),
            "held_steps": tel.get("skipped_steps"),
            "final_scale": tel.get("scale"),
            "final_regime": tel.get("regime_name"),
        }
    elif "skipstep_skipped_steps" in tel:
        out = {"held_steps": tel["skipstep_skipped_steps"]}
    elif "zclip_clipped_steps" in tel:
        out = {"control_active_steps": tel["zclip_clipped_steps"]}
    return out


def run_record(run: Run, run_dir: Path, summary: Mapping[str, Any], spike_every: int):
    """The per-run line of ``runs.jsonl``; targets are filled in by :func:`add_targets`."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    evals = [
        [r["step"], r.get("eval_perplexity"), r.get("wall_time_s")]
        for r in lines
        if r.get("kind") == "eval"
    ]
    finite_evals = [e[1] for e in evals if _finite(e[1])]
    config = summary["config"]
    return {
        "run_id": run.run_id,
        "stage": run.stage,
        "setting": run.setting,
        "model": config["model"],
        "lora_rank": config["lora_rank"],
        "method": run.method,
        "optimizer": config["optimizer"],
        "control": run.control,
        "depends_on": run.depends_on,
        "lr_multiplier": run.lr_multiplier,
        "base_learning_rate": run.learning_rate,
        "learning_rate": config["learning_rate"],
        "fault": run.fault,
        "seed": run.seed,
        "status": summary["status"],
        "steps": summary["step"],
        "final_eval_ppl": summary.get("eval_perplexity")
        if summary["status"] == "completed"
        else None,
        "best_eval_ppl": min(finite_evals) if finite_evals else None,
        "final_loss": summary.get("loss"),
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "compile_s": summary.get("compile_s"),
        "loss_spikes": count_loss_spikes(lines, warmup=config["warmup_steps"], every=spike_every),
        "evals": evals,
        "telemetry": _telemetry_summary(summary.get("telemetry") or {}),
    }


def add_targets(records: list[dict[str, Any]], factor: float = TARGET_FACTOR) -> None:
    """Sets ``target_ppl``, ``steps_to_target`` and ``time_to_target_s`` of every record."""
    groups: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in records:
        if r["method"] == BASELINE.name and r["stage"] != "control":
            ppl = r["final_eval_ppl"]
            groups.setdefault((r["setting"], r["fault"]), {}).setdefault(
                r["base_learning_rate"], []
            ).append(ppl if _finite(ppl) else math.inf)
    for r in records:
        per_lr = groups.get((r["setting"], r["fault"]), {})
        means = [sum(v) / len(v) for v in per_lr.values()]
        best = min(means) if means else math.inf
        target = factor * best if math.isfinite(best) else None
        r["target_ppl"] = target
        r["steps_to_target"] = r["time_to_target_s"] = None
        if target is not None:
            for step, ppl, wall in r["evals"]:
                if _finite(ppl) and ppl <= target:
                    r["steps_to_target"], r["time_to_target_s"] = step, wall
                    break


def spike_every(spec: SuiteSpec) -> int:
    return int(spec.train.get("log_every", TrainConfig().log_every))


def collect(spec: SuiteSpec, runs: Sequence[Run], runs_dir: Path) -> list[dict[str, Any]]:
    """The records of the finished ``runs`` (targets added), in ``runs`` order."""
    records, seen = [], set()
    for run in runs:
        if run.run_id in seen:
            continue
        summary = read_summary(runs_dir / run.run_id)
        if summary is not None:
            records.append(run_record(run, runs_dir / run.run_id, summary, spike_every(spec)))
            seen.add(run.run_id)
    add_targets(records)
    return records


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
