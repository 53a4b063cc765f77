"""The stress suite's plots (PNG): loss curves, robustness to the learning rate, and the guard's
scale and regime, from a :class:`~train.stress.results.Suite`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lbw.train.stress.results import Suite, finite


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
    """Training loss curves of every method, one panel per learning rate (the first seed)."""
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
            pts = [(s, v) for s, v in pts if finite(v)]
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
    """Final perplexity (mean ± std over seeds) against the peak learning rate, per method."""
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
    """The guarded methods' effective scale and regime over the steps (the first seed); False,
    and no file, when the suite runs no guarded method."""
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
