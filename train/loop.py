"""The training run: ``train(config) -> summary``.

One run, in order: read and tokenize the data; build the model (full or LoRA) and the optimizer
by name; restore the latest checkpoint when resuming; then for each step draw a batch, run the
jitted step (loss → grads → ``optimizer.update(model, grads, value=loss)``), and at log
intervals read the step's small scalars back, write one telemetry line, evaluate and save
checkpoints when due. Device values are read only at log intervals, evaluations and checkpoints.

Files in ``config.out_dir``:

* ``metrics.jsonl``: one JSON line per log interval (``"kind": "train"``) and per evaluation
  (``"kind": "eval"``), flushed as written;
* ``summary.json``: the final summary (also returned);
* ``checkpoints/``: Orbax checkpoints (see :mod:`train.checkpoint`).

Non-finite steps. The step also returns whether its loss and gradients were finite. Without a
guard, AdamW applies a NaN update and the parameters are lost: at the next log interval (or
checkpoint, whichever comes first; never saving NaN parameters) the run writes its telemetry
line and ``summary.json`` (``"status": "nonfinite"``) and raises :class:`NonFiniteError` naming
the first non-finite step. With a guarded optimizer (``lbw``, ``lbw+sgg``) the guard holds that
step (zero update) and training continues; the line counts it in ``nonfinite``.

The parts, one idea each: :mod:`train.setup` (data, model and optimizer, built before anything
is written), :mod:`train.step` (the jitted step, its cache, the evaluation), :mod:`train.run_dir`
(the output folder, its files and the rules of resuming), :mod:`train.telemetry` (device values
as JSON), :mod:`train.clock` (step and compile time) and :mod:`train.progress` (the bar or
lines on stderr). This module holds the loop itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lbw import models
from lbw.train import sharding
from lbw.train.checkpoint import Checkpointer
from lbw.train.clock import Clock
from lbw.train.config import TrainConfig
from lbw.train.interrupts import Sigint, handling_sigint
from lbw.train.optimizers import applied_schedule, is_guarded
from lbw.train.progress import Progress
from lbw.train.run_dir import (
    check_out_dir,
    last_values,
    normalised,
    read_json,
    refuse_changes,
    restore,
    run_files,
    start_out_dir,
    write_json,
)
from lbw.train.setup import Setup, build_setup, check_config
from lbw.train.step import evaluate_optimizer_point, make_train_step
from lbw.train.telemetry import perplexity, read_telemetry
from lbw.train.tensorboard import EventWriter


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/Inf under an optimizer without a guard.

    Attributes:
      step: the first non-finite step.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run between two steps.

    Attributes:
      step: the last step done.
      checkpoint: whether a checkpoint of that step is on disk (the run can be resumed).
    """

    def __init__(self, message: str, step: int, checkpoint: bool):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class Session:
    """The steps of one session of a run (from its first or resumed step to the last), with
    the telemetry lines, evaluations and checkpoints due at intervals, and its summary."""

    def __init__(
        self,
        config: TrainConfig,
        setup: Setup,
        checkpointer: Checkpointer | None,
        clock: Clock,
        paths: tuple[Path, Path, Path],
        start_step: int,
    ):
        self.config, self.setup, self.checkpointer, self.clock = config, setup, checkpointer, clock
        self.out_dir, self.summary_path, self.metrics_path = paths
        self.start_step = start_step
        self.last_loss, self.last_eval = None, None
        if start_step:  # Until this session logs its own.
            self.last_loss, self.last_eval = last_values(self.metrics_path)
        # (loss, finite) of each micro-step of the steps not read.
        self.pending: list[list[tuple[jax.Array, jax.Array]]] = []
        self.fetched: list[tuple[float, bool]] = []  # ... read, and not yet logged.
        self.first_nonfinite: int | None = None
        # cached_partial traverses the model and optimizer graphs once, not at every call.
        step_fn = make_train_step(config, setup.wrt, setup.mesh)
        self.train_step = nnx.cached_partial(step_fn, setup.model, setup.optimizer)
        # The schedule the optimizer applies (the replay control's includes its trace), compiled
        # here, outside the timed steps.
        self.schedule = jax.jit(applied_schedule(config.optimizer, setup.schedule))
        self.schedule(0)
        self.tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
        self.metrics = self.metrics_path.open("a")
        self.events = None  # TensorBoard: written by process 0, resumed runs purge later steps.
        if config.tensorboard and jax.process_index() == 0:
            self.events = EventWriter(
                self.out_dir, purge_step=start_step + 1 if start_step else None
            )
        self.progress = Progress(config, start_step)

    def run(self, sigint: Sigint) -> dict[str, Any]:
        """Runs the steps; returns the summary of the completed run. Ctrl-C stops at once
        until the first step is done, then between two steps (see :mod:`train.interrupts`)."""
        config, setup = self.config, self.setup
        self.clock.restart()
        for step in range(self.start_step + 1, config.steps + 1):
            self.pending.append([self.train_step(b) for b in self.micro_batches(step)])
            self.progress.update()
            self.clock.step_done(self.pending[-1])
            if not sigint.deferred:  # Compiled: from now on Ctrl-C waits for the step's end.
                sigint.defer()

            last = step == config.steps
            eval_now = (config.eval_every and step % config.eval_every == 0) or last
            save_now = (
                self.checkpointer is not None
                and config.checkpoint_every
                and (step % config.checkpoint_every == 0 or last)
            )
            if step % config.log_every == 0 or last:
                self.log(step)
            if eval_now or save_now:
                self.evaluate_and_save(step, eval_now, save_now)
            if sigint.stop_requested and not last:  # Ctrl-C: stop between two steps.
                raise self.interrupted(step, saved=bool(save_now))
        if config.export_to is not None and jax.process_index() == 0:
            models.save_pretrained(setup.model, config.export_to)
        return self.finish(config.steps, status="completed")

    def micro_batches(self, step: int) -> list[jax.Array]:
        """The batch of ``step`` on device, as its ``grad_accum`` micro-batches."""
        batch, mesh = self.setup.stream.batch(step), self.setup.mesh
        put = jnp.asarray if mesh is None else (lambda b: sharding.global_batch(b, mesh))
        return [put(b) for b in np.split(batch, self.config.grad_accum)]

    def fetch(self, step: int) -> None:
        """Reads the pending (loss, finite) pairs of the steps up to ``step``: a step's loss is
        the mean of its micro-steps', and it is finite when all of them are."""
        values = jax.device_get(self.pending)
        first = step - len(values) + 1
        for i, micro in enumerate(values):
            losses, oks = zip(*micro, strict=True)
            loss, ok = float(np.mean(losses)), all(oks)
            if not ok and self.first_nonfinite is None:
                self.first_nonfinite = first + i
            self.fetched.append((loss, ok))
        self.pending.clear()

    def write(self, record: dict[str, Any]) -> None:
        """Writes a telemetry line or an evaluation to ``metrics.jsonl`` and TensorBoard."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.events is not None:
            (self.events.train if record["kind"] == "train" else self.events.eval)(record)

    def log(self, step: int) -> None:
        """Writes the telemetry line of the log interval that ends at ``step``."""
        self.fetch(step)
        losses = [loss for loss, _ in self.fetched]
        nonfinite = sum(not ok for _, ok in self.fetched)
        self.fetched.clear()
        steps, seconds = self.clock.end_interval()
        finite = [x for x in losses if math.isfinite(x)]
        self.last_loss = float(np.mean(finite)) if finite else None
        line = {
            "kind": "train",
            "step": step,
            "loss": self.last_loss,
            "perplexity": perplexity(self.last_loss),
            "learning_rate": self.setup.peak * float(self.schedule(step - 1)),
            "tokens_per_s": steps * self.tokens_per_step / seconds if seconds > 0 else 0.0,
            "step_time_s": seconds / steps if steps else None,
            "wall_time_s": self.clock.wall(),
            "nonfinite": nonfinite,
            "telemetry": read_telemetry(self.setup.optimizer),
        }
        self.write(line)
        self.progress.show(line)
        self.stop_if_nonfinite(step)

    def evaluate_and_save(self, step: int, eval_now: bool, save_now: bool) -> None:
        """Evaluates and/or saves a checkpoint after ``step``, outside the timed steps."""
        if self.pending and save_now:  # Never checkpoint parameters that a NaN step broke.
            self.fetch(step)
            self.stop_if_nonfinite(step)
        jax.block_until_ready(self.setup.model)
        self.clock.pause()
        if eval_now:
            setup = self.setup
            self.last_eval = evaluate_optimizer_point(
                self.config.optimizer,
                setup.model,
                setup.optimizer,
                setup.wrt,
                setup.eval_batches,
                setup.mesh,
            )
            self.write(
                {
                    "kind": "eval",
                    "step": step,
                    "eval_loss": self.last_eval,
                    "eval_perplexity": perplexity(self.last_eval),
                    "wall_time_s": self.clock.wall(),
                }
            )
        if save_now:
            self.save(step)
        self.clock.restart()

    def save(self, step: int) -> None:
        setup = self.setup
        self.checkpointer.save(
            step,
            {"params": nnx.state(setup.model, setup.wrt), "optimizer": nnx.state(setup.optimizer)},
            {
                "data": setup.stream.state(),
                "elapsed_s": self.clock.wall(),
                "config": normalised(self.config),
            },
        )

    def stop_if_nonfinite(self, step: int) -> None:
        """Ends the run with :class:`NonFiniteError` once a step was non-finite without a guard."""
        bad = self.first_nonfinite
        if bad is None or is_guarded(self.config.optimizer):
            return
        self.finish(step, status="nonfinite", nonfinite_step=bad)
        raise NonFiniteError(
            f"Step {bad}: the loss or gradients are NaN/Inf. Optimizer "
            f"{self.config.optimizer!r} has no guard, so that update wrote NaN/Inf into the "
            f"parameters; the run stopped at step {step} without saving them. Use a guarded "
            "optimizer (lbw, lbw+sgg) to hold such steps, or lower the learning rate.",
            bad,
        )

    def interrupted(self, step: int, saved: bool) -> Interrupted:
        """The :class:`Interrupted` of a stop after ``step``, saving a checkpoint if none is."""
        checkpointer = self.checkpointer
        if not saved and checkpointer is not None and self.config.checkpoint_every:
            self.fetch(step)
            self.stop_if_nonfinite(step)  # Never checkpoint parameters that a NaN step broke.
            self.save(step)
            saved = True
        where = (
            f"checkpoint of step {step} saved in {checkpointer.directory}"
            if saved
            else "no checkpoint saved (--checkpoint-every N makes a run resumable)"
        )
        message = f"interrupted after step {step} of {self.config.steps}; {where}"
        return Interrupted(message, step, saved)

    def finish(self, step: int, status: str, **extra: Any) -> dict[str, Any]:
        """Closes the telemetry; writes and returns the summary."""
        self.close()
        config, clock = self.config, self.clock
        steps, seconds = clock.total_steps, clock.total_time
        summary = {
            "status": status,
            "step": step,
            "steps": config.steps,
            "loss": self.last_loss,
            "perplexity": perplexity(self.last_loss),
            "eval_loss": self.last_eval,
            "eval_perplexity": perplexity(self.last_eval),
            "tokens_per_s": steps * self.tokens_per_step / seconds if seconds else None,
            "step_time_s": seconds / steps if steps else None,
            "compile_s": clock.compile_s,
            "wall_time_s": clock.wall(),
            "trainable_params": self.setup.trainable,
            "optimizer": config.optimizer,
            "model": self.setup.model.config.name,
            "data": self.setup.data,
            "telemetry": read_telemetry(self.setup.optimizer),
            "config": normalised(config),
            **extra,
        }
        write_json(self.summary_path, summary)
        return summary

    def close(self) -> None:
        self.metrics.close()
        if self.events is not None:
            self.events.close()
        self.progress.close()


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) the training run described by ``config``.

    Returns:
      The summary dict that is also written to ``out_dir/summary.json``.

    Raises:
      NonFiniteError: the loss or gradients became non-finite under an optimizer without a
        guard (the message names the step).
      Interrupted: Ctrl-C stopped the run between two steps (after saving a checkpoint of the
        last step done when ``checkpoint_every`` is set).
      KeyboardInterrupt: Ctrl-C during start-up (reading data, building, compiling), or a
        second Ctrl-C during a step.
      CheckpointError: ``resume`` found no checkpoint, or an unreadable or corrupted one.
      train.data.DataError: unknown data source; missing, empty, binary or non-UTF-8 files;
        too-short text.
      train.config.UserError: (the base of the two above) unknown names (optimizer, preset,
        model field), an ``out_dir`` that is a file or holds another run's results (without
        ``overwrite``), a resumed run whose config differs in a field that cannot change.

    A run that fails to start writes nothing: the output folder and ``checkpoints/`` are
    created only once the data is read and the model built. ``resume`` (without
    ``resume_step``) of a run that has completed returns its summary and rewrites nothing.
    """
    with handling_sigint() as sigint:
        return _train(config, sigint)


