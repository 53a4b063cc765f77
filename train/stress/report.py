"""The stress suite's report: ``summary.md`` and PNG plots from ``runs.jsonl`` and run metrics.

Everything is computed from the files a suite commits (``suite.json``, ``runs.jsonl`` and the
runs' metrics: ``runs/<id>/metrics.jsonl`` where the run folders are, else the suite's
``metrics.jsonl.xz``, see :mod:`train.archive`), so ``lbw-stress report DIR`` regenerates the
report anywhere. Which method is the baseline, which are guarded, which are controls and what
they read come from the suite's spec (:class:`~train.stress.spec.Roles`), never from names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lbw.train import archive
from lbw.train.stress.plots import plot_losses, plot_robustness, plot_scale
from lbw.train.stress.results import Suite, fmt, table
from lbw.train.stress.spec import SPIKE_FACTOR, TARGET_FACTOR
from lbw.train.stress.tables import (
    ladder_table,
    ppl_table,
    speed_table,
    targets_block,
    telemetry_table,
)


def _suffix(suite: Suite, setting: str, fault: str) -> str:
    parts = []
    if len(suite.settings) > 1:
        parts.append(setting)
    if len(suite.faults) > 1:
        parts.append(fault)
    return ("_" + "_".join(parts)) if parts else ""


def headline(directory: Path) -> str:
    """The first setting's fault-free method × LR table (what the CLI prints)."""
    suite = Suite(directory)
    if not suite.grid:
        return "(no finished runs)"
    setting = suite.settings[0]
    fault = "none" if "none" in suite.faults else suite.faults[0]
    title = f"Final validation perplexity (mean ± std over seeds), {setting}, fault: {fault}"
    return "\n".join([title, "", *ppl_table(suite, setting, fault)])


def time_constants_block(meta: Mapping[str, Any]) -> list[str]:
    """The peers' time constants as fractions of the run and in steps (from ``suite.json``)."""
    constants = meta.get("time_constants") or {}
    if not constants:
        return []
    steps = meta.get("spec", {}).get("train", {}).get("steps", "?")
    rows = [
        [method, name, f"{v['fraction']:.3g}", str(v["steps"])]
        for method, values in constants.items()
        for name, v in values.items()
    ]
    return [
        "## Time constants",
        "",
        f"The peers' time constants, scaled to the run's {steps} steps (the library defaults "
        "are the papers', set for runs of 10k steps and more):",
        "",
        *table(["method", "argument", "fraction of the run", "steps"], rows),
        "",
    ]


def _code_line(meta: Mapping[str, Any]) -> str:
    line = f"- Code: git commit `{meta.get('git_commit', 'unknown')}`"
    if meta.get("uncommitted"):
        changed = ", ".join(f"`{p}`" for p in meta["uncommitted"])
        line += f", with the uncommitted changes in `code.patch` ({changed})"
    return line


def _runs_line(suite: Suite) -> str:
    meta, records = suite.meta, suite.records
    planned = meta.get("planned_runs")
    return (
        f"- Runs: {len(records)} finished"
        + (f" of the {planned} the suite plans" if planned else "")
        + " "
        f"({sum(r['status'] == 'nonfinite' for r in records)} stopped on NaN/Inf), "
        f"total run wall time {sum(r['wall_time_s'] or 0 for r in records):.0f} s"
    )


def _invocations_lines(meta: Mapping[str, Any]) -> list[str]:
    """The invocations that ran the suite, when there were several."""
    parts = meta.get("invocations", [])
    if len(parts) <= 1:
        return []
    return [
        f"- Run in {len(parts)} invocations into the same folder (each skips finished runs):",
        *(
            f"  - `{p['command']}`: {p['runs']} runs in {p['seconds']:.0f} s, commit "
            f"`{p['git_commit'][:7]}`"
            + (" (with uncommitted changes)" if p.get("uncommitted") else "")
            + (f"; {p['note']}" if p.get("note") else "")
            for p in parts
        ),
    ]


def _header(suite: Suite) -> list[str]:
    """The title, the description, and how, where and on what code the suite ran."""
    meta = suite.meta
    spec = meta.get("spec", {})
    md = [f"# Stress suite `{spec.get('name', suite.dir.name)}`", ""]
    if spec.get("description"):
        md += [spec["description"], ""]
    md += [
        f"- Command: `{meta.get('command', '')}`",
        f"- Machine: {meta.get('machine', '')}",
        _code_line(meta),
        _runs_line(suite),
        *_invocations_lines(meta),
    ]
    if meta.get("not_collected"):
        md.append(
            "- Not in this report (their base learning-rate sweep has not run): "
            + ", ".join(f"`{n}`" for n in meta["not_collected"])
        )
    if meta.get("collected_by") and len(suite.records) < meta.get("planned_runs", 0):
        md.append(
            f"- Interrupted before every planned run finished; this report was collected from "
            f"the finished runs with `{meta['collected_by']}` (the same command without "
            "`--collect` resumes the suite)"
        )
    if meta.get("last_invocation_s"):
        md.append(
            f"- Wall time of the invocation that ran {meta.get('runs_in_last_invocation', '')} "
            f"runs (Python start-up excluded): {meta['last_invocation_s']:.0f} s"
        )
    train = spec.get("train", {})
    if train:
        md.append(
            "- Per run: "
            + ", ".join(f"{k} {v}" for k, v in train.items() if k not in ("checkpoint_every",))
        )
    return md


