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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lbw_optax
from lbw import models
from lbw.train import sharding
from lbw.train.checkpoint import Checkpointer, CheckpointError, has_checkpoints
from lbw.train.config import FaultConfig, TrainConfig, UserError
from lbw.train.data import Batches, DataStream, eval_set, load_tokens
from lbw.train.faults import loss_factor, perturb_grads
from lbw.train.interrupts import Sigint, handling_sigint
from lbw.train.optimizers import (
    PEAK_INSIDE,
    applied_schedule,
    build_optimizer,
    check_optimizer,
    eval_params,
    is_guarded,
    learning_rate_schedule,
    scale_by_peak_learning_rate,
    set_peak_learning_rate,
)
from lbw.train.progress import Throttle, describe
from lbw.train.tensorboard import EventWriter, remove_event_files

# Config fields that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "resume_step",
        "overwrite",
        "mesh",
        "quiet",
        "progress_every",
        "tensorboard",
        "export_to",
        "out_dir",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
    }
)


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


def check_config(config: TrainConfig) -> None:
    """Raises :class:`~train.config.UserError` for names the run cannot use: an unknown model
    preset or model field, an unknown optimizer, a bad mesh. Cheap: reads no data and builds
    nothing."""
    fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
    unknown = sorted(set(config.model_overrides) - fields)
    if unknown:
        raise UserError(
            f"--model-override: the model config has no field {', '.join(map(repr, unknown))}; "
            f"fields: {', '.join(sorted(fields))}."
        )
    try:
        shape = model_config(config)
        if config.scan_layers and config.lora_rank:
            raise ValueError(
                "--scan-layers and --lora-rank: LoRA adapters need the unrolled layout; drop "
                "--scan-layers"
            )
        check_optimizer(config.optimizer)
        sharding.parse_mesh(config.mesh)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    if config.seq_len > shape.max_position_embeddings:
        raise UserError(
            f"--seq-len {config.seq_len} is longer than model {shape.name!r} was made for "
            f"(max_position_embeddings {shape.max_position_embeddings}); use --seq-len "
            f"{shape.max_position_embeddings} or less, or raise the limit with "
            "--model-override max_position_embeddings=N."
        )


# Fields of a model config that a checkpoint's weights do not fix: a label, the numerics it is
# loaded in, and the context length it was trained for (RoPE has no table of positions).
# The layout fields too: a checkpoint loads into either layout, with or without remat.
_NOT_ARCHITECTURE = frozenset(
    {"name", "dtype", "param_dtype", "max_position_embeddings", "scan_layers", "remat"}
)


