"""The timing of a session of a run: wall time, compile time and steady-state step time."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax


@dataclasses.dataclass
class Clock:
    """The timing of one session of a run: its wall time (plus that of the run's earlier sessions
    when resumed), the compile time of its first step, and the steady-state time of the later
    steps, per log interval and in total. Evaluations and checkpoints are not step time."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # Wall time of the run's earlier sessions.
    mark: float = 0.0  # When the current stretch of timed steps began.
    compile_s: float | None = None
    interval_steps: int = 0  # Timed steps since the last log line, and their time.
    interval_time: float = 0.0
    total_steps: int = 0  # Timed steps in all closed log intervals, and their time.
    total_time: float = 0.0

    def wall(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def restart(self) -> None:
        """Starts a stretch of timed steps (after setup, an evaluation or a checkpoint)."""
        self.mark = time.perf_counter()

    def pause(self) -> None:
        """Ends a stretch of timed steps (before an evaluation or a checkpoint)."""
        self.interval_time += time.perf_counter() - self.mark

    def step_done(self, result: Any) -> None:
        if (
            self.compile_s is None
        ):  # One sync after the first step: compile time, then steady state.
            jax.block_until_ready(result)
            self.compile_s = time.perf_counter() - self.mark
            self.restart()
        else:
            self.interval_steps += 1

    def end_interval(self) -> tuple[int, float]:
        """Closes the log interval; returns its timed steps and their time."""
        self.pause()
        self.restart()
        steps, seconds = self.interval_steps, self.interval_time
        self.total_steps += steps
        self.total_time += seconds
        self.interval_steps, self.interval_time = 0, 0.0
        return steps, seconds
