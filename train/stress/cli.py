"""``lbw-stress``: run a suite (resumable), or regenerate a suite's report from its records."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lbw.train.config import UserError
from lbw.train.stress import check, gpu_plan, report
from lbw.train.stress.records import read_jsonl
from lbw.train.stress.runner import run_suite
from lbw.train.stress.suites import SUITES


def machine() -> str:
    import platform

    import jax

    backend = jax.default_backend().upper()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    arch = platform.machine().replace("_", "-")
    return f"{os.cpu_count()}-core {arch} {backend}, {memory:.0f} GiB, JAX {jax.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """``lbw-stress [quick|full|paper|gpu|gpu-depth] [--out results] [--workers N]
    [--seeds ...] [--quiet] [--budget-s S] [--steps N] [--check DIR]``, or ``lbw-stress report
    DIR``."""
    from lbw.train.cli import ArgumentParser, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        p = ArgumentParser(
            prog="lbw-stress report", description="Regenerate a suite's report from its JSONL."
        )
        p.add_argument("directory", help="a suite directory, e.g. results/quick")
        args = p.parse_args(argv[1:])
        directory = Path(args.directory)
        if not directory.is_dir():
            p.error(f"no suite folder {str(directory)!r}; give the folder of a suite run")
        if not read_jsonl(directory / "runs.jsonl"):
            p.error(
                f"{str(directory)!r} holds no runs.jsonl with finished runs; give the folder of "
                "a suite run (e.g. results/quick), or write one from an interrupted suite's "
                "finished runs with 'lbw-stress SUITE --out ROOT --collect'"
            )
        path = report.write_report(directory)
        print(report.headline(directory))
        print(f"\nreport: {path}")
        return 0
    p = ArgumentParser(
        prog="lbw-stress",
        description="Run a stress suite (resumable: finished runs are not redone), then write "
        "summary.md, runs.jsonl and plots under OUT/SUITE. 'lbw-stress report DIR' regenerates "
        "a report from the JSONL alone.",
    )
    p.add_argument("suite", nargs="?", default="quick", choices=sorted(SUITES))
    p.add_argument(
        "--out",
        default="runs",
        help="output root (default: %(default)s; the committed results/ used --out results)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: min(2, CPU count) = %(default)s)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or progress lines (the final table is still printed)",
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="S",
        help="when stderr is not a terminal (a log file, nohup, CI), print a plain progress "
        "line every S seconds: runs done, time left, and the step, loss, tokens/s and regime of "
        "each run under way (default: %(default)s)",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: write runs.jsonl and the report from the finished runs of an "
        "interrupted suite",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="gpu suites: the time budget in seconds, probe and compilation included (default: "
        "360); a plan gives up ×30 (gpu-depth: ×1), then steps, to fit, and is refused before "
        "any run starts when nothing fits",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="gpu suites: steps per run (default: 300 for gpu, 1000 for gpu-depth)",
    )
    p.add_argument(
        "--check",
        metavar="DIR",
        help="rerun the suite into --out as usual (never into DIR), then compare it with DIR's "
        "runs.jsonl cell by cell (setting × fault × method × learning rate, fault-free and "
        "faults): print the cells whose mean final perplexity over seeds moved by more than "
        "their spread, and the cells only one side has; exit status 1 if any cell moved, else "
        "0. Spread: the larger of the two sides' seed standard deviations (the ± of the "
        "reports' tables; not the range, which grows with the number of seeds), at least 0.1%% "
        "of the old mean (below the tables' two decimals); a cell whose diverged seeds differ "
        "moved too. Runs already finished under OUT/SUITE are not redone: give a fresh --out",
    )
    args = p.parse_args(argv)
    spec = SUITES[args.suite]()
    reference = None
    if args.check is not None:
        reference = Path(args.check)
        if not read_jsonl(reference / "runs.jsonl"):
            p.error(
                f"--check {str(reference)!r}: no runs.jsonl with finished runs there; give the "
                "folder of a suite run (e.g. results/quick)"
            )
        if (Path(args.out) / spec.name).resolve() == reference.resolve():
            p.error(
                f"--check {str(reference)!r} is where --out {args.out!r} would write; the check "
                "reruns into another folder: give another --out (e.g. the default, runs)"
            )
        rerun = Path(args.out) / spec.name
        if (rerun / "runs.jsonl").is_file() or any(rerun.glob("runs/*/summary.json")):
            print(
                f"lbw-stress: {str(rerun)!r} already holds runs: those finished are not rerun, "
                "so the check compares them as they are (give a fresh --out to rerun every run)",
                file=sys.stderr,
            )
    plan = None
    if args.suite in gpu_plan.SCALES and not args.collect:
        try:
            budget = gpu_plan.DEFAULT_BUDGET_S if args.budget_s is None else args.budget_s
            scale = gpu_plan.SCALES[args.suite]
            plan = gpu_plan.prepare(args.out, budget, scale, steps=args.steps)
        except gpu_plan.BudgetError as e:
            print(f"lbw-stress: error: {e}", file=sys.stderr)
            return 2
        spec = plan.spec
    if args.seeds:
        spec = spec.replaced(seeds=tuple(args.seeds))
    command = "lbw-stress " + " ".join(argv) if argv else "lbw-stress"
    out = Path(args.out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                p.error(f"--out {str(out)!r}: {str(path)!r} is a file; give a folder")
            break
    try:
        suite_dir = run_suite(
            spec,
            args.out,
            # One process shares compilations.
            workers=1 if args.suite in gpu_plan.SCALES else args.workers,
            progress=not args.quiet,
            progress_every=args.progress_every,
            command=command.strip(),
            machine=machine(),
            collect_only=args.collect,
        )
    except UserError as e:
        print(f"lbw-stress: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "lbw-stress: interrupted; finished runs are kept: the same command resumes the suite, "
            "and --collect reports the finished runs",
            file=sys.stderr,
        )
        return 130
    if plan is not None:
        gpu_plan.record_plan(suite_dir, plan)
    print(report.headline(suite_dir))
    print(f"\nreport: {suite_dir / 'summary.md'}")
    if reference is not None:
        rows = check.compare(
            read_jsonl(reference / "runs.jsonl"), read_jsonl(suite_dir / "runs.jsonl")
        )
        print("\n" + "\n".join(check.report(rows, str(reference), str(suite_dir))))
        return 1 if any(r.moved for r in rows) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
