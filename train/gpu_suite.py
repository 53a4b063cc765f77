"""The ``gpu`` stress suite: the paper's learning-rate question at 0.5B scale, within a budget.

One H200 for minutes, not hours: the Qwen2.5-0.5B-style preset (random initialisation, bfloat16
compute, float32 master weights), sequences of 512 byte-level tokens of the shipped WikiText-2
sample, batch 8; the paper's calm learning rate 1e-4 and its stress rates 1e-3 and 3e-3; AdamW,
clipping at 1.0, the published rule, the governor and the effective-LR control (AdamW at the
governor run's learning rate × its mean applied scale, so it runs after the governor's runs);
one seed. The peak learning rate lives in the optimizer state
(``TrainConfig.peak_lr_in_state``), so the suite compiles once per optimizer, not once per run.

The step count is the budget's to choose. :func:`measure_probe` first trains the governor (the
costliest method) for a few steps, twice, and measures its compilation (first run), step,
evaluation and set-up times (second run); :func:`plan` then takes the largest step count (at
most ``max_steps``) whose estimate, :func:`estimate_s`, fits what the probe left of the
budget, and refuses with :class:`BudgetError` (before any suite run starts) when even
``floor_steps`` steps would not fit: fewer steps rather than fewer methods, down to a stated floor.

``lbw-stress gpu [--budget-s S] [--steps N]`` runs it; ``benchmarks/gpu_evidence.py`` runs it
with the GPU cost benchmarks and collects everything into one folder (``--smoke``: the same code
paths on a CPU with a micro model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lbw.train.config import TrainConfig
from lbw.train.stress.expand import expand
from lbw.train.stress.records import read_jsonl
from lbw.train.stress.spec import Method, Run, Setting, SuiteSpec

DEFAULT_BUDGET_S = 360.0  # Six minutes of one GPU, probe and compilation included.
CALM_LR = 1e-4  # The paper's calm learning rate; ×10 and ×30 are its stress rates.
LR_MULTIPLIERS = (1.0, 10.0, 30.0)
MARGIN = 1.1  # Estimates are multiplied by this before they are compared with the budget.
RESERVE_S = 10.0  # Report and bookkeeping after the runs.
# The micro model of the smoke mode: the tiny Qwen2.5 layout cut to one narrow layer.
MICRO_MODEL = {
    "num_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
}


class BudgetError(ValueError):
    """A suite plan that would not fit its time budget."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale:
    """The sizes that differ between the GPU suite and its CPU smoke mode.

    Attributes:
      name: the suite's name (its directory).
      model: a preset of ``models.PRESETS``.
      model_overrides: fields of the preset to replace (the compute dtype among them).
      seq_len, batch_size: the shape of a training batch.
      eval_batches: batches of the fixed evaluation set.
      evals: evaluations per run (the last one at the final step).
      log_every: steps per telemetry line.
      probe_steps: steps of the probe run (two evaluations and two log lines within them).
      floor_steps: the fewest steps a run may have; a plan below it is refused.
      max_steps: the most steps a run gets, whatever the budget.
      device: the kind of machine, for the report.
    """

    name: str
    model: str
    model_overrides: Mapping[str, Any]
    seq_len: int
    batch_size: int
    eval_batches: int
    evals: int
    log_every: int
    probe_steps: int
    floor_steps: int
    max_steps: int
    device: str


GPU = Scale(
    name="gpu",
    model="qwen2_5_0_5b",
    model_overrides={"dtype": "bfloat16"},
    seq_len=512,
    batch_size=8,
    eval_batches=8,
    evals=4,
    log_every=5,
    probe_steps=10,
    floor_steps=50,
    max_steps=1000,
    device="GPU",
)
SMOKE = Scale(
    name="gpu-smoke",
    model="tiny_qwen2_5_3b",
    model_overrides={**MICRO_MODEL, "dtype": "bfloat16"},
    seq_len=32,
    batch_size=2,
    eval_batches=1,
    evals=2,
    log_every=2,
    probe_steps=4,
    floor_steps=4,
    max_steps=8,
    device="CPU (smoke mode of the GPU suite)",
)


