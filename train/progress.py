"""Progress on stderr that also reads well in a log file.

On a terminal the CLIs draw a tqdm bar. When stderr is not a terminal (a log file, ``nohup``,
CI, a SLURM job) a bar writes nothing useful, so they print one plain line at most every
``every_s`` seconds instead::

    lbw-train: step 120/2000 (6%) loss 3.2101 tok/s 11,204 ETA 4m12s regime STABLE scale 0.981

The words come from a telemetry line of ``metrics.jsonl`` (:func:`describe`), so
``lbw-train`` formats its own lines and ``lbw-stress`` those of the runs it waits for alike.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from lbw.train.config import TrainConfig


def format_duration(seconds: float) -> str:
    """``seconds`` as ``"42s"``, ``"4m12s"`` or ``"1h02m"``.

    >>> format_duration(59.6), format_duration(252), format_duration(3720)
    ('1m00s', '4m12s', '1h02m')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe(line: Mapping[str, Any], total_steps: int) -> str:
    """The progress words of a telemetry ``line`` (a ``"kind": "train"`` record of
    ``metrics.jsonl``): the step of ``total_steps``, the loss, tokens/s, the time left at the
    line's step time and, under a guard, the regime and scale.

    >>> describe({"step": 5, "loss": 2.5, "tokens_per_s": 1234.5, "step_time_s": 0.5}, 10)
    'step 5/10 (50%) loss 2.5000 tok/s 1,234 ETA 2s'
    """
    step = line["step"]
    words = [f"step {step}/{total_steps} ({100 * step // max(total_steps, 1)}%)"]
    loss = line.get("loss")
    words.append("loss nan" if loss is None else f"loss {loss:.4f}")
    if line.get("tokens_per_s"):
        words.append(f"tok/s {line['tokens_per_s']:,.0f}")
    if line.get("step_time_s") is not None and step < total_steps:
        words.append(f"ETA {format_duration(line['step_time_s'] * (total_steps - step))}")
    telemetry = line.get("telemetry") or {}
    if "regime_name" in telemetry:
        words.append(f"regime {telemetry['regime_name']}")
    if isinstance(telemetry.get("scale"), int | float):
        words.append(f"scale {telemetry['scale']:.3f}")
    return " ".join(words)


class Throttle:
    """Says when a plain progress line is due: the first time asked, then once ``every_s``
    seconds have passed since the last line (``every_s=0``: every time)."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.last: float | None = None

    def due(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return False
        self.last = now
        return True


class Progress:
    """Progress on stderr (see :mod:`train.progress`): a tqdm bar on a terminal; otherwise
    (a log file, nohup, CI) a plain line at the first log interval, then at most one every
    ``progress_every`` seconds. Nothing with ``quiet``."""

    def __init__(self, config: TrainConfig, initial: int):
        self.bar, self.throttle, self.total = None, None, config.steps
        if config.quiet:
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, initial=initial, unit="step", dynamic_ncols=True)
        else:
            self.throttle = Throttle(config.progress_every)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, line: dict[str, Any]) -> None:
        if self.bar is not None:
            tel = line.get("telemetry", {})
            postfix = {"loss": f"{line['loss']:.4f}" if line["loss"] is not None else "nan"}
            if "regime_name" in tel:
                postfix["regime"] = tel["regime_name"]
                postfix["scale"] = f"{tel['scale']:.3f}"
            postfix["tok/s"] = f"{line['tokens_per_s']:.0f}"
            self.bar.set_postfix(postfix, refresh=False)
        elif self.throttle is not None and self.throttle.due():
            print(f"lbw-train: {describe(line, self.total)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
