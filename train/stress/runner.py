"""Running a suite: a process pool over the expanded runs, resumable, with git provenance.

:func:`run_suite` runs the base pre-trainings, the base learning-rate sweep
(:func:`choose_base_lr`), the methods, then the controls that read them; records the finished
runs in ``runs.jsonl``, the spec and provenance in ``suite.json``, packs the runs' metrics
(:mod:`train.archive`) and writes the report (:mod:`train.stress.report`).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lbw.train import archive, peers  # peers registers the peers and the replay control.
from lbw.train.config import TrainConfig, UserError
from lbw.train.progress import describe, format_duration
from lbw.train.stress import report
from lbw.train.stress.expand import expand, expand_pretrain, expand_sweep, run_id, time_constants
from lbw.train.stress.records import (
    _finite,
    collect,
    mean_scale,
    read_jsonl,
    read_summary,
    scale_trace,
    write_json,
    write_jsonl,
)
from lbw.train.stress.spec import BASELINE, SPIKE_FACTOR, TARGET_FACTOR, Run, SuiteSpec

BASE_MODEL = "model"  # The exported weights of a base pre-training run, in its run folder.


def _finished(runs_dir: Path, rid: str, stage: str) -> bool:
    """Whether run ``rid`` is done: a complete summary and, for a base pre-training, the
    exported model (not committed with results, so a fresh clone re-creates it)."""
    if read_summary(runs_dir / rid) is None:
        return False
    return stage != "pretrain" or (runs_dir / rid / BASE_MODEL / "config.json").is_file()


def _resolve(run: Run, runs_dir: Path) -> dict[str, Any]:
    """The run's TrainConfig fields, a control's learning rate/optimizer read from its source."""
    config = dict(run.config)
    if run.stage == "pretrain":
        config["export_to"] = str(runs_dir / run.run_id / BASE_MODEL)
    if run.base is not None:
        if not _finished(runs_dir, run.base, "pretrain"):
            raise RuntimeError(f"{run.run_id} needs the base {run.base}, which has not finished.")
        config["init_from"] = str(runs_dir / run.base / BASE_MODEL)
    if run.control is None:
        return config
    source_dir = runs_dir / run.depends_on
    source = read_summary(source_dir)
    if source is None:
        raise RuntimeError(f"control {run.run_id} needs {run.depends_on}, which has not finished.")
    if run.control == "effective-lr":
        scale = mean_scale(source.get("telemetry") or {})
        if scale is None:
            raise ValueError(f"{run.depends_on} has no guard telemetry to read a scale from.")
        config["learning_rate"] = float(f"{run.learning_rate * max(scale, 1e-6):.6g}")
        config["optimizer"] = BASELINE.optimizer
    else:
        trace = scale_trace(read_jsonl(source_dir / "metrics.jsonl"), source["step"])
        config["optimizer"] = peers.register_replay(trace)
    return config


def _execute(runs: Sequence[Run], runs_dir: str) -> list[str]:
    """Runs ``runs`` in this process (a worker's task); returns their ids."""
    from lbw.train.loop import NonFiniteError, train

    done = []
    for run in runs:
        out_dir = Path(runs_dir) / run.run_id
        if not _finished(Path(runs_dir), run.run_id, run.stage):
            config = _resolve(run, Path(runs_dir))
            try:
                # An unfinished run (killed, or a base without its export) starts afresh.
                train(TrainConfig(**config, out_dir=str(out_dir), overwrite=True))
            except NonFiniteError:
                pass  # summary.json records "nonfinite"; the suite goes on.
        done.append(run.run_id)
    return done


def _groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that differ only in their seed, together: they share one compiled step."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.setting, run.method, run.learning_rate, run.fault, run.control is not None)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


class _Progress:
    """Suite progress on stderr: on a terminal, a tqdm bar of the finished runs; otherwise (a
    log file, nohup, CI) a plain line every ``every_s`` seconds, printed by a thread: the runs
    done, the time elapsed and left, and the last telemetry line of each run under way (read
    from its ``metrics.jsonl``, see :func:`suite_line`). Nothing when not ``enabled``."""

    def __init__(
        self, name: str, runs_dir: Path, total: int, done: int, enabled: bool, every_s: float
    ):
        self.name, self.runs_dir = name, runs_dir
        self.total, self.done, self.done_before = total, done, done
        self.steps: dict[str, int] = {}  # Run id -> steps, of the runs queued so far.
        self.start = time.time()
        self.bar, self.thread, self.stop = None, None, threading.Event()
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="run", desc=name, dynamic_ncols=True)
        else:
            self.thread = threading.Thread(target=self._print_every, args=(every_s,), daemon=True)
            self.thread.start()

    def queue(self, runs: Sequence[Run]) -> None:
        """Notes the runs about to start (their progress is shown while they run)."""
        self.steps.update({r.run_id: int(r.config.get("steps", TrainConfig.steps)) for r in runs})

    def update(self, n: int, postfix: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def set_counts(self, total: int, done: int) -> None:
        """Corrects the counts once the base learning-rate sweep has fixed the suite's runs."""
        self.done_before += done - self.done
        self.total, self.done = total, done
        if self.bar is not None:
            self.bar.total, self.bar.n = total, done
            self.bar.refresh()

    def line(self) -> str:
        running = running_runs(self.runs_dir, self.steps, self.start)
        elapsed = time.time() - self.start
        return suite_line(
            self.name, self.done, self.total, elapsed, self.done - self.done_before, running
        )

    def _print_every(self, every_s: float) -> None:
        while not self.stop.wait(every_s):
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.bar is not None:
            self.bar.close()


def running_runs(runs_dir: Path, steps: Mapping[str, int], since: float) -> dict[str, str]:
    """Run id → progress words (:func:`train.progress.describe`) of the last telemetry line of
    each run of ``steps`` (run id → its steps) under way: its ``metrics.jsonl`` was written
    after ``since`` (a time.time()) and it has no finished summary."""
    out = {}
    for rid, total in steps.items():
        metrics = runs_dir / rid / "metrics.jsonl"
        try:
            if metrics.stat().st_mtime < since or read_summary(runs_dir / rid) is not None:
                continue
            lines = metrics.read_text().splitlines()
        except OSError:
            continue
        for text in reversed(lines):
            try:
                record = json.loads(text)
            except json.JSONDecodeError:  # A line being written.
                continue
            if record.get("kind") == "train":
                out[rid] = describe(record, total)
                break
    return out


def suite_line(
    name: str, done: int, total: int, elapsed: float, done_here: int, running: Mapping[str, str]
) -> str:
    """One plain progress line of a suite: runs done of ``total``, the time ``elapsed`` in this
    invocation and, once it has finished ``done_here`` runs, the time left at their pace; then
    each run under way.

    >>> suite_line("quick", 12, 81, 300.0, 10, {"r1": "step 5/10 (50%) loss 2.5000"})
    'lbw-stress quick: 12/81 runs done, 5m00s elapsed, ETA 34m30s; r1: step 5/10 (50%) loss 2.5000'
    """
    words = f"lbw-stress {name}: {done}/{total} runs done, {format_duration(elapsed)} elapsed"
    if done_here and total > done:
        words += f", ETA {format_duration(elapsed / done_here * (total - done))}"
    return "; ".join([words, *(f"{rid}: {text}" for rid, text in running.items())])


def _run_stage(
    runs: Sequence[Run], runs_dir: Path, workers: int, bar: _Progress, counted: bool = True
) -> None:
    todo = [r for r in runs if not _finished(runs_dir, r.run_id, r.stage)]
    bar.queue(todo)
    groups = _groups(todo)
    if workers <= 1 or len(groups) <= 1:
        for group in groups:
            _execute(group, str(runs_dir))
            bar.update(len(group) if counted else 0, group[0].run_id)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_execute, group, str(runs_dir)) for group in groups]
        for future in concurrent.futures.as_completed(futures):
            ids = future.result()
            bar.update(len(ids) if counted else 0, ids[-1])