def architecture_differences(
    checkpoint: models.ModelConfig, model: models.ModelConfig
) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's, model's)}`` for the architecture fields that differ."""
    return {
        f.name: (getattr(checkpoint, f.name), getattr(model, f.name))
        for f in dataclasses.fields(model)
        if f.name not in _NOT_ARCHITECTURE and getattr(checkpoint, f.name) != getattr(model, f.name)
    }


def _differences_text(differs: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in differs.items())


def model_config(config: TrainConfig) -> models.ModelConfig:
    """The model a run trains: the ``model`` preset with its layout flags and
    ``model_overrides``; with ``init_from``, the architecture of the checkpoint's
    ``config.json`` (with the same), or the preset when one is named and it agrees with the
    checkpoint.

    Raises:
      FileNotFoundError: if ``init_from`` holds no ``config.json``.
      ValueError: an unknown preset or field; a named preset whose architecture differs from
        the checkpoint's (a :class:`~train.config.UserError` naming the fields and the fix).
    """
    # The layout flags, then the overrides (which may name them too).
    overrides = {"scan_layers": config.scan_layers, "remat": config.remat}
    overrides |= config.model_overrides
    if config.init_from is None:
        return models.get_config(config.model, **overrides)
    path = Path(config.init_from) / models.hf.CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {config.init_from}: no config.json in it.")
    checkpoint = models.config_from_hf(json.loads(path.read_text()), name=path.parent.name)
    if config.model is None:
        return dataclasses.replace(checkpoint, **overrides)
    preset = models.get_config(config.model, **overrides)
    differs = architecture_differences(checkpoint, preset)
    if differs:
        raise UserError(
            f"--model {config.model} does not match the config.json of --init-from "
            f"{config.init_from} ({_differences_text(differs)}); drop --model to train the "
            "checkpoint's architecture."
        )
    return preset


def build_model(config: TrainConfig, vocab_size: int) -> tuple[models.Decoder, Any]:
    """The decoder of ``config`` (:func:`model_config`; LoRA adapters added when
    ``lora_rank > 0``) and the filter of its trainable variables.

    Raises:
      ValueError: if the tokenizer's ``vocab_size`` does not fit the model's vocabulary.
    """
    spec = model_config(config)
    if vocab_size > spec.vocab_size:
        raise ValueError(
            f"The tokenizer has {vocab_size} ids but model {spec.name!r} only "
            f"{spec.vocab_size} embeddings."
        )
    model = models.Decoder(spec, rngs=nnx.Rngs(config.seed))
    if config.init_from is not None:
        load_weights(model, config.init_from)
    if config.lora_rank == 0:
        return model, nnx.Param
    models.add_lora(
        model,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        targets=config.lora_targets,
        rngs=nnx.Rngs(config.seed + 1),
    )
    return model, models.LORA_PARAMS


def load_weights(model: models.Decoder, path: str | os.PathLike) -> None:
    """Replaces the parameters of ``model`` by those of the Hugging Face-format checkpoint at
    ``path`` (``models.save_pretrained``'s layout).

    Raises:
      FileNotFoundError: if ``path`` holds no ``config.json`` or weights.
      ValueError: if the checkpoint's architecture differs from ``model``'s (the fields that
        differ are named).
    """
    mine = model.config
    base = models.load_pretrained(
        path, dtype=mine.dtype, param_dtype=mine.param_dtype, scan_layers=mine.scan_layers
    )
    differs = architecture_differences(base.config, mine)
    if differs:
        raise ValueError(
            f"init_from {path}: the checkpoint does not fit model {mine.name!r}: "
            f"{_differences_text(differs)}."
        )
    nnx.update(model, nnx.state(base, nnx.Param))


def make_train_step(config: TrainConfig, wrt: Any, mesh: jax.sharding.Mesh | None = None):
    """The jitted step ``(model, optimizer, tokens [B, T+1]) -> (loss, finite)``; with
    ``grad_accum`` K, a micro-step (the optimizer updates the model at every K-th call).

    Faults are decided on device from the optimizer's step counter (see :mod:`train.faults`), so
    the step is traced once. Runs in one process with the same faults and trainable filter share
    one step function, and so its compilation cache. With a ``mesh``, the updated model and
    optimizer state keep the FSDP layout of :func:`train.sharding.param_sharding`.

    The model and the optimizer are donated: the step writes the new parameters and state into
    the old ones' memory (arrays read from them before the call are invalid after it).
    """
    return _train_step(config.faults, wrt, mesh, config.grad_accum)


@functools.lru_cache(maxsize=16)
def _train_step(
    faults: FaultConfig, wrt: Any, mesh: jax.sharding.Mesh | None = None, grad_accum: int = 1
):

    @functools.partial(nnx.jit, donate_argnums=(0, 1))
    def train_step(model, optimizer, tokens):
        # The update this call (a micro-step of it, with grad_accum) performs, counted from 1.
        step = optimizer.step[...] // grad_accum + 1
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T] each

        def loss_fn(model):
            loss = models.cross_entropy_loss(model(inputs), targets)
            if faults.nan_loss_steps:
                loss = loss * loss_factor(step, faults)
            return loss

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        grads = perturb_grads(grads, step, faults)
        optimizer.update(model, grads, value=loss)
        if mesh is not None:
            nnx.update(model, sharding.constrain(nnx.state(model), mesh))
            nnx.update(optimizer, sharding.constrain(nnx.state(optimizer), mesh))
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        return loss, finite

    return train_step


# The fields that define the optimizer and its schedule.
_OPTIMIZER_FIELDS = (
    "optimizer",
    "learning_rate",
    "schedule",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip_threshold",
    "policy",
    "peak_lr_in_state",
    "inner",
    "optimizer_args",
    "steps",
    "faults",
    "scan_layers",  # A governor limits each stacked layer: the layout is part of the optimizer.
    "model_overrides",
    "grad_accum",
)


@functools.lru_cache(maxsize=16)
def _transform(*values):
    """The schedule and transformation of a config, shared by runs in one process that agree on
    ``_OPTIMIZER_FIELDS``: the transformation is part of the ``nnx.Optimizer`` graph, so sharing
    it lets such runs reuse the compiled step."""
    config = TrainConfig(**dict(zip(_OPTIMIZER_FIELDS, values, strict=True)))
    schedule = learning_rate_schedule(config)
    tx = build_optimizer(config, schedule)
    # Here learning_rate is 1: the peak is set in the state (inside the guard, for a guard).
    if config.peak_lr_in_state and config.optimizer not in PEAK_INSIDE:
        tx = optax.with_extra_args_support(optax.chain(tx, scale_by_peak_learning_rate()))
    if config.grad_accum > 1:
        tx = lbw_optax.accumulate_gradients(tx, config.grad_accum)
    return schedule, tx


def _optimizer_fields(config: TrainConfig) -> list[Any]:
    """The values of ``_OPTIMIZER_FIELDS`` of ``config``, the peak learning rate left out (set to
    1) when it lives in the optimizer state."""
    values = [_hashable(getattr(config, f)) for f in _OPTIMIZER_FIELDS]
    if config.peak_lr_in_state:
        values[_OPTIMIZER_FIELDS.index("learning_rate")] = 1.0
    return values


def _hashable(value: Any) -> Any:
    """A dict field as sorted (key, value) pairs, so it can key :func:`_transform`'s cache."""
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


def _raw(tree: Any) -> Any:
    """The arrays of a tree of ``nnx.Variable`` (an optimizer state or a model state)."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda v: v.get_value() if is_var(v) else v, tree, is_leaf=is_var)


def evaluate_optimizer_point(
    name: str,
    model: models.Decoder,
    optimizer: nnx.Optimizer,
    wrt: Any,
    batches: np.ndarray,
    mesh: jax.sharding.Mesh | None = None,
) -> float:
    """:func:`evaluate` at the parameters the optimizer names for evaluation (its registered
    ``eval_params``, e.g. schedule-free's averaged sequence), the model's own otherwise. The
    model's trained parameters are put back afterwards."""
    point = eval_params(name)
    if point is None:
        return evaluate(model, batches, mesh)
    current = _raw(nnx.state(model, wrt))
    nnx.update(model, point(_raw(optimizer.opt_state), current))
    try:
        return evaluate(model, batches, mesh)
    finally:
        nnx.update(model, current)


@nnx.jit
def _eval_step(model, tokens):
    return models.cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])


