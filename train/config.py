"""Typed configuration of one training run: :class:`TrainConfig`, its :class:`FaultConfig`, and
the optimizer part, :class:`OptimizerConfig`, whose :meth:`~OptimizerConfig.build` makes the
learning-rate schedule and the transformation.

A :class:`TrainConfig` is flat (one field per ``lbw-train`` flag, as ``config.json`` stores it)
and made of parts, each a dataclass of its fields: the model, the optimizer, the data, the run,
and the session (how this process runs it: output, logging, devices; the only part a resumed
run may change). ``config.optim`` is the optimizer part as an :class:`OptimizerConfig`.

Steps are counted from 1: "step k" is the k-th optimizer update, and a telemetry line with
``"step": k`` reports the state after that update. Every fault is keyed by these step numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

DEFAULT_MODEL = "tiny_qwen2_5_3b"  # The preset of a run that names none and starts afresh.
Schedule = Literal["cosine", "constant"]
SCHEDULES = typing.get_args(Schedule)


class UserError(ValueError):
    """An input the user can fix: a flag, a file, a folder, a run to resume.

    The message names the thing and what to do; ``lbw-train`` and ``lbw-stress`` print it as
    one line ``prog: error: ...`` and exit with a non-zero status, without a traceback.
    """


def _steps(value: Any, name: str) -> tuple[int, ...]:
    steps = tuple(int(s) for s in value)
    if any(s < 1 for s in steps):
        raise ValueError(f"{name} must hold step numbers >= 1 (steps count from 1), got {steps}.")
    return tuple(sorted(set(steps)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Faults injected into one run, to test how an optimizer copes.

    Attributes:
      grad_spike_steps: steps whose gradients are multiplied by ``grad_spike_factor``.
      grad_spike_factor: the spike factor F.
      nan_loss_steps: steps whose loss is NaN (the loss is multiplied by NaN inside the
        differentiated function, so the gradients are NaN too, as after a real overflow).
      nan_grad_steps: steps whose gradients are NaN while the loss stays finite.
      corrupt_start: first step of a burst of corrupted batches (every token replaced by a
        uniformly random token id, drawn from the run's seeded data RNG); ``None`` for no burst.
      corrupt_steps: number of consecutive corrupted batches.
      lr_shock_start: first step whose learning rate is multiplied by ``lr_shock_factor``;
        ``None`` for no shock.
      lr_shock_steps: number of steps the shock lasts.
      lr_shock_factor: the shock factor F.
    """

    grad_spike_steps: tuple[int, ...] = ()
    grad_spike_factor: float = 100.0
    nan_loss_steps: tuple[int, ...] = ()
    nan_grad_steps: tuple[int, ...] = ()
    corrupt_start: int | None = None
    corrupt_steps: int = 0
    lr_shock_start: int | None = None
    lr_shock_steps: int = 0
    lr_shock_factor: float = 10.0

    def __post_init__(self):
        for name in ("grad_spike_steps", "nan_loss_steps", "nan_grad_steps"):
            object.__setattr__(self, name, _steps(getattr(self, name), name))
        for name in ("corrupt_start", "lr_shock_start"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a step number >= 1 or None, got {value!r}.")
        for name in ("corrupt_steps", "lr_shock_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        for name in ("grad_spike_factor", "lr_shock_factor"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}.")

    @property
    def any(self) -> bool:
        """Whether any fault is configured."""
        return bool(
            self.grad_spike_steps
            or self.nan_loss_steps
            or self.nan_grad_steps
            or (self.corrupt_start is not None and self.corrupt_steps > 0)
            or (self.lr_shock_start is not None and self.lr_shock_steps > 0)
        )

    def corrupted(self, step: int) -> bool:
        """Whether the batch of ``step`` is corrupted."""
        if self.corrupt_start is None:
            return False
        return self.corrupt_start <= step < self.corrupt_start + self.corrupt_steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelPart:
    """The model part of a :class:`TrainConfig`.

    Model:
      model: a preset name of ``models.PRESETS``; ``None``: ``"tiny_qwen2_5_3b"``, or with
        ``init_from`` the architecture of the checkpoint's ``config.json`` (a named preset must
        then agree with it).
      model_overrides: fields of ``models.ModelConfig`` to replace (e.g. ``{"num_layers": 2}``).
      tokenizer: a local Hugging Face tokenizer directory, or ``None`` for the byte-level
        tokenizer (the default; it fits the ``tiny_*`` presets' vocabulary).
      lora_rank: 0 trains every parameter; r > 0 adds rank-r LoRA adapters and trains only them.
      lora_alpha: LoRA scale numerator (the adapter output is scaled by ``alpha / rank``).
      lora_targets: projections that get adapters (names from ``models.ALL_TARGETS``).
      init_from: a Hugging Face-format model directory (``config.json`` and safetensors, as
        written by ``export_to`` or ``models.save_pretrained``; Qwen2 or LLaMA layout) whose
        weights replace the random initialisation before LoRA adapters are added; the model is
        the one its ``config.json`` describes (``model_overrides`` may change its numerics).
        ``None``: random initialisation.
      scan_layers: hold the blocks stacked and run them with ``nnx.scan`` (compilation no
        longer grows with depth); the governor then limits each layer as in the unrolled
        layout. Not with LoRA.
      remat: recompute each block's activations in the backward pass (``nnx.remat``): less
        memory for about one more forward pass.
    """

    model: str | None = None
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    init_from: str | None = None
    scan_layers: bool = False
    remat: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerPart:
    """The optimizer part of a :class:`TrainConfig` (the fields of an :class:`OptimizerConfig`).

    Optimizer:
      optimizer: the optimizer, by its registered name (what each one runs: docs/training.md).
      learning_rate: peak learning rate.
      schedule: ``"cosine"`` (linear warm-up, then cosine decay to ``min_lr_ratio`` × peak at
        the last step) or ``"constant"`` (linear warm-up, then constant).
      warmup_steps: steps of linear warm-up from 0.
      min_lr_ratio: final learning rate of the cosine schedule, as a fraction of the peak.
      weight_decay, b1, b2, eps: AdamW hyperparameters (used by every AdamW-based optimizer).
      clip_threshold: global-norm threshold of ``adamw+clip`` and ``lbw+clip``.
      policy: governance policy of ``lbw``, ``lbw+clip`` and ``lbw+sgg``: ``"governor"`` or
        ``"reference"``.
      peak_lr_in_state: hold the peak learning rate in the optimizer state (a run-time value)
        instead of in the compiled step: the optimizer runs with a peak-1 schedule, then its
        update is multiplied by the state's peak (see
        :func:`train.optimizers.scale_by_peak_learning_rate`; the same update, up to rounding,
        for every optimizer whose update is linear in the learning rate, as every built-in one
        is). Runs in one process that differ only in their learning rate then share one
        compiled step (a suite on a GPU pays one compilation per optimizer, not per run).
      inner: the optimizer the ``lbw`` guard governs (``train.optimizers.INNER``: ``adamw``,
        ``lion``, ``muon``, ``adafactor``, ``sgd``).
      optimizer_args: keyword arguments for the library factory behind ``optimizer`` (e.g.
        ``{"recluster_every": 10}`` for ``sgg``, ``{"reset_interval": 100}`` for ``spam``);
        how the suites scale the peers' time constants to their runs. ``{}``: the defaults.
    """

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_threshold: float = 1.0
    policy: Literal["governor", "reference"] = "governor"
    peak_lr_in_state: bool = False
    inner: Literal["adamw", "lion", "muon", "adafactor", "sgd"] = "adamw"
    optimizer_args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataPart:
    """The data part of a :class:`TrainConfig`.

    Data:
      data: ``"wikitext2"`` (the shipped sample: trains on its validation split, evaluates on
        its test split), ``"wikitext103"`` (Hugging Face ``Salesforce/wikitext``,
        ``wikitext-103-raw-v1``), ``"hf:NAME"`` or ``"hf:NAME:CONFIG"`` (any Hugging Face
        dataset with a text column), ``"files"`` (local text files, read with the
        ``datasets`` text loader), ``"tfds:NAME"`` (``tfds.data_source``) or
        ``"tokens:DIR"`` (token files ``DIR/train.bin`` and ``DIR/val.bin``, memory-mapped;
        ``lbw-train tokenize TEXT DIR`` makes them).
      train_files, eval_files: the local files of ``data="files"``.
      train_split, eval_split: splits of the ``hf:``/``tfds:`` sources; ``None`` picks the
        source's default (``train`` and ``validation``, or ``test`` when TFDS has no
        validation split).
      text_field: the column/feature that holds the text.
      data_dir: cache directory of ``datasets``/TFDS (``None``: their defaults).
      seq_len: tokens per training sequence (the model sees ``seq_len`` inputs and predicts
        ``seq_len`` targets).
      batch_size: sequences per step (per micro-step with ``grad_accum``).
      grad_accum: micro-batches of ``batch_size`` sequences per optimizer update, K: gradient
        accumulation through ``lbw_optax.accumulate_gradients`` (``optax.MultiSteps`` that hands
        the optimizer the mean loss of the K micro-batches). An update sees K × ``batch_size``
        sequences; the activation memory is that of one micro-batch.
    """

    data: str = "wikitext2"
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    train_split: str | None = None
    eval_split: str | None = None
    text_field: str = "text"
    data_dir: str | None = None
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunPart:
    """The run part of a :class:`TrainConfig`: its length, its seed and its faults.

    Run:
      steps: optimizer updates to run.
      seed: seeds the model initialisation, the data shuffle and the data RNG.
      eval_batches: number of batches of the fixed evaluation set.
      faults: the :class:`FaultConfig`.
    """

    steps: int = 200
    seed: int = 0
    eval_batches: int = 8
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionPart:
    """The session part of a :class:`TrainConfig`: where and how this process runs it; the only
    part that may change when a run is resumed.

    Run:
      eval_every: evaluate every N steps (0: only at the end).
      log_every: write a telemetry line every N steps.
      out_dir: the run directory (``metrics.jsonl``, ``summary.json``, ``checkpoints/``).
      checkpoint_every: save a checkpoint every N steps (0: never, not even at the end).
      keep_checkpoints: how many of the latest checkpoints to keep.
      resume: continue from the latest checkpoint in ``out_dir`` (with the run's flags); a
        finished run is left as it is.
      resume_step: with ``resume``, continue from this checkpoint step instead of the latest.
      overwrite: start afresh in an ``out_dir`` that holds the results of another run (its
        ``metrics.jsonl``, ``summary.json`` and ``checkpoints/`` are replaced); without it such
        an ``out_dir`` is refused.
      quiet: no progress bar or progress lines and no console messages on stderr (the final
        summary is still printed).
      progress_every: when stderr is not a terminal (a log file, nohup, CI, SLURM), print a
        plain progress line (step, loss, tokens/s, time left, the guard's regime and scale) at
        the first log interval and then at most every N seconds (0: at every log interval).
      tensorboard: write TensorBoard event files into ``out_dir`` (the telemetry lines, the
        evaluations, the guard's telemetry; see :mod:`train.tensorboard`).
      export_to: at the end of a completed run, write the model there in Hugging Face format
        (LoRA adapters merged), e.g. the base of a later ``init_from`` run. ``None``: no export.

    Devices:
      mesh: ``""`` (one device) or a device mesh ``"data=D,fsdp=F"`` over all devices of all
        processes (see :mod:`train.sharding`); may change when a run is resumed.
    """

    eval_every: int = 0
    log_every: int = 10
    out_dir: str = "runs/default"
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    resume_step: int | None = None
    overwrite: bool = False
    quiet: bool = False
    progress_every: float = 30.0
    tensorboard: bool = True
    export_to: str | None = None
    mesh: str = ""


def _positive(config: Any, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < minimum:
            what = "a positive int" if minimum else "an int >= 0"
            raise ValueError(f"{name} must be {what}, got {value!r}.")


class Optimizer(NamedTuple):
    """What :meth:`OptimizerConfig.build` returns."""

    schedule: Callable[[Any], Any]  # The learning rate of an update count (peak 1 with
    # ``peak_lr_in_state``: the peak is then set in the state, see ``set_peak_learning_rate``).
    tx: Any  # The optax.GradientTransformationExtraArgs (takes ``value=``, state donatable).


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig(OptimizerPart):
    """The optimizer of a run and its learning-rate schedule: what the registered factories
    receive (see :mod:`train.optimizers`), and what makes the transformation, with
    :meth:`build`.

    >>> tx = OptimizerConfig(optimizer="lbw", learning_rate=3e-4).build(steps=100).tx

    Attributes:
      stacked: whether the model holds its layers stacked (``scan_layers``); a guard then limits
        each layer on its own. Set from the model's layout by :attr:`TrainConfig.optim`.
    """

    stacked: bool = False

    def __post_init__(self):
        object.__setattr__(self, "optimizer_args", dict(self.optimizer_args))
        _positive(self, ("warmup_steps",), 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
        if not self.clip_threshold > 0:
            raise ValueError(f"clip_threshold must be positive, got {self.clip_threshold!r}.")

    def __hash__(self) -> int:  # optimizer_args is a dict: hashed as its sorted items.
        values = dataclasses.astuple(self)
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values))

    @property
    def adamw_args(self) -> dict[str, float]:
        """The AdamW hyperparameters as keyword arguments (``b1``, ``b2``, ``eps``,
        ``weight_decay``), as ``optax.adamw`` and the library's ``*_adamw`` take them."""
        return dict(b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)

    def build(
        self, steps: int, *, faults: FaultConfig | None = None, grad_accum: int = 1
    ) -> Optimizer:
        """The learning-rate schedule and the transformation of a run of ``steps`` updates.

        The schedule warms up linearly, then decays (cosine, to ``min_lr_ratio`` × peak at
        ``steps``) or stays constant; ``faults``' learning-rate shock multiplies it. The
        transformation is the registered factory's (``lbw_optax.donatable``), followed by the
        peak learning rate held in the state with ``peak_lr_in_state``, and wrapped in
        ``lbw_optax.accumulate_gradients`` for ``grad_accum`` > 1.

        Configs equal but for their learning rate under ``peak_lr_in_state`` get the same
        objects (cached): the transformation is part of the ``nnx.Optimizer`` graph, so runs in
        one process that share it share their compiled step.

        Raises:
          ValueError: an unknown optimizer or inner optimizer, a bad ``optimizer_args``.
        """
        from lbw.train.optimizers import build

        # With the peak in the state, the transformation runs with a peak of 1.
        config = dataclasses.replace(self, learning_rate=1.0) if self.peak_lr_in_state else self
        return build(config, steps, faults or FaultConfig(), grad_accum)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(SessionPart, RunPart, DataPart, OptimizerPart, ModelPart):
    """Everything that defines a run; saved with every checkpoint.

    Each field is a flag of ``lbw-train`` (see :mod:`train.cli`) whose help is its entry in the
    docstring of its part (:class:`ModelPart`, :class:`OptimizerPart`, :class:`DataPart`,
    :class:`RunPart`, :class:`SessionPart`; the parts are listed last first, so that the fields
    and the flags' help go in the order model, optimizer, data, run): a new field needs its
    entry, under the section whose flags it joins.
    """

    def __post_init__(self):
        if self.model is None and self.init_from is None:
            object.__setattr__(self, "model", DEFAULT_MODEL)
        if isinstance(self.faults, dict):
            object.__setattr__(self, "faults", FaultConfig(**self.faults))
        for name in ("lora_targets", "train_files", "eval_files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        object.__setattr__(self, "optimizer_args", dict(self.optimizer_args))
        names = ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_batches")
        _positive(self, (*names, "keep_checkpoints"), 1)
        _positive(self, ("lora_rank", "eval_every", "checkpoint_every"), 0)
        _ = self.optim  # Checks the optimizer part.
        if not self.progress_every >= 0:
            raise ValueError(f"progress_every must be >= 0 seconds, got {self.progress_every!r}.")
        if self.resume_step is not None and not self.resume:
            raise ValueError("resume_step needs resume=True (--resume).")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other: resume continues a run.")

    @functools.cached_property
    def optim(self) -> OptimizerConfig:
        """The optimizer part, with the model's layout (``stacked``)."""
        stacked = bool(self.model_overrides.get("scan_layers", self.scan_layers))
        return OptimizerConfig(**part(self, OptimizerPart), stacked=stacked)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what checkpoints and ``summary.json`` store): flat, one
        key per field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        values = dict(values)
        if isinstance(values.get("faults"), dict):
            values["faults"] = FaultConfig(**values["faults"])
        return cls(**values)


# The parts of a TrainConfig, in its fields' order; all but the session define the run.
PARTS = (ModelPart, OptimizerPart, DataPart, RunPart, SessionPart)


def part(values: Any, cls: type) -> dict[str, Any]:
    """The fields of part ``cls`` (e.g. :class:`OptimizerPart`) of a config or a dict."""
    names = [f.name for f in dataclasses.fields(cls)]
    if isinstance(values, dict):
        return {name: values[name] for name in names if name in values}
    return {name: getattr(values, name) for name in names}