def _train(config: TrainConfig, sigint: Sigint) -> dict[str, Any]:
    """:func:`train`, with Ctrl-C handled by ``sigint`` (checked between the phases of
    start-up, see :mod:`train.interrupts`)."""
    clock = Clock()
    check_config(config)  # Fail fast on bad names, before reading any data.
    if config.export_to is not None and jax.process_count() > 1:
        raise ValueError(
            "export_to works in one process only; export from a checkpoint restored on one host."
        )
    say = (lambda msg: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr))
    summary_path, metrics_path = run_files(config)
    out_dir = check_out_dir(config, summary_path, metrics_path)
    if config.resume and config.resume_step is None:
        done = read_json(summary_path)
        if done is not None and done.get("status") == "completed":
            refuse_changes(done.get("config", {}), config)
            say(
                f"lbw-train: {out_dir} already finished (step {done.get('step')}); nothing to "
                "resume, its summary.json and metrics.jsonl are left as they are."
            )
            return done

    setup = build_setup(config)
    sigint.check()
    start_out_dir(config, out_dir, summary_path)
    checkpointer = None
    if config.checkpoint_every or config.resume:
        checkpointer = Checkpointer(
            out_dir / "checkpoints", keep=config.keep_checkpoints, every=config.checkpoint_every
        )
    session = None
    try:
        start_step, clock.elapsed_before = restore(config, checkpointer, setup, metrics_path)
        if start_step:
            say(f"lbw-train: resumed {out_dir} from step {start_step}")
        what = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full"
        say(
            f"lbw-train: {setup.model.config.name} ({what}, {setup.trainable:,} trainable "
            f"params), optimizer {config.optimizer}; data: {setup.data}"
        )
        paths = (out_dir, summary_path, metrics_path)
        session = Session(config, setup, checkpointer, clock, paths, start_step)
        sigint.check()
        return session.run(sigint)
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        if checkpointer is not None:
            checkpointer.close()
