"""The GPU evidence's outputs: ``summary.md`` (the stages, the suites' plans and runs, the
cost tables) and ``evidence.json``, rewritten after every stage (:mod:`benchmarks.gpu_evidence`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def suite_lines(title: str, result: dict[str, Any], file: str) -> list[str]:
    """A suite's plan, what it ran, its final perplexities, its times to target and its runs'
    wall clock against the plan's estimate."""
    p = result["plan"]
    dropped = "; ".join(p["dropped"]) or "nothing"
    stopped = " It was stopped at its budget." if result["stopped_at_budget"] else ""
    lines = [
        "",
        f"## {title}",
        "",
        f"Plan: {p['runs']} runs of {p['steps']} steps at "
        + ", ".join(f"×{m:g}" for m in sorted(p["multipliers"]))
        + f", {p['compilations']} compilations; estimated {p['estimate_s']} s (× {p['margin']}) "
        f"of the {p['available_s']} s its probe ({result['probe_s']} s) left in a "
        f"{p['budget_s']:.0f} s budget; given up to fit: {dropped}. {result['runs_finished']} of "
        f"{result['runs_planned']} runs finished in {result['suite_wall_s']} s.{stopped} Probe: "
        f"{json.dumps(p['probe'])}. Full report: `{file}`; every run's metrics: "
        "`suites.tar.gz`.",
        "",
        result["headline"],
    ]
    records = result["records"]
    if records:
        target = next((r["target_ppl"] for r in records if r.get("target_ppl")), None)
        lines += [
            "",
            f"Time to the target perplexity ({_f(target, 2)}: 1.10 × AdamW's best final "
            "perplexity over the learning rates run), first evaluation at or below it:",
            "",
            "| method | LR | final ppl | steps to target | time to target (s) | wall (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(records, key=lambda r: (r["method"], r["lr_multiplier"])):
            lines.append(
                f"| {r['method']} | ×{r['lr_multiplier']:g} | {_f(r['final_eval_ppl'], 2)} | "
                f"{r['steps_to_target'] if r['steps_to_target'] is not None else '–'} | "
                f"{_f(r['time_to_target_s'], 1)} | {_f(r['wall_time_s'], 1)} |"
            )
        lines += [
            "",
            "Wall clock of a run, estimated from the probe before the runs, and measured (the "
            "first run of a method compiles):",
            "",
            "| method | estimated s (first run) | measured s, each run | compilation s, each run |",
            "|---|---|---|---|",
        ]
        for name, m in result["per_method"].items():
            lines.append(
                f"| {name} | {m['estimated_run_s']:.1f} ({m['estimated_first_run_s']:.1f}) | "
                + ", ".join(_f(x, 1) for x in m["measured_run_s"])
                + " | "
                + ", ".join(_f(x, 1) for x in m["compile_s"])
                + " |"
            )
    return lines


def summary_md(state: dict[str, Any]) -> str:
    ev = state["evidence"]
    res = state["results"]
    lines = [
        f"# GPU evidence{' (smoke mode: CPU, micro models)' if ev['smoke'] else ''}",
        "",
        f"- command: `{ev['command']}`",
        f"- started {ev['started']}, wall clock {_f(ev.get('wall_s'), 0)} s of a "
        f"{ev['budgets']['total_s']:.0f} s budget, exit status {ev.get('exit_status', 'running')}",
        f"- machine: {ev['machine']['summary']}; devices: "
        + ", ".join(
            f"{d['kind']}" + (f" {d['memory_gib']} GiB" if "memory_gib" in d else "")
            for d in ev["machine"]["devices"]
        ),
        f"- versions: {', '.join(f'{k} {v}' for k, v in ev['machine']['versions'].items())}",
        f"- code: commit {ev['code']['git_commit']}"
        + (f", uncommitted: {ev['code']['uncommitted']}" if ev["code"].get("uncommitted") else "")
        + f"; imported from {ev['code']['code_dir']}",
        "",
        "| stage | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, st in ev["stages"].items():
        lines.append(
            f"| {name} | {st['status']} | {_f(st.get('seconds'), 1)} | {st.get('reason', '')} |"
        )
    for key, title, file in (
        ("suite", "LR-stress suite", "suite-summary.md"),
        ("depth", "Depth suite", "depth-summary.md"),
    ):
        if res.get(key):
            r = res[key]
            heading = f"{title} ({r['model']}, {r['plan']['steps']} steps)"
            lines += suite_lines(heading, r, file)
    guard = res.get("guard")
    if guard and guard["methods"]:
        lines += [
            "",
            f"## Train-step cost ({guard['model']}, batch "
            f"{guard['batch'][0]}×{guard['batch'][1]}, donated steps back to back, "
            f"{guard['rounds']} interleaved rounds of {guard['steps_per_round']} steps, one sync "
            "per round; ratios against AdamW in the same layout)",
            "",
            "| method [layout] | median ms (min–max) | × adamw | per-round ratio min–max "
            "| HLO GB | achieved GB/s | of peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in guard["methods"].items():
            lines.append(
                f"| {name} | {m['median_ms']:.2f} ({m['min_ms']:.2f}–{m['max_ms']:.2f}) | "
                f"{m['ratio']:.4f} | {m['round_ratio_min']:.4f}–{m['round_ratio_max']:.4f} | "
                f"{_f(m.get('hlo_gb'))} | {_f(m.get('achieved_gb_s'), 0)} | "
                f"{_f(m.get('of_peak'))} |"
            )
        trace = guard.get("trace", {})
        if trace.get("steps"):
            kernel = trace.get("kernel_ms_per_step")
            lines += [
                "",
                f"Profiler trace of {trace['steps']} {trace['method']} step: "
                + (
                    f"{kernel:.2f} ms of kernels against {trace['train_step_ms']:.2f} ms of wall "
                    "clock per step"
                    if kernel
                    else "no GPU kernels in it (no GPU)"
                )
                + (
                    " (`trace.xplane.pb`)."
                    if trace.get("kept")
                    else f" ({trace['bytes'] / 2**20:.1f} MiB, not kept)."
                ),
            ]
        for part, why in guard.get("skipped", {}).items():
            lines.append(f"- skipped: {part} ({why})")
    sgg = res.get("sgg")
    if sgg:
        lines += [
            "",
            f"## SGG's optimizer step ({sgg['parameters']:,} parameters)",
            "",
            "| step | median ms (min–max) | × adamw |",
            "|---|---|---|",
        ]
        for name, m in sgg["steps"].items():
            lines.append(
                f"| {name} | {m['median_ms']:.2f} ({m['min_ms']:.2f}–{m['max_ms']:.2f}) | "
                f"{m['ratio']:.3f} |"
            )
        mean = sgg["mean_over_interval"]
        lines.append(
            f"| mean over {mean['interval']} steps | {mean['median_ms']:.2f} | "
            f"{mean['ratio']:.3f} |"
        )
    steps = [v for k, v in res.items() if k.startswith("model_step")]
    if steps:
        lines += [
            "",
            "## Train-step throughput (`benchmarks/model_step.py`, bf16 compute, AdamW)",
            "",
            "| preset | mode | parameters | tokens/s, median (min–max) | first step s |",
            "|---|---|---|---|---|",
        ]
        for entry in steps:
            for mode, m in entry.items():
                lines.append(
                    f"| {m['preset']} ({m['label']}) | {mode} | {m['parameters']:,} | "
                    f"{m['tokens_per_s_median']:,.0f} ({m['tokens_per_s_min']:,.0f}–"
                    f"{m['tokens_per_s_max']:,.0f}) | {m['compile_s']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, state: dict[str, Any]) -> None:
    ev = state["evidence"]
    ev["results"] = state["results"]
    tmp = out / "evidence.json.tmp"
    tmp.write_text(json.dumps(ev, indent=2, default=str) + "\n")
    os.replace(tmp, out / "evidence.json")
    (out / "summary.md").write_text(summary_md(state))