def evaluate(
    model: models.Decoder, batches: np.ndarray, mesh: jax.sharding.Mesh | None = None
) -> float:
    """Mean loss of ``model`` over the fixed evaluation ``batches`` [n, B, T+1] (each sharded
    over the ``mesh``'s batch axes when there is one)."""
    put = jnp.asarray if mesh is None else (lambda b: sharding.global_batch(b, mesh))
    losses = [_eval_step(model, put(b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))


def _scalar(x: Any) -> Any:
    x = np.asarray(x)
    if x.dtype == bool:
        return bool(x)
    if np.issubdtype(x.dtype, np.integer):
        return int(x)
    return float(x)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _perplexity(loss: float | None) -> float | None:
    """``exp(loss)``, or None for a missing loss or an overflow."""
    return None if loss is None else _json_float(math.exp(min(loss, 700.0)))


def _numbers(x: Any) -> list[Any]:
    x = np.asarray(x)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return x.ravel().tolist()
    return [_json_float(v) for v in x.ravel().tolist()]


def _telemetry_value(value: Any) -> Any:
    """A telemetry field as JSON: a scalar as a number, an array as a list, and a per-tensor
    field (a tree of small arrays matching the parameters, e.g. SGG's ``cluster_scales``) as
    ``{"layers/0/mlp/down_proj/kernel": [...], ...}`` (the tensors SGG skips hold
    ``optax.MaskedNode``, which has no leaves, so they do not appear)."""
    if isinstance(value, np.ndarray | np.generic | int | float | bool):
        return _scalar(value) if np.ndim(value) == 0 else _numbers(value)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): _numbers(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(value)
    }


