"""One compressed file with every run's metrics: what a committed suite keeps instead of ``runs/``.

A suite runs into ``<suite>/runs/<run_id>/`` (``metrics.jsonl``, ``summary.json``). At the end
:func:`write` packs those two files of every finished run into ``<suite>/metrics.jsonl.xz``, an
xz-compressed JSON-lines file: each line is one line of a run's ``metrics.jsonl`` with the run's
id as a first key ``"run_id"``, and each run ends with one ``{"run_id": …, "kind": "summary",
"summary": {…}}`` line holding its ``summary.json``. Read it with ``xzcat`` or :func:`read`.

The guard's per-tensor signal vectors (``tensor_*`` telemetry, logged at every step) are left
out of the metrics lines (:func:`compact`): the report does not read them, they were 60 % of
the archive, and each run's ``summary.json`` keeps their final values. Every other number is
kept exactly, so the report made from the archive is the report made from the run folders. The
telemetry's floats are device float32 values: the archive writes them with the fewest digits
that name the same float32 (a fifth smaller again), and :func:`read` turns them back into
exactly the numbers the run logged.

The per-run folders stay out of version control; the report reads a run's curve from its folder
when there is one and from the archive otherwise, and :func:`restore` unpacks the archive into
``runs/`` so that a suite resumes (or is collected) from a fresh clone as from its own run.
"""

from __future__ import annotations

import json
import lzma
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

NAME = "metrics.jsonl.xz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


# Telemetry left out of the archived metrics lines (see the module docstring).
OMITTED_PREFIX = "tensor_"


def compact(line: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` line as :func:`read` gives it back: without per-tensor signal vectors."""
    telemetry = line.get("telemetry")
    if isinstance(telemetry, dict):
        kept = {k: v for k, v in telemetry.items() if not k.startswith(OMITTED_PREFIX)}
        line = {**line, "telemetry": kept}
    return line


def _floats(value: Any, convert) -> Any:
    if isinstance(value, float):
        return convert(value) if np.isfinite(value) else value
    if isinstance(value, list):
        return [_floats(v, convert) for v in value]
    if isinstance(value, dict):
        return {k: _floats(v, convert) for k, v in value.items()}
    return value


F32 = "telemetry_f32"  # Marks an archived line whose telemetry floats are written as float32.


def _shortest_f32(telemetry: dict[str, Any]) -> dict[str, Any] | None:
    """``telemetry`` with every finite float in its shortest float32 digits, or ``None`` when
    one of them is not a float32 value."""
    exact = True

    def shorten(x: float) -> float:
        nonlocal exact
        exact = exact and float(np.float32(x)) == x
        return float(str(np.float32(x)))

    short = _floats(telemetry, shorten)
    return short if exact else None


def _packed(line: dict[str, Any]) -> dict[str, Any]:
    """The archived form of a metrics line: :func:`compact`, and when every telemetry float is
    a float32 (as device values are), those floats in their shortest float32 digits."""
    line = compact(line)
    telemetry = line.get("telemetry")
    short = _shortest_f32(telemetry) if isinstance(telemetry, dict) else None
    if short is not None:
        line = {**line, "telemetry": short, F32: True}
    return line


def _unpacked(line: dict[str, Any]) -> dict[str, Any]:
    if line.pop(F32, False):
        line["telemetry"] = _floats(line["telemetry"], lambda x: float(np.float32(x)))
    return line


def write(suite_dir: str | os.PathLike, run_ids: Iterable[str]) -> Path | None:
    """Packs the ``metrics.jsonl`` and ``summary.json`` of ``run_ids`` under ``suite_dir/runs``
    into ``suite_dir/metrics.jsonl.xz`` (atomically); returns its path, or ``None`` (and leaves
    any archive alone) when none of the runs has a folder."""
    suite_dir = Path(suite_dir)
    lines = []
    for rid in dict.fromkeys(run_ids):
        run_dir = suite_dir / "runs" / rid
        if not (run_dir / SUMMARY).is_file():
            continue
        metrics = run_dir / METRICS
        if metrics.is_file():
            for text in metrics.read_text().splitlines():
                if text.strip():
                    lines.append(json.dumps({"run_id": rid, **_packed(json.loads(text))}))
        summary = json.loads((run_dir / SUMMARY).read_text())
        lines.append(json.dumps({"run_id": rid, "kind": "summary", "summary": summary}))
    if not lines:
        return None
    path = suite_dir / NAME
    tmp = path.with_name(NAME + ".tmp")
    with lzma.open(tmp, "wt", preset=9) as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return path


def read(suite_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """run id → ``{"metrics": [metrics lines without "run_id"], "summary": {...} or None}``
    from ``suite_dir/metrics.jsonl.xz`` (empty if there is none), runs in archive order."""
    path = Path(suite_dir) / NAME
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with lzma.open(path, "rt") as f:
        for text in f:
            if not text.strip():
                continue
            line = json.loads(text)
            run = out.setdefault(line.pop("run_id"), {"metrics": [], "summary": None})
            if line.get("kind") == "summary":
                run["summary"] = line["summary"]
            else:
                run["metrics"].append(_unpacked(line))
    return out


def restore(suite_dir: str | os.PathLike) -> int:
    """Unpacks the archive into ``suite_dir/runs/<run_id>/`` when ``runs/`` does not exist (a
    fresh clone); returns the number of run folders written (0 when ``runs/`` exists)."""
    suite_dir = Path(suite_dir)
    runs_dir = suite_dir / "runs"
    if runs_dir.exists():
        return 0
    count = 0
    for rid, run in read(suite_dir).items():
        run_dir = runs_dir / rid
        run_dir.mkdir(parents=True)
        (run_dir / METRICS).write_text("".join(json.dumps(x) + "\n" for x in run["metrics"]))
        if run["summary"] is not None:
            (run_dir / SUMMARY).write_text(json.dumps(run["summary"], indent=2) + "\n")
        count += 1
    return count
