"""The GPU suites: the paper's learning-rate question in the minutes a GPU is lent.

``gpu`` (:data:`GPU`): the Qwen2.5-0.5B-style preset with scanned (stacked) layers, so each
optimizer compiles in seconds, not the ~40 s of the unrolled 24 layers (random initialisation,
bfloat16 compute, float32 master weights), 8 × 512 byte-level tokens of the shipped WikiText-2
sample, 300 steps, warm-up 10 %, cosine, evaluated on 4 batches at 5 points; the paper's calm
learning rate 1e-4 (×1) and its stress rates 1e-3 (×10) and 3e-3 (×30); AdamW, AdamW + clip
1.0, the default (``lbw_adamw``'s: the governor over AdamW clipped at 1.0), the unclipped
governor when it is not that default (:data:`UNCLIPPED_GOVERNOR`), and the effective-LR
control at ×10 (AdamW at the default run's learning rate × its mean applied scale); one seed.
Runs go ×10 first and ×30 last.

``gpu-depth`` (:data:`DEPTH`): ``small_125m`` (GPT-2-small scale), 1,000 steps of 4 × 512
tokens, AdamW against the default at ×10 and ×1: depth (more steps) where the 0.5B suite has width.

The peak learning rate lives in the optimizer state (``TrainConfig.peak_lr_in_state``), so a
suite compiles once per optimizer, not once per run. :func:`measure_probe` trains ``lbw`` for a
few steps, twice: its compilation (first run), step, evaluation and set-up times (second run).
:func:`plan` then fits the suite into what the probe left of the budget, giving up first the
multipliers of ``Scale.droppable`` (×30 for ``gpu``, ×1 for ``gpu-depth``), then steps down to
``Scale.floor_steps``, and refuses with :class:`BudgetError` (before any run starts) below that.
:func:`run_plan` runs a plan until a deadline (:class:`Deadline`) and always leaves the records
and the report of the runs that finished.

The scales and their suite specs are defined in :mod:`lbw.train.stress.gpu_scales` (imported
here too); this module fits them into a budget and runs them.

``lbw-stress gpu [--budget-s S] [--steps N]`` (and ``gpu-depth``) runs one suite;
``python -m benchmarks.gpu_evidence`` runs both with the GPU cost figures (``--smoke``: the same
code on a CPU with micro models).
"""

from __future__ import annotations