def train_fields(scale: Scale, steps: int) -> dict[str, Any]:
    """The :class:`TrainConfig` fields shared by every run of ``steps`` steps."""
    return dict(
        data="wikitext2",
        seq_len=scale.seq_len,
        batch_size=scale.batch_size,
        steps=steps,
        warmup_steps=max(1, steps // 10),
        schedule="cosine",
        eval_every=max(1, math.ceil(steps / scale.evals)),
        eval_batches=scale.eval_batches,
        log_every=min(scale.log_every, steps),
        checkpoint_every=0,
        peak_lr_in_state=True,
    )


def gpu(scale: Scale = GPU, steps: int | None = None, note: str = "") -> SuiteSpec:
    """The suite at ``scale`` with ``steps`` steps per run (``None``: ``floor_steps``, the
    step count a plan chooses is set by :func:`plan`)."""
    steps = scale.floor_steps if steps is None else steps
    lrs = ", ".join(f"{CALM_LR * m:g}" for m in LR_MULTIPLIERS)
    return SuiteSpec(
        name=scale.name,
        description=(
            f"{scale.device} suite: the paper's question at the largest scale one GPU answers in "
            f"minutes. {scale.model} ({dict(scale.model_overrides)}; random initialisation, "
            f"float32 master weights, full-parameter), {steps} steps of {scale.batch_size}×"
            f"{scale.seq_len} byte-level tokens of the shipped WikiText-2 sample; learning "
            f"rates {lrs} (calm, then the paper's stress rates); AdamW, clipping at 1.0, the "
            "published rule, the governor and the effective-LR control; one seed." + note
        ),
        settings=(
            Setting(
                name=scale.model,
                model=scale.model,
                model_overrides=dict(scale.model_overrides),
                base_lr=CALM_LR,
                base_lr_note="the paper's calm learning rate",
            ),
        ),
        methods=(
            Method(name="adamw", optimizer="adamw"),
            Method(name="adamw+clip", optimizer="adamw+clip", overrides={"clip_threshold": 1.0}),
            Method(name="reference", optimizer="lbw", overrides={"policy": "reference"}),
            Method(name="governor", optimizer="lbw", overrides={"policy": "governor"}),
            Method(
                name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"
            ),
        ),
        lr_multipliers=LR_MULTIPLIERS,
        seeds=(0,),
        train=train_fields(scale, steps),
        device=scale.device,
    )


# ---------------------------------------------------------------------------------------------
# Probe, estimate, plan.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe:
    """Times measured by a short run of the costliest method (seconds).

    Attributes:
      compile_s: the first step, its compilation included.
      step_s: a steady-state step.
      eval_s: a steady-state evaluation.
      setup_s: the rest of a run that reuses compiled steps: data, model and optimizer
        set-up, telemetry.
      wall_s: the probe's own wall clock, all included.
    """

    compile_s: float
    step_s: float
    eval_s: float
    setup_s: float
    wall_s: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


def probe_config(scale: Scale, out_dir: str | Path) -> TrainConfig:
    """The probe: the governor at the calm learning rate, ``probe_steps`` steps, evaluated and
    logged at the half and at the end."""
    half = max(1, scale.probe_steps // 2)
    fields = train_fields(scale, scale.probe_steps)
    fields.update(eval_every=half, log_every=half)
    return TrainConfig(
        **fields,
        model=scale.model,
        model_overrides=dict(scale.model_overrides),
        optimizer="lbw",
        policy="governor",
        learning_rate=CALM_LR,
        quiet=True,
        out_dir=str(out_dir),
    )


def probe_from_runs(first: Mapping[str, Any], again: Mapping[str, Any], lines) -> Probe:
    """The :class:`Probe` of two runs of the probe config: the first one compiles (its
    ``summary``), the second one reuses everything and gives the steady-state times (its
    summary and ``metrics.jsonl`` lines)."""
    walls: dict[tuple[str, int], float] = {
        (line["kind"], line["step"]): line["wall_time_s"] for line in lines
    }
    evals = [
        walls["eval", step] - walls["train", step]
        for kind, step in walls
        if kind == "eval" and ("train", step) in walls
    ]
    if not evals:
        raise ValueError("the probe needs an evaluation right after a telemetry line.")
    steps, step_s = again["step"], again["step_time_s"] or 0.0
    setup_s = again["wall_time_s"] - again["compile_s"] - (steps - 1) * step_s - sum(evals)
    return Probe(
        compile_s=first["compile_s"],
        step_s=step_s,
        eval_s=max(evals),
        setup_s=max(setup_s, 0.0),
        wall_s=first["wall_time_s"] + again["wall_time_s"],
    )


def measure_probe(scale: Scale, out_dir: str | Path) -> Probe:
    """Runs the probe twice into ``out_dir`` (replacing an earlier one) and returns its times:
    the compilation from the first run, the steady-state times from the second, which reuses
    the first one's compiled steps."""
    import shutil

    from lbw.train.loop import train

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    first = train(probe_config(scale, out_dir / "first"))
    again = train(probe_config(scale, out_dir / "again"))
    probe = probe_from_runs(first, again, read_jsonl(out_dir / "again" / "metrics.jsonl"))
    return dataclasses.replace(probe, wall_s=time.perf_counter() - start)


def compilations(runs: Sequence[Run]) -> int:
    """How many train steps ``runs`` compile: one per distinct config up to the fields that do
    not enter the compiled step (the seed, the output, the logging; the learning rate when it
    lives in the state). A control runs AdamW."""
    ignored = {"seed", "out_dir", "quiet", "log_every", "eval_every", "export_to", "init_from"}
    keys = set()
    for run in runs:
        config = dict(run.config)
        if run.control is not None:
            config["optimizer"] = "adamw"
        if config.get("peak_lr_in_state"):
            ignored.add("learning_rate")
        keys.add(json.dumps({k: v for k, v in config.items() if k not in ignored}, default=str))
    return len(keys)


def estimate_s(spec: SuiteSpec, probe: Probe) -> float:
    """The estimated wall clock of ``spec``'s runs from ``probe``'s times (no margin)."""
    runs = expand(spec)
    steps = int(spec.train["steps"])
    evals = math.ceil(steps / int(spec.train["eval_every"]))
    per_run = probe.setup_s + evals * probe.eval_s + steps * probe.step_s
    return compilations(runs) * probe.compile_s + len(runs) * per_run


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A suite that fits its budget: the spec, its step count, and how it was chosen."""

    spec: SuiteSpec
    steps: int
    runs: int
    compilations: int
    estimate_s: float
    budget_s: float
    available_s: float
    floor_steps: int
    probe: Probe

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "runs": self.runs,
            "compilations": self.compilations,
            "estimate_s": round(self.estimate_s, 1),
            "margin": MARGIN,
            "budget_s": self.budget_s,
            "available_s": round(self.available_s, 1),
            "floor_steps": self.floor_steps,
            "probe": self.probe.to_dict(),
        }


def plan(
    probe: Probe, budget_s: float = DEFAULT_BUDGET_S, scale: Scale = GPU, steps: int | None = None
) -> Plan:
    """The suite with the most steps (at most ``scale.max_steps``) that fits the budget.

    The budget counts the probe: the runs get ``budget_s − probe.wall_s − RESERVE_S``, and a
    plan fits when ``MARGIN ×`` :func:`estimate_s` is within it.

    Args:
      probe: the measured times (:func:`measure_probe`).
      budget_s: the suite's whole budget in seconds.
      scale: :data:`GPU` or :data:`SMOKE`.
      steps: a fixed step count to check instead of choosing one.

    Raises:
      BudgetError: if ``steps`` (or, without it, ``scale.floor_steps``) would not fit; the
        message gives the estimate, the budget and the probe's times.
    """
    available = budget_s - probe.wall_s - RESERVE_S

    def fits(n: int) -> bool:
        return MARGIN * estimate_s(gpu(scale, n), probe) <= available

    wanted = scale.floor_steps if steps is None else steps
    if not fits(wanted):
        need = MARGIN * estimate_s(gpu(scale, wanted), probe) + probe.wall_s + RESERVE_S
        what = f"{wanted} steps" if steps is not None else f"the floor of {wanted} steps"
        raise BudgetError(
            f"suite {scale.name!r} does not fit its {budget_s:.0f} s budget: at {what} per run "
            f"it needs about {need:.0f} s (probe {probe.wall_s:.0f} s; compilation "
            f"{probe.compile_s:.1f} s, step {1e3 * probe.step_s:.1f} ms, evaluation "
            f"{probe.eval_s:.2f} s, set-up {probe.setup_s:.1f} s); raise --budget-s or use a "
            "faster machine."
        )
    if steps is None:
        lo, hi = wanted, scale.max_steps  # fits(lo); the estimate grows with the steps.
        if fits(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        steps = lo
    note = (
        f" {steps} steps per run: the most (at most {scale.max_steps}, at least "
        f"{scale.floor_steps}) that a probe of {scale.probe_steps} steps "
        f"(step {1e3 * probe.step_s:.1f} ms, compilation {probe.compile_s:.1f} s) fits into a "
        f"{budget_s:.0f} s budget."
    )
    spec = gpu(scale, steps, note=note)
    runs = expand(spec)
    return Plan(
        spec=spec,
        steps=steps,
        runs=len(runs),
        compilations=compilations(runs),
        estimate_s=estimate_s(spec, probe),
        budget_s=budget_s,
        available_s=available,
        floor_steps=scale.floor_steps,
        probe=probe,
    )


def prepare(
    out: str | Path,
    budget_s: float = DEFAULT_BUDGET_S,
    scale: Scale = GPU,
    steps: int | None = None,
) -> Plan:
    """Measures the probe (into ``out/<suite>-probe``) and returns the plan.

    Raises:
      BudgetError: as :func:`plan`.
    """
    if not budget_s > 0:
        raise BudgetError(f"budget_s must be positive, got {budget_s!r}.")
    probe = measure_probe(scale, Path(out) / f"{scale.name}-probe")
    return plan(probe, budget_s, scale, steps)


def record_plan(suite_dir: str | Path, the_plan: Plan) -> None:
    """Adds the plan to the suite's ``suite.json``."""
    path = Path(suite_dir) / "suite.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta["plan"] = the_plan.to_dict()
    path.write_text(json.dumps(meta, indent=2) + "\n")