def read_telemetry(optimizer: nnx.Optimizer) -> dict[str, Any]:
    """``lbw_optax.telemetry`` of the optimizer as plain Python values (``{}`` without a guard):
    scalars as numbers, per-tensor fields (SGG's ``cluster_scales``, ...) by parameter path
    (see :func:`_telemetry_value`), with ``regime_name`` added when a regime is reported."""
    fields = jax.device_get(lbw_optax.telemetry(optimizer.opt_state))
    out = {k: _telemetry_value(v) for k, v in fields.items()}
    if "regime" in out:
        out["regime_name"] = lbw_optax.Regime(out["regime"]).name
    return out


def _truncate_jsonl(path: Path, last_step: int) -> None:
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


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _normalised(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=str))


class _Progress:
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


def _changed_fields(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The config fields that differ from a ``saved`` run's and may not change on resume (a
    field the saved run predates counts as its default)."""
    current, defaults = _normalised(config), _normalised(TrainConfig())
    return sorted(
        k for k in current if saved.get(k, defaults[k]) != current[k] and k not in RESUMABLE_CHANGES
    )


def _refuse_changes(saved: dict[str, Any], config: TrainConfig) -> None:
    changed = _changed_fields(saved, config)
    if changed:
        raise UserError(
            f"Cannot resume {config.out_dir}: the config differs from the run's in {changed} "
            f"(saved: {[saved.get(k) for k in changed]}); resume with the run's flags, or start "
            "a new run in another --out-dir."
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _check_out_dir(config: TrainConfig, summary_path: Path, metrics_path: Path) -> Path:
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
    summary = _read_json(summary_path)
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


def _last_values(metrics_path: Path) -> tuple[float | None, float | None]:
    """The last training loss and evaluation loss logged in ``metrics_path``."""
    last_loss, last_eval = None, None
    for line in metrics_path.read_text().splitlines() if metrics_path.exists() else ():
        record = json.loads(line)
        if record.get("kind") == "train":
            last_loss = record.get("loss")
        elif record.get("kind") == "eval":
            last_eval = record.get("eval_loss")
    return last_loss, last_eval


@dataclasses.dataclass
class _Clock:
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


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What a run trains and on what: built from the config, before anything is written."""

    model: models.Decoder
    optimizer: nnx.Optimizer
    wrt: Any  # The filter of the trainable variables.
    stream: DataStream
    eval_batches: np.ndarray  # [n, B, T+1]
    data: str  # The data's description.
    schedule: Any  # The learning rate schedule of a peak of 1 ...
    peak: float  # ... times this.
    mesh: jax.sharding.Mesh | None
    trainable: int  # Number of trainable parameters.


def _setup(config: TrainConfig) -> _Setup:
    """Reads and tokenizes the data, builds the model and its optimizer, and shards both over
    the config's mesh."""
    tokenizer = models.load_tokenizer(config.tokenizer)
    tokens = load_tokens(config, tokenizer)
    train_tokens, eval_tokens, description = tokens.train, tokens.eval, tokens.description
    batches = Batches(
        train_tokens,
        seq_len=config.seq_len,
        batch_size=config.batch_size * config.grad_accum,  # The micro-batches of one update.
        seed=config.seed,
    )
    stream = DataStream(batches, config.faults, vocab_size=tokens.vocab_size, seed=config.seed)
    eval_batches = eval_set(
        eval_tokens,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        num_batches=config.eval_batches,
    )

    model, wrt = build_model(config, tokens.vocab_size)
    unit_schedule, tx = _transform(*_optimizer_fields(config))
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    peak = 1.0
    if config.peak_lr_in_state:
        peak = config.learning_rate
        set_peak_learning_rate(optimizer.opt_state, peak)
    mesh = None
    if config.mesh:
        mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch(config.batch_size, mesh)
        nnx.update(model, sharding.shard(nnx.state(model), mesh))
        nnx.update(optimizer, sharding.shard(nnx.state(optimizer), mesh))
    return _Setup(
        model=model,
        optimizer=optimizer,
        wrt=wrt,
        stream=stream,
        eval_batches=eval_batches,
        data=description,
        schedule=unit_schedule,
        peak=peak,
        mesh=mesh,
        trainable=sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))),
    )