import _thread
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lbw.train.config import TrainConfig
from lbw.train.stress.expand import expand
from lbw.train.stress.gpu_scales import (  # noqa: F401  (the plan's public names)
    CALM_LR,
    CLIP,
    CONTROL_MULTIPLIERS,
    DEFAULT,
    DEFAULT_BUDGET_S,
    DEPTH,
    DEPTH_SMOKE,
    EFFECTIVE_LR,
    GPU,
    MARGIN,
    MICRO_MODEL,
    RESERVE_S,
    SCALES,
    SMOKE,
    UNCLIPPED_GOVERNOR,
    BudgetError,
    Scale,
    stress_methods,
    suite,
    train_fields,
)
from lbw.train.stress.records import read_jsonl
from lbw.train.stress.runner import run_suite
from lbw.train.stress.spec import Run, SuiteSpec

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
    """The probe: the default at the calm learning rate, ``probe_steps`` steps,
    evaluated and logged at the half and at the end."""
    half = max(1, scale.probe_steps // 2)
    fields = train_fields(scale, scale.probe_steps)
    fields.update(eval_every=half, log_every=half)
    return TrainConfig(
        **fields,
        model=scale.model,
        model_overrides=dict(scale.model_overrides),
        optimizer=DEFAULT.optimizer,
        **DEFAULT.overrides,
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
    from lbw.train.loop import train  # JAX is imported when a run starts, not before.

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


def run_estimate_s(spec: SuiteSpec, probe: Probe) -> float:
    """The estimated wall clock of one run of ``spec`` that reuses a compiled step."""
    steps = int(spec.train["steps"])
    evals = math.ceil(steps / int(spec.train["eval_every"]))
    return probe.setup_s + evals * probe.eval_s + steps * probe.step_s


def estimate_s(spec: SuiteSpec, probe: Probe) -> float:
    """The estimated wall clock of ``spec``'s runs from ``probe``'s times (no margin)."""
    runs = expand(spec)
    return compilations(runs) * probe.compile_s + len(runs) * run_estimate_s(spec, probe)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A suite that fits its budget: the spec, its steps and multipliers, what was given up."""

    spec: SuiteSpec
    scale: Scale
    steps: int
    multipliers: tuple[float, ...]
    dropped: tuple[str, ...]
    runs: int
    compilations: int
    estimate_s: float
    run_estimate_s: float
    budget_s: float
    available_s: float
    probe: Probe

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.spec.name,
            "steps": self.steps,
            "multipliers": list(self.multipliers),
            "dropped": list(self.dropped),
            "runs": self.runs,
            "compilations": self.compilations,
            "estimate_s": round(self.estimate_s, 1),
            "run_estimate_s": round(self.run_estimate_s, 2),
            "margin": MARGIN,
            "budget_s": self.budget_s,
            "available_s": round(self.available_s, 1),
            "wanted_steps": self.scale.steps,
            "floor_steps": self.scale.floor_steps,
            "probe": self.probe.to_dict(),
        }


def _mults(values: Sequence[float]) -> str:
    return ", ".join(f"×{m:g}" for m in values)


def plan(
    probe: Probe, budget_s: float = DEFAULT_BUDGET_S, scale: Scale = GPU, steps: int | None = None
) -> Plan:
    """The suite that fits the budget, giving up as little as it must.

    The budget counts the probe: the runs get ``budget_s − probe.wall_s − RESERVE_S``, and a
    suite fits when ``MARGIN ×`` :func:`estimate_s` is within it. In order of preference:
    every multiplier at ``scale.steps`` (or ``steps``); without the multipliers of
    ``scale.droppable``, one after the other; then (without ``steps``) the most steps down to
    ``scale.floor_steps``, without them. Each thing given up is named in ``Plan.dropped`` and in
    the suite's description.

    Args:
      probe: the measured times (:func:`measure_probe`).
      budget_s: the suite's whole budget in seconds.
      scale: :data:`GPU`, :data:`DEPTH` or a smoke scale.
      steps: a fixed step count to check instead of ``scale.steps`` (never cut).

    Raises:
      BudgetError: if nothing fits; the message gives the estimate of the smallest plan, the
        budget and the probe's times.
    """
    available = budget_s - probe.wall_s - RESERVE_S
    wanted = scale.steps if steps is None else steps

    def need(mults: Sequence[float], n: int) -> float:
        return MARGIN * estimate_s(suite(scale, n, mults), probe)

    options = [tuple(scale.lr_multipliers)]
    for m in scale.droppable:
        options.append(tuple(x for x in options[-1] if x != m))
    dropped: list[str] = []
    chosen = None
    for i, mults in enumerate(options):
        if need(mults, wanted) <= available:
            chosen = (mults, wanted)
            break
        if i + 1 < len(options):
            gone = _mults(sorted(set(mults) - set(options[i + 1])))
            dropped.append(
                f"{gone} (with it the plan needs about {need(mults, wanted):.0f} s of the "
                f"{available:.0f} s left)"
            )
    if chosen is None and steps is None and scale.floor_steps < wanted:
        mults = options[-1]
        if need(mults, scale.floor_steps) <= available:
            lo, hi = scale.floor_steps, wanted  # Fits at lo, not at hi.
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if need(mults, mid) <= available else (lo, mid)
            dropped.append(
                f"steps: {lo} instead of {wanted} (at {wanted} the plan needs about "
                f"{need(mults, wanted):.0f} s of the {available:.0f} s left)"
            )
            chosen = (mults, lo)
    if chosen is None:
        floor = wanted if steps is not None else scale.floor_steps
        total = need(options[-1], floor) + probe.wall_s + RESERVE_S
        what = f"{floor} steps" if steps is not None else f"the floor of {floor} steps"
        raise BudgetError(
            f"suite {scale.name!r} does not fit its {budget_s:.0f} s budget: at {what} per run "
            f"and {_mults(sorted(options[-1]))} it needs about {total:.0f} s (probe "
            f"{probe.wall_s:.0f} s; compilation {probe.compile_s:.1f} s, step "
            f"{1e3 * probe.step_s:.1f} ms, evaluation {probe.eval_s:.2f} s, set-up "
            f"{probe.setup_s:.1f} s); raise --budget-s or use a faster machine."
        )
    mults, n = chosen
    note = (
        f" Plan: {n} steps per run at {_mults(sorted(mults))}, estimated from a probe of "
        f"{scale.probe_steps} steps (step {1e3 * probe.step_s:.1f} ms, compilation "
        f"{probe.compile_s:.1f} s) to fit a {budget_s:.0f} s budget"
        + (f"; given up to fit: {'; '.join(dropped)}." if dropped else ".")
    )
    spec = suite(scale, n, mults, note=note)
    runs = expand(spec)
    return Plan(
        spec=spec,
        scale=scale,
        steps=n,
        multipliers=mults,
        dropped=tuple(dropped),
        runs=len(runs),
        compilations=compilations(runs),
        estimate_s=estimate_s(spec, probe),
        run_estimate_s=run_estimate_s(spec, probe),
        budget_s=budget_s,
        available_s=available,
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


def record_plan(suite_dir: str | Path, the_plan: Plan, **extra: Any) -> None:
    """Adds the plan (and ``extra``) to the suite's ``suite.json``."""
    path = Path(suite_dir) / "suite.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta["plan"] = {**the_plan.to_dict(), **extra}
    path.write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Running within a deadline.


_INTERRUPT_LOCK = threading.Lock()
_INTERRUPTED: weakref.WeakSet = weakref.WeakSet()  # The runs' SIGINT handlers interrupted.


class Deadline:
    """Stops the training run in its block once ``seconds`` have passed, between two steps.

    After the deadline a timer thread waits until the main thread runs a training step (its
    SIGINT handler is the loop's, deferred: :mod:`train.interrupts`), then interrupts it as a
    Ctrl-C would (``_thread.interrupt_main``): the run stops after the step under way, with
    its files consistent, and raises ``Interrupted``, which this block swallows
    (:attr:`stopped` tells; :attr:`expired`: the deadline passed). Nothing else is ever
    interrupted (a compilation, a write): code that does not train checks :meth:`left` itself.
    A Ctrl-C of the user's still propagates. Use it in the main thread.
    """

    POLL_S = 0.2

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False  # The deadline passed.
        self.stopped = False  # It stopped the block.
        self._start = time.perf_counter()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.seconds - (time.perf_counter() - self._start)

    def _watch(self) -> None:
        from lbw.train.interrupts import Sigint

        if self._done.wait(max(self.left(), 0.0)):
            return
        self.expired = True
        while not self._done.wait(self.POLL_S):  # Each run under way (its own handler), once.
            handler = signal.getsignal(signal.SIGINT)
            if not (isinstance(handler, Sigint) and handler.deferred):
                continue
            with _INTERRUPT_LOCK:  # Nested deadlines interrupt a run once.
                if handler.received or handler in _INTERRUPTED:
                    continue
                _INTERRUPTED.add(handler)
                _thread.interrupt_main(signal.SIGINT)

    def __enter__(self) -> Deadline:
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        stopped = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.stopped = stopped and self.expired
        return self.stopped


def run_plan(
    the_plan: Plan,
    out: str | Path,
    seconds: float,
    *,
    command: str = "",
    machine: str = "",
) -> dict[str, Any]:
    """Runs ``the_plan``'s suite under ``out`` for at most ``seconds`` (then stops it and
    collects the runs that finished), writes ``runs.jsonl``, the report and the plan.

    The runs at the multipliers the plan would give up first (``Scale.droppable``) run last,
    after the others' controls: a suite stopped early loses them first.

    Returns:
      ``{"suite_dir", "stopped" (the deadline stopped it), "seconds", "records"}``.
    """
    start = time.perf_counter()
    suite_dir = Path(out) / the_plan.spec.name
    core = tuple(m for m in the_plan.multipliers if m not in the_plan.scale.droppable)
    passes = [the_plan.spec]
    if core and core != the_plan.multipliers:  # Run ids do not depend on the suite.
        passes.insert(0, suite(the_plan.scale, the_plan.steps, core, note=" (first part)"))
    with Deadline(seconds) as deadline:
        for spec in passes:
            run_suite(spec, out, workers=1, progress=False, command=command, machine=machine)
    if deadline.stopped:  # Records and report of the finished runs.
        run_suite(
            the_plan.spec, out, progress=False, command=command, machine=machine, collect_only=True
        )
    elapsed = time.perf_counter() - start
    records = read_jsonl(suite_dir / "runs.jsonl")
    record_plan(
        suite_dir,
        the_plan,
        stopped_at_deadline=deadline.stopped,
        deadline_s=round(seconds, 1),
        seconds=round(elapsed, 1),
    )
    return {
        "suite_dir": suite_dir,
        "stopped": deadline.stopped,
        "seconds": elapsed,
        "records": records,
    }


def per_method(the_plan: Plan, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each method's measured run wall clock (its runs' ``wall_time_s``; the first one
    compiles) beside the plan's estimate of a run (plus one compilation for the first, except
    for a control, which reuses AdamW's step)."""
    out: dict[str, Any] = {}
    for r in records:
        compiles = 0.0 if r.get("control") else the_plan.probe.compile_s
        entry = out.setdefault(
            r["method"],
            {
                "estimated_run_s": round(the_plan.run_estimate_s, 2),
                "estimated_first_run_s": round(the_plan.run_estimate_s + compiles, 2),
                "measured_run_s": [],
                "compile_s": [],
            },
        )
        entry["measured_run_s"].append(r.get("wall_time_s"))
        entry["compile_s"].append(r.get("compile_s"))
    return out