def _definitions(suite: Suite) -> list[str]:
    """What the tables' words mean, with the suite's own factors and control source."""
    source = suite.roles.subject or "guarded"  # The run the controls read.
    definitions = suite.meta.get("definitions", {})
    spike = definitions.get("spike_factor", SPIKE_FACTOR)
    target = definitions.get("target_factor", TARGET_FACTOR)
    return [
        "",
        "Definitions:",
        "",
        "- **Final / best perplexity**: exp of the mean evaluation loss (per byte-level token) "
        "at the last step / the lowest over the periodic evaluations. `diverged`: the run "
        "stopped on a NaN/Inf loss (unguarded) or its perplexity overflowed.",
        f"- **Loss spike**: after warm-up, a logged training loss (mean over the log interval) "
        f"above {spike:g} × the lowest logged loss so far, or a non-finite one; counted once per "
        "excursion.",
        f"- **Target perplexity**: {target:.2f} × AdamW's best mean final perplexity over the "
        "learning rates run (per setting and fault); steps/time to target: the first evaluation "
        "at or below it.",
        "- **Mean scale**: the guard's applied scale averaged over steps (0 on a held step), "
        "`1 − control_energy / steps`. **Control-active steps**: steps with scale ≠ 1 or a held "
        "update (for ZClip: clipped steps). **Held steps**: zero updates (guard, skip-step).",
        f"- **effective-lr** control: AdamW at LR × the {source} run's mean scale (same setting, "
        f"LR, fault, seed). **replay** control: AdamW whose LR schedule is multiplied by the "
        f"{source} run's per-step applied scale, open loop.",
        "",
    ]


def _learning_rates(meta: Mapping[str, Any]) -> list[str]:
    """The methods' own base learning rates, the base-LR sweeps, and the LoRA bases' runs."""
    spec = meta.get("spec", {})
    md = []
    own_base = {
        m["name"]: m["base_lr"] for m in spec.get("methods", []) if m.get("base_lr") is not None
    }
    if own_base:
        md += [
            "Methods at their own base learning rate (a multiplier of their learned step), "
            "times the same multipliers: "
            + ", ".join(f"{k} {v:g}" for k, v in own_base.items())
            + ". Their columns' learning rates are those multiples, not the headers'.",
            "",
        ]
    base = meta.get("base_lr", {})
    if base:
        md += ["## Base learning rate", ""]
        for name, info in base.items():
            grid = info.get("grid")
            line = f"- {name}: **{info['base_lr']:.0e}** — {info.get('procedure', '')}"
            if grid:
                line += "; final ppl " + ", ".join(
                    f"{lr}: {fmt(v if v is not None else math.inf)}" for lr, v in grid.items()
                )
            md.append(line)
        md.append("")
    for name, info in meta.get("pretrain", {}).items():
        md += [
            f"- {name}: LoRA on a cached base, pre-trained by `{info['run_id']}` (AdamW, full "
            f"parameters, {info['steps']} steps at LR {info['learning_rate']:.0e}; final eval "
            f"ppl {fmt(info['final_eval_ppl'] or math.inf)}).",
            "",
        ]
    return md


def _clipping_methods(suite: Suite) -> list[str]:
    """The clipping baselines, the subject and its effective-LR controls, as the suite runs them."""
    roles = suite.roles
    subject_and_lr = [roles.subject] + [
        name
        for name, kind, source in roles.controls
        if kind == "effective-lr" and source == roles.subject
    ]
    return [m for m in suite.methods if m in roles.baselines] + [
        m for m in subject_and_lr if m in suite.methods
    ]


def _section(suite: Suite, setting: str, fault: str) -> list[str]:
    """The tables of one setting and fault, and its plots (written next to ``summary.md``)."""
    sfx = _suffix(suite, setting, fault)
    md = [
        f"## {setting}, fault: {fault}",
        "",
        "### Final validation perplexity (mean ± std over seeds)",
        "",
        *ppl_table(suite, setting, fault),
        "",
        "### Targets",
        "",
        *targets_block(suite, setting, fault),
        "",
        "### Clipping baselines",
        "",
        *ppl_table(suite, setting, fault, _clipping_methods(suite)),
        "",
        "### Time to target and speed",
        "",
        *speed_table(suite, setting, fault),
        "",
        "### Telemetry and loss spikes (means over seeds)",
        "",
        *telemetry_table(suite, setting, fault),
        "",
    ]
    plot_losses(suite, setting, fault, suite.dir / f"loss_curves{sfx}.png")
    plot_robustness(suite, setting, fault, suite.dir / f"robustness{sfx}.png")
    pngs = [f"loss_curves{sfx}.png", f"robustness{sfx}.png"]
    if plot_scale(suite, setting, fault, suite.dir / f"scale_regime{sfx}.png"):
        pngs.append(f"scale_regime{sfx}.png")
    return [*md, *(f"![{p}]({p})" for p in pngs), ""]


def write_report(directory: Path) -> Path:
    """Writes ``summary.md`` and the PNGs into the suite ``directory``; returns the summary's
    path."""
    import matplotlib

    matplotlib.use("Agg")
    suite = Suite(Path(directory))
    md = [*_header(suite), *_definitions(suite)]
    md += time_constants_block(suite.meta)
    md += _learning_rates(suite.meta)
    for setting in suite.settings:
        for fault in suite.faults:
            if suite.select(setting=setting, fault=fault):
                md += _section(suite, setting, fault)
    if len(suite.settings) > 1:
        methods = [m for m in suite.methods if m in suite.roles.ladder]
        md += ["## Size ladder and LoRA vs full (fault: none)", ""]
        md += [*ladder_table(suite, "none", methods), ""]
    md += [
        f"Raw data: `runs.jsonl` (one line per run) and `{archive.NAME}` (the lines of every "
        "run's `metrics.jsonl` and its `summary.json`, each tagged with its `run_id`); regenerate "
        f"this report with `lbw-stress report {suite.dir.name}` from the suite's parent folder.",
        "",
    ]
    path = suite.dir / "summary.md"
    path.write_text("\n".join(md))
    return path
