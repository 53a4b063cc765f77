"""The stress suite's specification: methods, settings, the suite, one expanded run, and the
roles the report reads from a spec (which methods are the baseline, the guarded ones, the
controls and what they read)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lbw.train.config import FaultConfig

SPIKE_FACTOR = 1.5
TARGET_FACTOR = 1.10
CONTROLS = ("effective-lr", "replay")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One method of a suite.

    Attributes:
      name: the label in tables and run ids (``governor``, ``adamw+clip0.5``).
      optimizer: the registered optimizer name (``train.optimizers``), ``adamw`` for controls.
      overrides: :class:`TrainConfig` fields to set (``policy``, ``clip_threshold``, …).
      control: ``None``, ``"effective-lr"`` or ``"replay"``.
      source: for a control, the name of the method whose run it reads.
      time_constants: the method's time constants as fractions of the run's ``steps``
        (factory keyword → fraction, e.g. ``{"recluster_every": 0.05}``); each run gets
        ``max(1, round(fraction × steps))`` in ``optimizer_args``.
      base_lr: a learning rate of the method's own that the multipliers scale instead of the
        setting's base (1.0 for the methods whose learning rate multiplies a learned step
        size); ``None``: the setting's.
      lr_multipliers: the only multipliers this method runs at (of those its setting runs);
        empty: all of them. A control runs at most where its source runs.
    """

    name: str
    optimizer: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    control: str | None = None
    source: str | None = None
    time_constants: Mapping[str, float] = dataclasses.field(default_factory=dict)
    base_lr: float | None = None
    lr_multipliers: tuple[float, ...] = ()

    def resolved_time_constants(self, steps: int) -> dict[str, int]:
        """``time_constants`` in steps for a run of ``steps`` updates."""
        return {k: max(1, round(f * steps)) for k, f in self.time_constants.items()}

    def __post_init__(self):
        if (self.control is None) != (self.source is None):
            raise ValueError(f"method {self.name!r}: control and source go together.")
        if self.control is not None and self.control not in CONTROLS:
            raise ValueError(f"method {self.name!r}: control must be one of {CONTROLS}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """A model setting: preset, overrides, LoRA or full, and its base learning rate.

    Attributes:
      name: the label in tables and run ids.
      model: a preset of ``models.PRESETS``.
      model_overrides: fields of the preset to replace.
      lora_rank: 0 for full-parameter training, r > 0 for rank-r LoRA adapters.
      base_lr: the base learning rate, or ``None`` to choose it with :func:`choose_base_lr`
        over ``lr_grid`` as the suite's first stage.
      lr_grid: the AdamW sweep grid of :func:`choose_base_lr`.
      base_lr_note: how a fixed ``base_lr`` was measured (the command), for the report.
      pretrain: for LoRA, :class:`TrainConfig` fields of the cached base pre-training (full
        parameters, AdamW, the suite's first seed, no fault), e.g. ``{"learning_rate": 1e-3}``;
        it runs once, before everything else, and every run of the setting starts from its
        exported weights (``init_from``). ``None``: the runs start from a random base.
      methods: the names of the suite's methods this setting runs (empty: all of them).
      lr_multipliers: this setting's learning-rate multipliers (empty: the suite's).
      train: :class:`TrainConfig` fields that replace the suite's for this setting (e.g. a
        longer run: ``{"steps": 2000}``).
      seeds: this setting's seeds (empty: the suite's).
    """

    name: str
    model: str
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lora_rank: int = 0
    base_lr: float | None = None
    lr_grid: tuple[float, ...] = ()
    base_lr_note: str = ""
    pretrain: Mapping[str, Any] | None = None
    methods: tuple[str, ...] = ()
    lr_multipliers: tuple[float, ...] = ()
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = ()

    def __post_init__(self):
        if self.base_lr is None and not self.lr_grid:
            raise ValueError(f"setting {self.name!r}: give base_lr or an lr_grid to sweep.")
        if self.pretrain is not None and self.lora_rank == 0:
            raise ValueError(
                f"setting {self.name!r}: a base pre-training is for LoRA settings (lora_rank > 0)."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteSpec:
    """A declarative stress suite.

    Attributes:
      name: the suite's name (its directory under the output root).
      description: one paragraph for the report.
      settings: the model settings.
      methods: the methods, controls included (a control's source must be listed too).
      lr_multipliers: multipliers of each setting's base learning rate.
      faults: fault name → :class:`FaultConfig` fields (``"none"``: ``{}``).
      fault_settings: settings that run the faults other than ``"none"`` (empty: all).
      fault_multipliers: multipliers at which the faults run (empty: all).
      fault_methods: methods that run the faults other than ``"none"`` (empty: all).
      seeds: the seeds.
      train: :class:`TrainConfig` fields shared by every run (steps, data, sizes, …).
      device: the kind of machine the suite is meant for (for the report).
    """

    name: str
    description: str
    settings: tuple[Setting, ...]
    methods: tuple[Method, ...]
    lr_multipliers: tuple[float, ...]
    faults: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: {"none": {}}
    )
    fault_settings: tuple[str, ...] = ()
    fault_multipliers: tuple[float, ...] = ()
    fault_methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "CPU"

    def __post_init__(self):
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r}: duplicate method names {names}.")
        for m in self.methods:
            if m.source is not None and m.source not in names:
                raise ValueError(f"control {m.name!r} reads {m.source!r}, not in the suite.")
            if m.source is not None and self.method(m.source).control is not None:
                raise ValueError(f"control {m.name!r} reads another control.")
            source = self.method(m.source) if m.source is not None else None
            if source is not None and source.lr_multipliers:
                missing = sorted(
                    set(m.lr_multipliers or self.lr_multipliers) - set(source.lr_multipliers)
                )
                if missing:
                    where = ", ".join(f"×{x:g}" for x in missing)
                    raise ValueError(f"control {m.name!r} runs at {where}, {m.source!r} does not.")
        for s in self.settings:
            unknown = sorted(set(s.methods) - set(names))
            if unknown:
                raise ValueError(f"setting {s.name!r} names unknown methods {unknown}.")
            for name in self.methods_of(s):
                source = self.method(name).source
                if source is not None and source not in self.methods_of(s):
                    raise ValueError(
                        f"setting {s.name!r} runs control {name!r} without its source {source!r}."
                    )
        unknown = sorted(set(self.fault_methods) - set(names))
        if unknown:
            raise ValueError(f"fault_methods names unknown methods {unknown}.")
        for name in self.fault_methods:
            source = self.method(name).source
            if source is not None and source not in self.fault_methods:
                raise ValueError(f"fault_methods has control {name!r} without {source!r}.")
        if "none" not in self.faults:
            raise ValueError("faults must include 'none'.")
        for fault in self.faults.values():
            FaultConfig(**fault)  # Validates.

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def methods_of(self, setting: Setting) -> list[str]:
        """The names of the methods ``setting`` runs, in the suite's order."""
        return [m.name for m in self.methods if not setting.methods or m.name in setting.methods]

    def replaced(self, **changes) -> SuiteSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def roles(self) -> Roles:
        """What the report reads from this spec (:class:`Roles`)."""
        return Roles.from_spec(self.to_dict())


@dataclasses.dataclass(frozen=True)
class Run:
    """One expanded run. ``config`` holds the :class:`TrainConfig` fields except ``out_dir``;
    a control's ``optimizer``/``learning_rate`` are resolved from ``depends_on`` when it runs."""

    run_id: str
    stage: str  # "sweep", "method" or "control".
    setting: str
    method: str
    lr_multiplier: float | None
    learning_rate: float
    fault: str
    seed: int
    config: Mapping[str, Any]
    depends_on: str | None = None
    control: str | None = None
    base: str | None = None  # The run id of the setting's base pre-training, if any.


# The method every suite compares against: the AdamW of the base learning-rate sweep, whose
# best mean perplexity defines the target.
BASELINE = Method(name="adamw", optimizer="adamw")
# The registered optimizers that are the LBW guard over an inner one (their runs log the guard's
# scale and regime) and those that are the unguarded AdamW baselines (plain or clipped).
GUARD_OPTIMIZERS = ("lbw", "lbw+clip", "lbw+sgg")
BASELINE_OPTIMIZERS = ("adamw", "adamw+clip")


@dataclasses.dataclass(frozen=True)
class Roles:
    """What the report needs to know about a suite's methods, read from its spec.

    Attributes:
      order: the method names in the spec's order.
      baseline: the name of the sweep's AdamW (the target's reference).
      subject: the method the controls read (without controls: the first guarded method).
      guarded: the methods whose optimizer is a guard (:data:`GUARD_OPTIMIZERS`).
      baselines: the unguarded AdamW methods, plain or clipped (:data:`BASELINE_OPTIMIZERS`).
      controls: ``(name, kind, source)`` of each control, in order.
      ladder: what the size-ladder table compares: of the first setting's methods, the
        baselines, the methods with the subject's optimizer and the subject's effective-LR
        controls.
    """

    order: tuple[str, ...]
    baseline: str
    subject: str | None
    guarded: frozenset[str]
    baselines: tuple[str, ...]
    controls: tuple[tuple[str, str, str], ...]
    ladder: tuple[str, ...]

    @classmethod
    def of(cls, methods: Sequence[Mapping[str, Any]], first_setting: Sequence[str] = ()) -> Roles:
        """The roles of ``methods`` (dicts with ``name``, ``optimizer``, ``control``,
        ``source``, as :meth:`SuiteSpec.to_dict` writes them into ``suite.json``);
        ``first_setting``: the names the first setting runs (empty: all)."""
        order = tuple(m["name"] for m in methods)
        optimizer = {m["name"]: m.get("optimizer") for m in methods}
        controls = tuple(
            (m["name"], m["control"], m["source"]) for m in methods if m.get("control")
        )
        plain = [m["name"] for m in methods if not m.get("control")]
        guarded = [n for n in plain if optimizer[n] in GUARD_OPTIMIZERS]
        subject = controls[0][2] if controls else (guarded[0] if guarded else None)
        baselines = tuple(n for n in plain if optimizer[n] in BASELINE_OPTIMIZERS)
        firsts = set(first_setting or order)
        ladder = tuple(
            n
            for n in order
            if n in firsts
            and (
                n in baselines
                or (n in plain and subject is not None and optimizer[n] == optimizer[subject])
                or (n, "effective-lr", subject) in controls
            )
        )
        return cls(
            order=order,
            baseline=BASELINE.name,
            subject=subject,
            guarded=frozenset(guarded),
            baselines=baselines,
            controls=controls,
            ladder=ladder,
        )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Roles:
        """The roles of a spec as ``suite.json`` stores it (:meth:`SuiteSpec.to_dict`)."""
        methods = spec.get("methods") or []
        settings = spec.get("settings") or []
        first = settings[0].get("methods") or () if settings else ()
        return cls.of(methods, first)