def _start_out_dir(config: TrainConfig, out_dir: Path, summary_path: Path) -> None:
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


def _restore(config, checkpointer, setup: _Setup, metrics_path: Path) -> tuple[int, float]:
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
    _refuse_changes(meta["config"], config)
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
    _truncate_jsonl(metrics_path, start_step)
    return start_step, float(meta["elapsed_s"])


class _Session:
    """The steps of one session of a run (from its first or resumed step to the last), with
    the telemetry lines, evaluations and checkpoints due at intervals, and its summary."""

    def __init__(self, config, setup: _Setup, checkpointer, clock: _Clock, paths, start_step):
        self.config, self.setup, self.checkpointer, self.clock = config, setup, checkpointer, clock
        self.out_dir, self.summary_path, self.metrics_path = paths
        self.start_step = start_step
        self.last_loss, self.last_eval = None, None
        if start_step:  # Until this session logs its own.
            self.last_loss, self.last_eval = _last_values(self.metrics_path)
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
        self.progress = _Progress(config, start_step)

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
            "perplexity": _perplexity(self.last_loss),
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
                    "eval_perplexity": _perplexity(self.last_eval),
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
                "config": _normalised(self.config),
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
            "perplexity": _perplexity(self.last_loss),
            "eval_loss": self.last_eval,
            "eval_perplexity": _perplexity(self.last_eval),
            "tokens_per_s": steps * self.tokens_per_step / seconds if seconds else None,
            "step_time_s": seconds / steps if steps else None,
            "compile_s": clock.compile_s,
            "wall_time_s": clock.wall(),
            "trainable_params": self.setup.trainable,
            "optimizer": config.optimizer,
            "model": self.setup.model.config.name,
            "data": self.setup.data,
            "telemetry": read_telemetry(self.setup.optimizer),
            "config": _normalised(config),
            **extra,
        }
        _write_json(self.summary_path, summary)
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
    clock = _Clock()
    check_config(config)  # Fail fast on bad names, before reading any data.
    if config.export_to is not None and jax.process_count() > 1:
        raise ValueError(
            "export_to works in one process only; export from a checkpoint restored on one host."
        )
    say = (lambda msg: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr))
    # With several processes, process 0 writes the run's files and the others their own copies.
    suffix = f".process{jax.process_index()}" if jax.process_index() else ""
    summary_path = Path(config.out_dir) / f"summary{suffix}.json"
    metrics_path = Path(config.out_dir) / f"metrics{suffix}.jsonl"
    out_dir = _check_out_dir(config, summary_path, metrics_path)
    if config.resume and config.resume_step is None:
        done = _read_json(summary_path)
        if done is not None and done.get("status") == "completed":
            _refuse_changes(done.get("config", {}), config)
            say(
                f"lbw-train: {out_dir} already finished (step {done.get('step')}); nothing to "
                "resume, its summary.json and metrics.jsonl are left as they are."
            )
            return done

    setup = _setup(config)
    sigint.check()
    _start_out_dir(config, out_dir, summary_path)
    checkpointer = None
    if config.checkpoint_every or config.resume:
        checkpointer = Checkpointer(
            out_dir / "checkpoints", keep=config.keep_checkpoints, every=config.checkpoint_every
        )
    session = None
    try:
        start_step, clock.elapsed_before = _restore(config, checkpointer, setup, metrics_path)
        if start_step:
            say(f"lbw-train: resumed {out_dir} from step {start_step}")
        what = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full"
        say(
            f"lbw-train: {setup.model.config.name} ({what}, {setup.trainable:,} trainable "
            f"params), optimizer {config.optimizer}; data: {setup.data}"
        )
        paths = (out_dir, summary_path, metrics_path)
        session = _Session(config, setup, checkpointer, clock, paths, start_step)
        sigint.check()
        return session.run(sigint)
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        if checkpointer is not None:
            checkpointer.close()
