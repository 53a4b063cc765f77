"""The run directory: what ``out_dir`` may hold before a run starts, its JSON files, and the
rules of resuming a run (which config changes a resume accepts, what it restores).

Files in ``out_dir``: ``metrics.jsonl`` (one JSON line per log interval and per evaluation),
``summary.json`` (the final summary), ``checkpoints/`` (see :mod:`train.checkpoint`) and the
TensorBoard event files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from lbw.train.checkpoint import Checkpointer, CheckpointError, has_checkpoints
from lbw.train.config import PARTS, SessionPart, TrainConfig, UserError, part
from lbw.train.tensorboard import remove_event_files

if TYPE_CHECKING:
    from lbw.train.setup import Setup


def run_files(config: TrainConfig) -> tuple[Path, Path]:
    """The paths of the run's ``summary.json`` and ``metrics.jsonl``: with several processes,
    process 0 writes the run's files and the others their own copies
    (``summary.process1.json``, ...)."""
    suffix = f".process{jax.process_index()}" if jax.process_index() else ""
    out_dir = Path(config.out_dir)
    return out_dir / f"summary{suffix}.json", out_dir / f"metrics{suffix}.jsonl"


def changed_fields(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The fields in which ``config`` differs from a ``saved`` run's (a ``config.json`` dict; a
    field the saved run predates counts as its default), in the parts that define a run: every
    part of :data:`~train.config.PARTS` but the session's, compared part by part."""
    current, saved = normalised(config), {**normalised(TrainConfig()), **saved}
    return sorted(
        name
        for cls in PARTS
        if cls is not SessionPart and part(saved, cls) != part(current, cls)
        for name, value in part(current, cls).items()
        if saved[name] != value
    )


def refuse_changes(saved: dict[str, Any], config: TrainConfig) -> None:
    """Raises :class:`~train.config.UserError` if ``config`` may not resume the ``saved`` run
    (see :func:`changed_fields`)."""
    changed = changed_fields(saved, config)
    if changed:
        raise UserError(
            f"Cannot resume {config.out_dir}: the config differs from the run's in {changed} "
            f"(saved: {[saved.get(k) for k in changed]}); resume with the run's flags, or start "
            "a new run in another --out-dir."
        )


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the lines of ``path`` up to ``last_step`` (and drops a torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record.get("step", 0) > last_step:
            break
        kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def normalised(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=str))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_out_dir(config: TrainConfig, summary_path: Path, metrics_path: Path) -> Path:
    """Checks, before anything is read or written, that ``config.out_dir`` can hold this run:
    a folder (or a path where one can be created), with a checkpoint to resume from when
    resuming, and without another run's results otherwise (unless ``overwrite``)."""
    out_dir = Path(config.out_dir)
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out_dir else f"is under {path}, which is a file"
                raise UserError(
                    f"--out-dir {out_dir} {where}; give a folder (it is created if missing)."
                )
            break
    checkpoints = out_dir / "checkpoints"
    summary = read_json(summary_path)
    if config.resume:
        if not has_checkpoints(checkpoints):
            if summary is not None and summary.get("status") == "completed":
                raise CheckpointError(
                    f"--resume: {out_dir} holds a finished run (step {summary.get('step')}) "
                    "with no checkpoint to resume from; its results are in summary.json."
                )
            raise CheckpointError(
                f"--resume: no checkpoint in {checkpoints}; check --out-dir, or start the run "
                "without --resume (with --checkpoint-every N to make it resumable)."
            )
    elif not config.overwrite:
        found = [
            name
            for name, there in (
                ("checkpoints/", has_checkpoints(checkpoints)),
                (summary_path.name, summary_path.exists()),
                (metrics_path.name, metrics_path.exists() and metrics_path.stat().st_size > 0),
            )
            if there
        ]
        if found:
            raise UserError(
                f"{out_dir} already holds the results of a run ({', '.join(found)}); pass "
                "--resume to continue it, --overwrite to replace them, or choose another "
                "--out-dir."
            )
    return out_dir


def last_values(metrics_path: Path) -> tuple[float | None, float | None]:
    """The last training loss and evaluation loss logged in ``metrics_path``."""
    last_loss, last_eval = None, None
    for line in metrics_path.read_text().splitlines() if metrics_path.exists() else ():
        record = json.loads(line)
        if record.get("kind") == "train":
            last_loss = record.get("loss")
        elif record.get("kind") == "eval":
            last_eval = record.get("eval_loss")
    return last_loss, last_eval


def start_out_dir(config: TrainConfig, out_dir: Path, summary_path: Path) -> None:
    """Creates the output folder; with ``overwrite``, removes the earlier run's results (the
    folder's other files stay). The first writes of the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        if jax.process_index() == 0:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            remove_event_files(out_dir)
        summary_path.unlink(missing_ok=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lbw-train overwrite")


def restore(
    config: TrainConfig, checkpointer: Checkpointer, setup: Setup, metrics_path: Path
) -> tuple[int, float]:
    """Restores model, optimizer and data stream from the checkpoint to resume from, or starts
    ``metrics_path`` afresh. Returns ``(start_step, elapsed_before)``."""
    if not config.resume:
        metrics_path.write_text("")
        return 0, 0.0
    steps = checkpointer.steps()
    if not steps:
        raise CheckpointError(f"--resume: no checkpoint in {checkpointer.directory}.")
    start_step = config.resume_step if config.resume_step is not None else steps[-1]
    model, optimizer = setup.model, setup.optimizer
    abstract = {"params": nnx.state(model, setup.wrt), "optimizer": nnx.state(optimizer)}
    state, meta = checkpointer.restore(start_step, abstract)
    refuse_changes(meta["config"], config)
    if meta["filled"]:
        print(
            f"lbw-train: the checkpoint of step {start_step} predates {len(meta['filled'])} "
            f"state arrays, which start from their initial values: {', '.join(meta['filled'])}",
            file=sys.stderr,
        )
    nnx.update(model, state["params"])
    nnx.update(optimizer, state["optimizer"])
    setup.stream.restore(meta["data"])
    checkpointer.discard_after(start_step)
    truncate_jsonl(metrics_path, start_step)
    return start_step, float(meta["elapsed_s"])
