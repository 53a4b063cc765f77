"""The stress suite's report: ``summary.md`` and PNG plots from ``runs.jsonl`` and run metrics.

Everything is computed from the files a suite commits (``suite.json``, ``runs.jsonl`` and the
runs' metrics: ``runs/<id>/metrics.jsonl`` where the run folders are, else the suite's
``metrics.jsonl.xz``, see :mod:`train.archive`), so ``lbw-stress report DIR`` regenerates the
report anywhere. Which method is the baseline, which are guarded, which are controls and what
they read come from the suite's spec (:class:`~train.stress.spec.Roles`), never from names.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lbw.train import archive
from lbw.train.stress.records import read_jsonl
from lbw.train.stress.spec import SPIKE_FACTOR, TARGET_FACTOR, Roles


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _ppl(r: Mapping[str, Any]) -> float:
    """Final perplexity, infinite for a run that stopped on NaN/Inf or overflowed."""
    return r["final_eval_ppl"] if _finite(r["final_eval_ppl"]) else math.inf


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); infinite if any value is."""
    if not values:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    if math.isinf(mean):
        return "diverged"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _roles(meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Roles:
    """The roles from the suite's spec, or (a spec without methods) from the records."""
    if meta.get("spec", {}).get("methods"):
        return Roles.from_spec(meta["spec"])
    method_of = {r["run_id"]: r["method"] for r in records}
    methods: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["stage"] in ("method", "control"):
            methods.setdefault(
                r["method"],
                {
                    "name": r["method"],
                    "optimizer": r["optimizer"],
                    "control": r["control"],
                    "source": method_of.get(r["depends_on"]) if r["control"] else None,
                },
            )
    return Roles.of(list(methods.values()))


class Suite:
    """The loaded records of a suite directory."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        meta_path = self.dir / "suite.json"
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.records = read_jsonl(self.dir / "runs.jsonl")
        # Sweep-only runs (learning rates outside the multiplier grid) stay out of the tables.
        self.grid = [r for r in self.records if r["lr_multiplier"] is not None]
        self.settings = list(dict.fromkeys(r["setting"] for r in self.grid))
        self.faults = list(dict.fromkeys(r["fault"] for r in self.grid))
        self.roles = _roles(self.meta, self.records)
        ran = {r["method"] for r in self.grid}
        known = [n for n in self.roles.order if n in ran]
        self.methods = known + sorted(ran - set(known))
        self._archive: dict[str, dict[str, Any]] | None = None

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """A run's ``metrics.jsonl`` lines, from its folder or else from the suite's archive."""
        path = self.dir / "runs" / run_id / archive.METRICS
        if path.is_file():
            return read_jsonl(path)
        if self._archive is None:
            self._archive = archive.read(self.dir)
        return self._archive.get(run_id, {}).get("metrics", [])

    def select(self, **where) -> list[dict[str, Any]]:
        return [r for r in self.grid if all(r[k] == v for k, v in where.items())]

    def multipliers(self, setting: str, fault: str) -> list[float]:
        return sorted({r["lr_multiplier"] for r in self.select(setting=setting, fault=fault)})

    def lr_of(self, setting: str, mult: float) -> float:
        return next(
            r["base_learning_rate"]
            for r in self.grid
            if r["setting"] == setting and r["lr_multiplier"] == mult
        )

    def cell(self, setting: str, fault: str, method: str, mult: float, key=_ppl):
        values = [
            key(r)
            for r in self.select(setting=setting, fault=fault, method=method, lr_multiplier=mult)
        ]
        return mean_std(values), len(values)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _lr_header(suite: Suite, setting: str, mults: Sequence[float]) -> list[str]:
    return [f"×{m:g} ({suite.lr_of(setting, m):.0e})" for m in mults]


def ppl_table(suite: Suite, setting: str, fault: str, methods: Sequence[str] | None = None):
    """Method × learning rate final perplexity, mean ± std over seeds."""
    mults = suite.multipliers(setting, fault)
    rows = []
    for method in methods or suite.methods:
        cells = [fmt(*suite.cell(setting, fault, method, m)[0]) for m in mults]
        if any(c != "–" for c in cells):
            rows.append([method, *cells])
    return _table(["method", *_lr_header(suite, setting, mults)], rows)


def _mean_over_grid(suite: Suite, setting: str, fault: str, method: str) -> float:
    means = [suite.cell(setting, fault, method, m)[0][0] for m in suite.multipliers(setting, fault)]
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
    stress = [m for m in mults if adamw[m] >= 2 * best]
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
    gov = _mean_over_grid(suite, setting, fault, subject)
    out.append(f"- Mean final perplexity over the LR grid: {subject} {fmt(gov)}; against:")
    for method in suite.methods:
        if method == subject:
            continue
        other = _mean_over_grid(suite, setting, fault, method)
        if not math.isnan(other):
            ratio = gov / other if math.isfinite(other) else 0.0
            out.append(f"  - {method}: {fmt(other)} ({subject} / {method} = {ratio:.3f})")
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
    return _table(
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
            vals = [v for v in vals if _finite(v)]
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
    return _table(
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
    return _table(["setting", "training", "method", *[f"×{m:g}" for m in mults]], rows)


# ---------------------------------------------------------------------------------------------
# Plots.


def _curves(suite: Suite, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    return suite.metrics(record["run_id"])


def save_figure(fig: Any, path: Path) -> None:
    """Writes ``fig`` as a 256-colour palette PNG (a third of the size of matplotlib's RGBA PNG,
    the same plot to the eye: a committed suite keeps its plots small) and closes it."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    palette.save(path, format="PNG", optimize=True)


def _solid(suite: Suite, method: str) -> bool:
    """Guarded methods and the baseline are drawn solid, the others dashed."""
    return method in suite.roles.guarded or method == suite.roles.baseline


def plot_losses(suite: Suite, setting: str, fault: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    mults = suite.multipliers(setting, fault)
    fig, axes = plt.subplots(1, len(mults), figsize=(5 * len(mults), 4), squeeze=False)
    seed = min(r["seed"] for r in suite.select(setting=setting, fault=fault))
    cmap = plt.get_cmap("tab20")
    for ax, m in zip(axes[0], mults, strict=True):
        for i, method in enumerate(suite.methods):
            rs = suite.select(
                setting=setting, fault=fault, method=method, lr_multiplier=m, seed=seed
            )
            if not rs:
                continue
            lines = [r for r in _curves(suite, rs[0]) if r.get("kind") == "train"]
            every = max(1, int(suite.meta.get("spec", {}).get("train", {}).get("log_every", 1)))
            pts = [(r["step"], r["loss"]) for r in lines if r["step"] % every == 0]
            pts = [(s, v) for s, v in pts if _finite(v)]
            if pts:
                style = "-" if _solid(suite, method) else "--"
                ax.plot(*zip(*pts, strict=True), style, color=cmap(i), label=method, lw=1.3)
        ax.set_title(f"LR ×{m:g} ({suite.lr_of(setting, m):.0e})")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Training loss, seed {seed} — {setting}, fault: {fault}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_robustness(suite: Suite, setting: str, fault: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    mults = suite.multipliers(setting, fault)
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("tab20")
    for i, method in enumerate(suite.methods):
        xs, ys, es = [], [], []
        for m in mults:
            (mean, std), n = suite.cell(setting, fault, method, m)
            if n and math.isfinite(mean):
                xs.append(suite.lr_of(setting, m))
                ys.append(mean)
                es.append(std)
        if xs:
            style = "o-" if _solid(suite, method) else "s--"
            ax.errorbar(xs, ys, yerr=es, fmt=style, color=cmap(i), label=method, capsize=3, lw=1.3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation perplexity (mean ± std over seeds)")
    ax.set_title(f"Robustness to the learning rate — {setting}, fault: {fault}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_scale(suite: Suite, setting: str, fault: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    methods = [m for m in suite.methods if m in suite.roles.guarded]
    if not methods:
        return False
    mults = suite.multipliers(setting, fault)
    seed = min(r["seed"] for r in suite.select(setting=setting, fault=fault))
    fig, axes = plt.subplots(2, len(mults), figsize=(5 * len(mults), 6), squeeze=False, sharex=True)
    cmap = plt.get_cmap("tab10")
    regimes: dict[int, str] = {}
    for col, m in enumerate(mults):
        for i, method in enumerate(methods):
            rs = suite.select(
                setting=setting, fault=fault, method=method, lr_multiplier=m, seed=seed
            )
            if not rs:
                continue
            lines = [
                r
                for r in _curves(suite, rs[0])
                if r.get("kind") == "train" and "scale" in (r.get("telemetry") or {})
            ]
            steps = [r["step"] for r in lines]
            # The effective scale (per-tensor limits included) where the run logged it.
            tels = [r["telemetry"] for r in lines]
            applied = [t.get("effective_scale", t["scale"]) for t in tels]
            axes[0][col].plot(steps, applied, color=cmap(i), label=method)
            reg = [r["telemetry"]["regime"] for r in lines]
            for r in lines:
                regimes[r["telemetry"]["regime"]] = r["telemetry"].get("regime_name", "")
            axes[1][col].step(
                steps, [x + 0.08 * i for x in reg], where="post", color=cmap(i), label=method
            )
        axes[0][col].set_title(f"LR ×{m:g} ({suite.lr_of(setting, m):.0e})")
        axes[0][col].set_ylabel("effective scale")
        axes[0][col].set_ylim(0, 1.05)
        axes[0][col].grid(alpha=0.3)
        axes[1][col].set_ylabel("regime")
        axes[1][col].set_xlabel("step")
        axes[1][col].grid(alpha=0.3)
        if regimes:
            axes[1][col].set_yticks(sorted(regimes), [regimes[k] for k in sorted(regimes)])
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Guard scale and regime, seed {seed} — {setting}, fault: {fault}")
    fig.tight_layout()
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# The report.


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
        *_table(["method", "argument", "fraction of the run", "steps"], rows),
        "",
    ]


def write_report(directory: Path) -> Path:
    """Writes ``summary.md`` and the PNGs into the suite ``directory``; returns the summary's
    path."""
    import matplotlib

    matplotlib.use("Agg")
    suite = Suite(Path(directory))
    meta = suite.meta
    spec = meta.get("spec", {})
    md = [f"# Stress suite `{spec.get('name', suite.dir.name)}`", ""]
    if spec.get("description"):
        md += [spec["description"], ""]
    md += [
        f"- Command: `{meta.get('command', '')}`",
        f"- Machine: {meta.get('machine', '')}",
        f"- Code: git commit `{meta.get('git_commit', 'unknown')}`"
        + (
            f", with the uncommitted changes in `code.patch` "
            f"({', '.join(f'`{p}`' for p in meta['uncommitted'])})"
            if meta.get("uncommitted")
            else ""
        ),
        f"- Runs: {len(suite.records)} finished"
        + (f" of the {meta['planned_runs']} the suite plans" if meta.get("planned_runs") else "")
        + " "
        f"({sum(r['status'] == 'nonfinite' for r in suite.records)} stopped on NaN/Inf), "
        f"total run wall time {sum(r['wall_time_s'] or 0 for r in suite.records):.0f} s",
    ]
    parts = meta.get("invocations", [])
    if len(parts) > 1:
        md.append(
            f"- Run in {len(parts)} invocations into the same folder (each skips finished runs):"
        )
        md += [
            f"  - `{p['command']}`: {p['runs']} runs in {p['seconds']:.0f} s, commit "
            f"`{p['git_commit'][:7]}`"
            + (" (with uncommitted changes)" if p.get("uncommitted") else "")
            + (f"; {p['note']}" if p.get("note") else "")
            for p in parts
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
    source = suite.roles.subject or "guarded"  # The run the controls read.
    spike = meta.get("definitions", {}).get("spike_factor", SPIKE_FACTOR)
    target = meta.get("definitions", {}).get("target_factor", TARGET_FACTOR)
    md += [
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
    md += time_constants_block(meta)
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

    for setting in suite.settings:
        for fault in suite.faults:
            if not suite.select(setting=setting, fault=fault):
                continue
            sfx = _suffix(suite, setting, fault)
            md += [f"## {setting}, fault: {fault}", ""]
            md += [
                "### Final validation perplexity (mean ± std over seeds)",
                "",
                *ppl_table(suite, setting, fault),
                "",
            ]
            md += ["### Targets", "", *targets_block(suite, setting, fault), ""]
            roles = suite.roles
            subject_and_lr = [roles.subject] + [
                name
                for name, kind, source in roles.controls
                if kind == "effective-lr" and source == roles.subject
            ]
            clips = [m for m in suite.methods if m in roles.baselines] + [
                m for m in subject_and_lr if m in suite.methods
            ]
            md += [
                "### Clipping baselines",
                "",
                *ppl_table(suite, setting, fault, clips),
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
            md += [f"![{p}]({p})" for p in pngs] + [""]
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
