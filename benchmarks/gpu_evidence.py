"""GPU evidence in one command: the GPU stress suites and the GPU cost figures, in one folder.

    benchmarks/gpu_evidence.sh OUT_DIR              # one GPU: at most 8 minutes, all included
    benchmarks/gpu_evidence.sh OUT_DIR --smoke      # the same code on a CPU, micro models, < 3 min
    python -m benchmarks.gpu_evidence OUT_DIR       # the same, where ``lbw`` imports already

The whole command has ``--total-budget-s`` (465 s from its start; Python's own start-up comes
on top). Stages, in order, each stopped at its budget (:class:`train.stress.gpu_plan.Deadline`)
and each writing what it has (the output files are rewritten after every stage and every part
of the cost stage):

1. ``suite``: ``lbw-stress gpu`` (:mod:`train.stress.gpu_plan`): probe, plan (×30 given up
   first, then steps; refused before any run when even that does not fit), the runs (×10 and
   ×1 and the control first, ×30 last), the report. Budget: ``--suite-budget-s`` (360 s), and
   never what the cost stage keeps (``guard_reserve_s``).
2. ``depth``: ``lbw-stress gpu-depth`` (``small_125m``, 1,000 steps, AdamW and ``lbw`` at ×10
   and ×1), only when what is left (less the cost stage's reserve) fits its probe and its plan;
   a plan that does not fit is skipped, not refused.
3. ``guard``: the cost of a train step: the training loop's own jitted, donated step (0.5B,
   bf16, the suite's batch) run back to back with one sync per round, in interleaved rounds;
   scanned: AdamW, clip 1.0, ``lbw`` (the default), the published rule and SGG; then a
   ``jax.profiler`` trace of one ``lbw`` step (its kernel time; the file kept as
   ``trace.xplane.pb`` under 16 MiB); the HLO bytes of the scanned steps (achieved GB/s against
   the card's peak); unrolled: AdamW and ``lbw``. Each part runs only if its estimate fits what
   is left, else it is recorded as skipped with the reason.
4. ``sgg`` and ``model_step`` (only with ``--stages``): SGG's optimizer step alone, and
   ``benchmarks/model_step.py`` tokens/s, when time is left.

OUT_DIR receives seven files, no folders: ``summary.md``, ``evidence.json`` (every figure and
run record, the command, the machine, the code version), ``suite-summary.md`` and
``depth-summary.md`` (the suites' reports), ``suites.tar.gz`` (both suite folders with every
run's metrics, plots and the probes), ``trace.xplane.pb`` and ``log.txt``. The runs go to
``--work-dir`` (default: a new temporary folder). Exit status: 0, or 2 when the main suite's
plan was refused, 1 when a stage failed (the others still run).

The parts: :mod:`benchmarks.gpu_sizes` (the GPU run's and the smoke mode's sizes and budgets),
:mod:`benchmarks.gpu_machine` (the log, the clock, the machine and code record),
:mod:`benchmarks.gpu_suites` (stages 1 and 2), :mod:`benchmarks.gpu_timing` (stages 3 to 5) and
:mod:`benchmarks.gpu_summary` (``summary.md`` and ``evidence.json``); this module parses the
command line and runs the stages in order within the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu_machine import Clock, Tee, code, machine, say, where
from benchmarks.gpu_sizes import GPU_SIZES, SMOKE_SIZES
from benchmarks.gpu_suites import pack_suites, stage_suite
from benchmarks.gpu_summary import write_outputs
from benchmarks.gpu_timing import stage_guard, stage_model_step, stage_sgg
from lbw.train.stress import gpu_plan

STAGES = ("suite", "depth", "guard", "sgg", "model_step")
DEFAULT_STAGES = ("suite", "depth", "guard")
OUTPUTS = (
    "summary.md",
    "evidence.json",
    "suite-summary.md",
    "depth-summary.md",
    "suites.tar.gz",
    "trace.xplane.pb",
    "log.txt",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_evidence", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "out_dir", nargs="?", help="the output folder (created; our files are replaced)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, micro models, under 3 minutes")
    parser.add_argument("--work-dir", help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--total-budget-s", type=float, help="the whole command's budget")
    parser.add_argument("--suite-budget-s", type=float, help="the main suite's, probe included")
    parser.add_argument(
        "--guard-reserve-s", type=float, help="what the suites leave for the cost stage"
    )
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated stages to run, in this order, of: {', '.join(STAGES)} (default: "
        "%(default)s; a re-run can finish what a first run skipped)",
    )
    parser.add_argument(
        "--where",
        action="store_true",
        help="print the folders our packages import from, as JSON, and exit",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.where:
        print(json.dumps(where()))
        return 0
    if args.out_dir is None:
        parser.error("give the output folder OUT_DIR")
    stages = [x for x in args.stages.split(",") if x]
    if set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; known: {STAGES}")
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    for name in ("total_budget_s", "suite_budget_s", "guard_reserve_s"):
        if getattr(args, name) is not None:
            sizes = dataclasses.replace(sizes, **{name: getattr(args, name)})
    clock = Clock(sizes.total_budget_s)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUTS, "suite.json", "runs.jsonl", "suite-runs.tar.gz"):
        (out / name).unlink(missing_ok=True)  # This script's files, of this and older versions.
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-evidence-"))
    work.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("a")
    sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)

    command = "python -m benchmarks.gpu_evidence " + shlex.join(argv)
    state: dict[str, Any] = {"command": command, "results": {}}
    state["machine"] = machine()
    state["evidence"] = {
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": state["machine"],
        "code": code(),
        "work_dir": str(work),
        "budgets": {
            "total_s": sizes.total_budget_s,
            "suite_s": sizes.suite_budget_s,
            "guard_reserve_s": sizes.guard_reserve_s,
        },
        "stages": {},
    }
    say(f"{command}; work dir {work}; {state['machine']['summary']}")
    exit_status = 0

    def save() -> None:
        state["evidence"]["wall_s"] = round(clock.elapsed(), 1)
        write_outputs(out, state)

    def run_stage(name: str, budget_s: float, fn, *fn_args, optional: bool = False) -> None:
        """Runs ``fn`` within ``budget_s``; records how it ended; writes the outputs."""
        nonlocal exit_status
        say(f"stage {name} (budget {budget_s:.0f} s) ...")
        t0 = time.perf_counter()
        record: dict[str, Any] = {"status": "running", "budget_s": round(budget_s, 1)}
        state["evidence"]["stages"][name] = record
        try:
            with gpu_plan.Deadline(budget_s) as deadline:
                state["results"][name] = fn(*fn_args)
            if deadline.stopped:
                record.update(status="stopped", reason=f"stopped at its {budget_s:.0f} s budget")
            else:
                record["status"] = "done"
                if deadline.expired:
                    record["reason"] = f"over its {budget_s:.0f} s budget"
        except gpu_plan.BudgetError as e:
            if optional:
                record.update(status="skipped", reason=str(e))
            else:
                record.update(status="refused", reason=str(e))
                exit_status = max(exit_status, 2)
                print(f"gpu-evidence: error: {e}", file=sys.stderr)
        except Exception as e:  # Record it and go on with the next stage.
            record.update(status="failed", reason=f"{type(e).__name__}: {e}")
            exit_status = exit_status or 1
            traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        if name in ("suite", "depth"):
            pack_suites(out, work, state)
        save()
        say(f"stage {name}: {record['status']} in {record['seconds']} s")

    def skip(name: str, reason: str) -> None:
        state["evidence"]["stages"][name] = {"status": "skipped", "reason": reason}
        save()
        say(f"stage {name}: skipped ({reason})")

    reserve = sizes.guard_reserve_s if "guard" in stages else 0.0
    for name in stages:
        left = clock.left()
        if name == "suite":
            budget = min(sizes.suite_budget_s, left - reserve)
            run_stage(
                name, budget, stage_suite, sizes.scale, budget, work, state, "suite", optional=False
            )
        elif name == "depth":
            budget = left - reserve
            if budget < sizes.depth_min_s:
                skip(name, f"{max(budget, 0):.0f} s left for it, it needs {sizes.depth_min_s:.0f}")
                continue
            run_stage(
                name,
                budget,
                stage_suite,
                sizes.depth_scale,
                budget,
                work,
                state,
                "depth",
                optional=True,
            )
        elif name == "guard":
            plan = state.get("suite_plan")
            steps = plan.steps if plan is not None else sizes.scale.steps
            run_stage(name, left, stage_guard, sizes, steps, clock, state, out, save)
        elif name == "sgg":
            guess = 2 * sizes.unrolled_compile_s
            if left < guess:
                skip(name, f"needs about {guess:.0f} s, {left:.0f} s left")
                continue
            run_stage(name, left, stage_sgg, sizes, state)
        else:
            for i, (label, preset) in enumerate(sizes.model_presets):
                need = (1.0 if i == 0 else 1.5) * 2 * sizes.unrolled_compile_s
                if clock.left() < need:
                    skip(
                        f"model_step {label}",
                        f"needs about {need:.0f} s, {clock.left():.0f} s left",
                    )
                    continue
                run_stage(
                    f"model_step {label}", clock.left(), stage_model_step, sizes, label, preset
                )
        gc.collect()

    ev = state["evidence"]
    ev["exit_status"] = exit_status
    ev["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save()
    say(f"done in {ev['wall_s']} s, exit status {exit_status}; outputs in {out}")
    sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
    log.close()
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