def choose_base_lr(
    spec: SuiteSpec, records: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The base learning rate of each setting: fixed, or the AdamW sweep's best.

    For a setting with ``base_lr=None``, AdamW runs at every learning rate of ``lr_grid`` (the
    suite's first seed, no fault); the learning rate with the lowest final evaluation
    perplexity is the base (a diverged run counts as infinite perplexity).

    Args:
      spec: the suite.
      records: run id → run record (:func:`run_record`) of the finished sweep runs.

    Returns:
      setting name → ``{"base_lr", "procedure", "grid": {lr: final ppl}}``.
    """
    out = {}
    for s in spec.settings:
        if s.base_lr is not None:
            out[s.name] = {"base_lr": s.base_lr, "procedure": s.base_lr_note or "fixed"}
            continue
        grid = {}
        for lr in s.lr_grid:
            record = records[run_id(s.name, BASELINE.name, lr, "none", spec.seeds[0])]
            ppl = record["final_eval_ppl"]
            grid[f"{lr:.3g}"] = ppl if _finite(ppl) else None
        best = min(s.lr_grid, key=lambda lr: grid[f"{lr:.3g}"] or math.inf)
        out[s.name] = {
            "base_lr": best,
            "procedure": f"AdamW sweep over {list(s.lr_grid)}, seed {spec.seeds[0]}, "
            "lowest final eval perplexity",
            "grid": grid,
        }
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> dict[str, Any]:
    """The git commit of the code and the tracked files of every package of ours (the library,
    the models, the training tools) changed since it."""
    packages = ("lbw_optax", "models", "train")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *packages)
    return {
        "git_commit": (_git("rev-parse", "HEAD") or "unknown").strip(),
        "uncommitted": sorted(line[3:] for line in (dirty or "").splitlines()),
    }


def run_suite(
    spec: SuiteSpec,
    out: str | os.PathLike = "runs",
    *,
    workers: int = 1,
    progress: bool = True,
    progress_every: float = 30.0,
    command: str = "",
    machine: str = "",
    collect_only: bool = False,
) -> Path:
    """Runs (or resumes) ``spec`` under ``out/<name>`` and writes the report.

    ``progress`` shows the suite's progress on stderr: a bar on a terminal, else a plain line
    every ``progress_every`` seconds. With ``collect_only``, nothing runs: the finished runs of
    an interrupted suite are collected into ``runs.jsonl`` and the report (which says how many
    of the planned runs finished).

    Returns:
      The suite directory (``runs/``, ``runs.jsonl``, ``suite.json``, ``summary.md``, PNGs).
    """
    suite_dir = Path(out) / spec.name
    runs_dir = suite_dir / "runs"
    archive.restore(suite_dir)  # A committed suite without its run folders: unpack them.
    runs_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    version = code_version()  # At the start: the code the runs of this invocation use.
    if version["uncommitted"]:  # Keep the uncommitted changes the runs use, to reproduce them.
        patch = _git("diff", "HEAD", "--", *version["uncommitted"]) or ""
        (suite_dir / "code.patch").write_text(patch)
    already = {p.parent.name for p in runs_dir.glob("*/summary.json")}
    meta_path = suite_dir / "suite.json"
    if not collect_only:  # Written first, so that an interrupted suite keeps its record.
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.setdefault("spec", spec.to_dict())
        meta["time_constants"] = time_constants(spec)
        meta["started"] = dict(version, command=command, machine=machine)
        write_json(meta_path, meta)

    sweep = expand_sweep(spec)
    sweep_ids = {r.run_id for r in sweep}
    # Before the sweep the total is an estimate that assumes every sweep run is a suite run.
    guess = {s.name: s.base_lr or s.lr_grid[0] for s in spec.settings}
    total = len({r.run_id for r in expand(spec, guess)} | sweep_ids)
    done = sum(read_summary(runs_dir / i) is not None for i in sweep_ids)
    bar = _Progress(spec.name, runs_dir, total, done, progress, progress_every)
    pretrain = {r.run_id: r for r in expand_pretrain(spec)}

    def stage(runs: Sequence[Run]) -> None:
        """Runs ``runs``, after the base pre-trainings that their unfinished runs start from."""
        if collect_only:
            return
        todo = [r for r in runs if not _finished(runs_dir, r.run_id, r.stage)]
        bases = [pretrain[b] for b in dict.fromkeys(r.base for r in todo if r.base)]
        _run_stage(bases, runs_dir, workers, bar, counted=False)
        _run_stage(todo, runs_dir, workers, bar)

    planned = spec  # What the suite plans; ``spec`` becomes what is collected.
    unswept: list[str] = []
    try:
        stage(sweep)
        swept = {r["run_id"]: r for r in collect(spec, sweep, runs_dir)}
        if collect_only:  # Settings whose sweep has not finished have no runs to collect.
            unswept = sorted({r.setting for r in sweep if r.run_id not in swept})
            if len(unswept) == len(spec.settings):
                raise UserError(
                    f"{suite_dir}: the base learning-rate sweep has not finished; nothing to "
                    "collect (run the suite without --collect)."
                )
            spec = spec.replaced(settings=tuple(s for s in spec.settings if s.name not in unswept))
            sweep = [r for r in sweep if r.setting not in unswept]
        base = choose_base_lr(spec, swept)
        runs = expand(spec, {k: v["base_lr"] for k, v in base.items()})
        ids = [r.run_id for r in runs]
        extra = len(sweep_ids - set(ids))
        bar.set_counts(
            len(ids) + extra,
            extra
            + sum(read_summary(runs_dir / i) is not None for i in ids if i not in sweep_ids)
            + len(sweep_ids & set(ids)),
        )
        for setting in spec.settings:  # Setting by setting: an interrupted suite has whole ones.
            mine = [r for r in runs if r.setting == setting.name]
            stage([r for r in mine if r.control is None])
            stage([r for r in mine if r.control is not None])
    finally:
        bar.close()

    records = collect(spec, [*runs, *sweep], runs_dir)
    write_jsonl(suite_dir / "runs.jsonl", records)
    archive.write(suite_dir, [*pretrain, *(r["run_id"] for r in records)])
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    ran = len({r["run_id"] for r in records} - already)
    meta.update(spec=planned.to_dict(), base_lr=base, planned_runs=len(set(ids) | sweep_ids))
    if unswept:
        meta["planned_runs"] = len(set(ids) | sweep_ids) + len(
            {r.run_id for r in expand(planned, guess) if r.setting in unswept} - sweep_ids
        )
        meta["not_collected"] = unswept
    else:
        meta.pop("not_collected", None)
    bases = {}
    for r in pretrain.values():
        summary = read_summary(runs_dir / r.run_id)
        if summary is not None:
            bases[r.setting] = {
                "run_id": r.run_id,
                "steps": summary["step"],
                "learning_rate": r.learning_rate,
                "final_eval_ppl": summary.get("eval_perplexity"),
            }
    if bases:
        meta["pretrain"] = bases
    meta["definitions"] = {"spike_factor": SPIKE_FACTOR, "target_factor": TARGET_FACTOR}
    meta["time_constants"] = time_constants(spec)
    if collect_only:
        if "git_commit" not in meta:  # The record of the interrupted invocation, if written.
            meta.update(meta.get("started") or dict(version, command=command, machine=machine))
        meta["collected_by"] = command
    elif ran or "git_commit" not in meta:  # A no-op invocation keeps the record of the real one.
        seconds = round(time.perf_counter() - start, 1)
        meta.update(
            version,
            command=command,
            machine=machine,
            last_invocation_s=seconds,
            runs_in_last_invocation=ran,
        )
        # Every invocation that ran something, in order: a suite run in parts keeps them all.
        meta.setdefault("invocations", []).append(
            dict(version, command=command, machine=machine, runs=ran, seconds=seconds)
        )
    write_json(meta_path, meta)
    report.write_report(suite_dir)
    return suite_dir
