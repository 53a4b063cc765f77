"""TensorBoard event files of a run, written with tensorboardX.

The loop writes every telemetry line of ``metrics.jsonl`` again as TensorBoard summaries, into
the run's folder (``tensorboard --logdir runs`` shows each run folder as a run):

* ``train/...``: the line's loss, perplexity, learning rate, tokens/s, step time and count of
  non-finite steps;
* ``eval/loss``, ``eval/perplexity``: each evaluation;
* ``guard/<field>``: every scalar field of ``lbw_optax.telemetry`` (scale, regime, limited
  tensors, effective scale, the sensed signals ...; booleans as 0/1);
* histograms ``guard/<field>`` of the per-tensor fields (one value per parameter tensor, such
  as ``tensor_update_norms``, or per tensor and cluster for SGG), and
  ``guard/tensor_update_ratio``: each tensor's update norm over its parameter norm, the ratio
  the governor's per-tensor limit caps.

Values that are not finite are left out (TensorBoard cannot draw them); ``metrics.jsonl`` keeps
them as ``null``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Fields of a telemetry line written as ``train/<field>``.
TRAIN_FIELDS = (
    "loss",
    "perplexity",
    "learning_rate",
    "tokens_per_s",
    "step_time_s",
    "nonfinite",
)
EVENT_FILE_PREFIX = "events.out.tfevents."


def _number(value: Any) -> float | None:
    """``value`` as a finite float (a boolean as 0/1), or None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def train_scalars(line: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of a ``"kind": "train"`` telemetry line: ``train/<field>`` and
    ``guard/<field>`` for each scalar telemetry field; non-finite and missing values left out.

    >>> train_scalars({"loss": 2.0, "nonfinite": 0, "telemetry": {"scale": 0.5, "held": False}})
    {'train/loss': 2.0, 'train/nonfinite': 0.0, 'guard/scale': 0.5, 'guard/held': 0.0}
    """
    out = {f"train/{k}": _number(line.get(k)) for k in TRAIN_FIELDS}
    for name, value in (line.get("telemetry") or {}).items():
        out[f"guard/{name}"] = _number(value)
    return {k: v for k, v in out.items() if v is not None}


def eval_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``eval/loss`` and ``eval/perplexity`` of a ``"kind": "eval"`` record (when finite)."""
    out = {"eval/loss": _number(record.get("eval_loss"))}
    out["eval/perplexity"] = _number(record.get("eval_perplexity"))
    return {k: v for k, v in out.items() if v is not None}


def _values(value: Any) -> list[Any]:
    """The numbers of a per-tensor field: a list, or ``{path: list}`` (SGG's per-cluster
    fields) flattened in path order."""
    if isinstance(value, Mapping):
        return [x for key in sorted(value) for x in value[key]]
    return list(value)


def telemetry_histograms(telemetry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``guard/<field>`` → the finite values of each per-tensor telemetry field, plus
    ``guard/tensor_update_ratio`` (update norm / parameter norm per tensor) when the guard
    reports both norms. Fields with no finite value are left out."""
    arrays = {
        name: np.asarray([_number(x) for x in _values(value)], dtype=float)  # None -> nan.
        for name, value in telemetry.items()
        if isinstance(value, list | Mapping)
    }
    updates, params = arrays.get("tensor_update_norms"), arrays.get("tensor_param_norms")
    if updates is not None and params is not None and updates.shape == params.shape:
        with np.errstate(divide="ignore", invalid="ignore"):
            arrays["tensor_update_ratio"] = np.where(params > 0, updates / params, np.nan)
    out = {}
    for name, values in arrays.items():
        finite = values[np.isfinite(values)]
        if finite.size:
            out[f"guard/{name}"] = finite
    return out


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without PyTorch unless PyTorch is loaded.

    tensorboardX imports PyTorch when it is installed, only to accept its tensors, which takes
    seconds at every start of a run; the writer here is given NumPy values only."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # "import torch" fails at once.
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class EventWriter:
    """Writes a run's telemetry lines and evaluations as TensorBoard summaries into
    ``log_dir``, through ``tensorboardX.SummaryWriter``.

    Args:
      log_dir: the run's folder.
      purge_step: for a resumed run, its first step: TensorBoard hides the events of step
        ``purge_step`` and later that an earlier session wrote, which this one writes again.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        SummaryWriter = _summary_writer_class()
        # Event files are named by the second they were opened in: a nanosecond suffix keeps
        # two sessions of one second apart, in order.
        suffix = f".{time.time_ns()}"
        self.writer = SummaryWriter(
            str(log_dir), purge_step=purge_step, flush_secs=10, filename_suffix=suffix
        )

    def train(self, line: Mapping[str, Any]) -> None:
        """Writes a ``"kind": "train"`` telemetry line at its step."""
        step = line["step"]
        for tag, value in train_scalars(line).items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in telemetry_histograms(line.get("telemetry") or {}).items():
            self.writer.add_histogram(tag, values, step)

    def eval(self, record: Mapping[str, Any]) -> None:
        """Writes a ``"kind": "eval"`` record at its step."""
        for tag, value in eval_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def remove_event_files(directory: str | os.PathLike) -> None:
    """Deletes the TensorBoard event files directly in ``directory`` (an overwritten run's);
    nothing else."""
    for path in Path(directory).glob(f"{EVENT_FILE_PREFIX}*"):
        path.unlink()
