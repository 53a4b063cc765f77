"""The report's Markdown tables of one setting and fault (perplexity, targets, speed,
telemetry) and across settings (the size ladder)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from lbw.train.stress.results import CHAOTIC_NOTE, Suite, chaotic, finite, fmt, mean_std, table


def _lr_header(suite: Suite, setting: str, mults: Sequence[float]) -> list[str]:
    return [f"×{m:g} ({suite.lr_of(setting, m):.0e})" for m in mults]


def ppl_table(suite: Suite, setting: str, fault: str, methods: Sequence[str] | None = None):
    """Method × learning rate final perplexity, mean ± std over seeds; a chaotic cell (its
    seeds' spread over 20 % of its mean) is marked ‡, with the note under the table."""
    mults = suite.multipliers(setting, fault)
    rows, marked = [], False
    for method in methods or suite.methods:
        cells = []
        for m in mults:
            mean, std = suite.cell(setting, fault, method, m)[0]
            cells.append(fmt(mean, std) + (" ‡" if chaotic(mean, std) else ""))
            marked |= chaotic(mean, std)
        if any(c != "–" for c in cells):
            rows.append([method, *cells])
    lines = table(["method", *_lr_header(suite, setting, mults)], rows)
    return [*lines, "", CHAOTIC_NOTE] if marked else lines


def _ran(suite: Suite, setting: str, fault: str, method: str) -> set[float]:
    """The multipliers at which ``method`` has runs (NaN: no run; inf: diverged, a result)."""
    return {
        m
        for m in suite.multipliers(setting, fault)
        if not math.isnan(suite.cell(setting, fault, method, m)[0][0])
    }


def _mean_over_grid(
    suite: Suite, setting: str, fault: str, method: str, mults: Sequence[float]
) -> float:
    """``method``'s mean final perplexity over ``mults`` (NaN if it has no run there)."""
    means = [suite.cell(setting, fault, method, m)[0][0] for m in mults]
    means = [v for v in means if not math.isnan(v)]
    return statistics.fmean(means) if means else math.nan


def targets_block(suite: Suite, setting: str, fault: str) -> list[str]:
    """The claims, computed from the data."""
    out = []
    mults = suite.multipliers(setting, fault)

    def mean(method: str, m: float) -> float:
        return suite.cell(setting, fault, method, m)[0][0]

    subject = suite.roles.subject
    adamw = {m: mean(suite.roles.baseline, m) for m in mults}
    finite = [v for v in adamw.values() if math.isfinite(v)]
    if subject not in suite.methods:
        return [f"(no {subject or 'guarded'} runs)"]
    if not finite:
        gov = "; ".join(f"×{m:g} {fmt(mean(subject, m))}" for m in mults)
        return [f"- AdamW diverged or did not run at every learning rate here; {subject}: {gov}."]
    best = min(finite)
    best_m = min(adamw, key=lambda m: adamw[m])
    out.append(
        f"- AdamW's best mean final perplexity over the grid: {best:.2f} (×{best_m:g}, "
        f"LR {suite.lr_of(setting, best_m):.0e})."
    )
    # Stress is a learning rate above the base that puts AdamW off its best (a rate below it
    # that does is too low, not a stress).
    stress = [m for m in mults if m > 1.0 and adamw[m] >= 2 * best]
    if stress:
        for m in stress:
            g = mean(subject, m)
            out.append(
                f"- Stress LR ×{m:g} (AdamW {fmt(adamw[m])} ≥ 2× its best): {subject} "
                f"{fmt(g)}, {subject} / AdamW-best = {g / best:.2f}."
            )
    else:
        worst = max(adamw.values())
        out.append(
            f"- No learning rate put AdamW ≥ 2× off its best (worst: {fmt(worst)}, "
            f"{worst / best:.2f}×): the paper's stress regime was not reached."
        )
    base = min(mults, key=lambda m: abs(m - 1.0))
    g, a = mean(subject, base), adamw[base]
    out.append(f"- Base LR (×{base:g}): {subject} / AdamW = {fmt(g)} / {fmt(a)} = {g / a:.3f}.")
    own = _ran(suite, setting, fault, subject)
    gov = _mean_over_grid(suite, setting, fault, subject, sorted(own))
    out.append(
        f"- Mean final perplexity over the LR grid: {subject} {fmt(gov)}; against (each pair "
        "over the multipliers both ran):"
    )
    for method in suite.methods:
        if method == subject:
            continue
        both = sorted(own & _ran(suite, setting, fault, method))
        if not both:
            continue
        g = _mean_over_grid(suite, setting, fault, subject, both)
        other = _mean_over_grid(suite, setting, fault, method, both)
        ratio = g / other if math.isfinite(other) else 0.0
        grid = "" if len(both) == len(own) else f" over ×{', ×'.join(f'{m:g}' for m in both)}"
        out.append(f"  - {method}: {fmt(other)} ({subject} / {method} = {ratio:.3f}{grid})")
    title = subject[:1].upper() + subject[1:]
    for control, _, source in suite.roles.controls:
        if source != subject or control not in suite.methods:
            continue
        parts = []
        for m in mults:
            g, c = mean(subject, m), mean(control, m)
            if math.isfinite(g) and math.isfinite(c):
                parts.append(f"×{m:g}: {g:.2f} vs {c:.2f} ({g / c:.3f})")
        if parts:
            out.append(f"- {title} vs {control} control ({subject} / control): " + "; ".join(parts))
    return out


def _cells(suite: Suite, setting: str, fault: str):
    """``(method, multiplier, runs)`` for every method × multiplier of a setting that ran."""
    for method in suite.methods:
        for m in suite.multipliers(setting, fault):
            rs = suite.select(setting=setting, fault=fault, method=method, lr_multiplier=m)
            if rs:
                yield method, m, rs


def speed_table(suite: Suite, setting: str, fault: str) -> list[str]:
    """Steps and time to the target perplexity, wall time, tokens/s; speedup vs AdamW."""
    rows = []
    for method, m, rs in _cells(suite, setting, fault):
        reached = [r for r in rs if r["steps_to_target"] is not None]
        steps = [r["steps_to_target"] for r in reached]
        times = [r["time_to_target_s"] for r in reached]
        ref = suite.select(
            setting=setting, fault=fault, method=suite.roles.baseline, lr_multiplier=m
        )
        ref_t = [r["time_to_target_s"] for r in ref if r["time_to_target_s"] is not None]
        speedup = (
            f"{statistics.fmean(ref_t) / statistics.fmean(times):.2f}×"
            if times and ref_t and len(ref_t) == len(ref)
            else "–"
        )
        rows.append(
            [
                method,
                f"×{m:g}",
                f"{len(reached)}/{len(rs)}",
                fmt(statistics.fmean(steps), None, 0) if steps else "–",
                fmt(statistics.fmean(times), None, 1) if times else "–",
                speedup,
                fmt(*mean_std([r["wall_time_s"] for r in rs]), digits=1),
                fmt(statistics.fmean([r["tokens_per_s"] or 0.0 for r in rs]), None, 0),
            ]
        )
    return table(
        [
            "method",
            "LR",
            "reached target",
            "steps to target",
            "time to target (s)",
            "speedup vs AdamW",
            "wall time (s)",
            "tokens/s",
        ],
        rows,
    )


def telemetry_table(suite: Suite, setting: str, fault: str) -> list[str]:
    rows = []
    for method, m, rs in _cells(suite, setting, fault):

        def avg(key, rs=rs):
            vals = [r["telemetry"].get(key) for r in rs]
            vals = [v for v in vals if finite(v)]
            return statistics.fmean(vals) if vals else math.nan

        spikes = statistics.fmean([r["loss_spikes"] for r in rs])
        tel = [
            fmt(avg("mean_scale"), None, 3),
            fmt(avg("control_active_steps"), None, 1),
            fmt(avg("regime_switches"), None, 1),
            fmt(avg("control_energy"), None, 1),
            fmt(avg("held_steps"), None, 1),
        ]
        rows.append([method, f"×{m:g}", f"{spikes:.1f}", *tel])
    return table(
        [
            "method",
            "LR",
            "loss spikes",
            "mean scale",
            "control-active steps",
            "regime switches",
            "control energy",
            "held steps",
        ],
        rows,
    )


def ladder_table(suite: Suite, fault: str, methods: Sequence[str]) -> list[str]:
    """Setting × method mean final perplexity at each multiplier (size ladder, LoRA vs full)."""
    mults = sorted({r["lr_multiplier"] for r in suite.select(fault=fault)})
    rows = []
    for setting in suite.settings:
        lora = next(r["lora_rank"] for r in suite.select(setting=setting))
        for method in methods:
            cells = [fmt(*suite.cell(setting, fault, method, m)[0]) for m in mults]
            if any(c != "–" for c in cells):  # Methods a setting does not run: no row.
                rows.append([setting, f"LoRA r{lora}" if lora else "full", method, *cells])
    return table(["setting", "training", "method", *[f"×{m:g}" for m in mults]], rows)
