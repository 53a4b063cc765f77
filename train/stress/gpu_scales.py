"""The GPU suites' definitions: their scales (model, shapes, steps, multipliers, methods) and
the :class:`~lbw.train.stress.spec.SuiteSpec` of a scale at a step count; how they are fitted
into a budget and run: :mod:`lbw.train.stress.gpu_plan`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lbw.train.config import TrainConfig
from lbw.train.stress.spec import BASELINE, Method, Setting, SuiteSpec

DEFAULT_BUDGET_S = 360.0  # Six minutes of one GPU, probe and compilation included.
CALM_LR = 1e-4  # The paper's calm learning rate; ×10 and ×30 are its stress rates.
MARGIN = 1.1  # Estimates are multiplied by this before they are compared with the budget.
RESERVE_S = 10.0  # Records, report and plots after the runs.

# The default, ``lbw_optax.lbw_adamw``'s: the governor over AdamW clipped at 1.0 (registered
# as ``lbw+clip``).
DEFAULT = Method(
    name="lbw_adamw", optimizer="lbw+clip", overrides={"policy": "governor", "clip_threshold": 1.0}
)
# The paper's unclipped governor; it runs only when its config is not the default's.
UNCLIPPED_GOVERNOR = Method(
    name="governor-unclipped", optimizer="lbw", overrides={"policy": "governor"}
)
CLIP = Method(name="adamw+clip", optimizer="adamw+clip", overrides={"clip_threshold": 1.0})
EFFECTIVE_LR = Method(
    name="effective-lr", optimizer="adamw", control="effective-lr", source=DEFAULT.name
)
# The multipliers at which the controls run (the others run every multiplier of the plan).
CONTROL_MULTIPLIERS = (10.0,)


def _resolved(method: Method) -> TrainConfig:
    return TrainConfig(optimizer=method.optimizer, **method.overrides)


def stress_methods() -> tuple[Method, ...]:
    """AdamW, clip 1.0, ``lbw``, the unclipped governor if it differs, the control at ×10."""
    methods = [BASELINE, CLIP, DEFAULT]
    if _resolved(UNCLIPPED_GOVERNOR) != _resolved(DEFAULT):
        methods.append(UNCLIPPED_GOVERNOR)
    return (*methods, EFFECTIVE_LR)


class BudgetError(ValueError):
    """A suite plan that would not fit its time budget."""


# The micro model of the smoke mode: the tiny Qwen2.5 layout cut to two narrow layers.
MICRO_MODEL = {
    "num_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale:
    """One GPU suite, or its CPU smoke stand-in.

    Attributes:
      name: the suite's name (its directory).
      model: a preset of ``models.PRESETS``.
      model_overrides: fields of the preset to replace (the compute dtype among them).
      scan_layers: the stacked layout (compilation independent of depth).
      seq_len, batch_size: the shape of a training batch.
      eval_batches: batches of the fixed evaluation set.
      evals: evaluations per run (the last one at the final step).
      log_every: steps per telemetry line.
      probe_steps: steps of the probe run (two evaluations and two log lines within them).
      steps: the steps a run gets when the plan fits.
      floor_steps: the fewest steps a run may be cut to once ``droppable`` is dropped.
      lr_multipliers: the multipliers of :data:`CALM_LR`, in the order they run.
      droppable: multipliers the plan gives up, in order, before it cuts steps.
      methods: the methods, controls last.
      device: the kind of machine, for the report.
      what: one sentence for the suite's description.
    """

    name: str
    model: str
    model_overrides: Mapping[str, Any]
    scan_layers: bool = True
    seq_len: int
    batch_size: int
    eval_batches: int
    evals: int
    log_every: int
    probe_steps: int
    steps: int
    floor_steps: int
    lr_multipliers: tuple[float, ...]
    droppable: tuple[float, ...]
    methods: tuple[Method, ...]
    device: str
    what: str


GPU = Scale(
    name="gpu",
    model="qwen2_5_0_5b",
    model_overrides={"dtype": "bfloat16"},
    seq_len=512,
    batch_size=8,
    eval_batches=4,
    evals=5,
    log_every=10,
    probe_steps=10,
    steps=300,
    floor_steps=200,
    lr_multipliers=(10.0, 1.0, 30.0),
    droppable=(30.0,),
    methods=stress_methods(),
    device="GPU",
    what="the paper's learning-rate question at the largest scale one GPU answers in minutes",
)
DEPTH = Scale(
    name="gpu-depth",
    model="small_125m",
    model_overrides={"dtype": "bfloat16"},
    seq_len=512,
    batch_size=4,
    eval_batches=4,
    evals=5,
    log_every=20,
    probe_steps=10,
    steps=1000,
    floor_steps=1000,
    lr_multipliers=(10.0, 1.0),
    droppable=(1.0,),
    methods=(BASELINE, DEFAULT),
    device="GPU",
    what="depth: a GPT-2-small-scale model trained 1,000 steps (the training text about twice)",
)
# The smoke scales train the same micro model with the same shapes and steps (the probe's
# too), so that they share compiled steps: the CPU compiles as few programs as it can.
SMOKE = dataclasses.replace(
    GPU,
    name="gpu-smoke",
    model="tiny_qwen2_5_3b",
    model_overrides={**MICRO_MODEL, "dtype": "bfloat16"},
    seq_len=32,
    batch_size=2,
    eval_batches=1,
    evals=4,
    log_every=2,
    probe_steps=8,
    steps=8,
    floor_steps=4,
    device="CPU (smoke mode of the GPU suite)",
)
DEPTH_SMOKE = dataclasses.replace(
    SMOKE,
    name="gpu-depth-smoke",
    steps=8,
    floor_steps=8,
    lr_multipliers=DEPTH.lr_multipliers,
    droppable=DEPTH.droppable,
    methods=DEPTH.methods,
    device="CPU (smoke mode of the GPU depth suite)",
    what=DEPTH.what,
)
SCALES = {s.name: s for s in (GPU, DEPTH, SMOKE, DEPTH_SMOKE)}


def train_fields(scale: Scale, steps: int) -> dict[str, Any]:
    """The :class:`TrainConfig` fields shared by every run of ``steps`` steps."""
    return dict(
        data="wikitext2",
        seq_len=scale.seq_len,
        batch_size=scale.batch_size,
        steps=steps,
        warmup_steps=max(1, steps // 10),
        schedule="cosine",
        eval_every=max(1, math.ceil(steps / scale.evals)),
        eval_batches=scale.eval_batches,
        log_every=min(scale.log_every, steps),
        checkpoint_every=0,
        peak_lr_in_state=True,
        scan_layers=scale.scan_layers,
    )


def suite(
    scale: Scale = GPU,
    steps: int | None = None,
    multipliers: Sequence[float] | None = None,
    note: str = "",
) -> SuiteSpec:
    """The suite at ``scale`` with ``steps`` steps per run (``None``: ``scale.steps``) at
    ``multipliers`` (``None``: all of the scale's; a method's own multipliers outside them are
    left out)."""
    steps = scale.steps if steps is None else steps
    mults = tuple(scale.lr_multipliers if multipliers is None else multipliers)
    control_mults = tuple(x for x in mults if x in CONTROL_MULTIPLIERS)
    methods = [m for m in scale.methods if m.control is None or control_mults]
    plain = tuple(m.name for m in methods if m.control is None)
    # The controls run only at CONTROL_MULTIPLIERS: every other multiplier runs the rest.
    multiplier_methods = {x: plain for x in mults if x not in CONTROL_MULTIPLIERS}
    if len(plain) == len(methods):
        multiplier_methods = {}
    lrs = ", ".join(f"{CALM_LR * m:g} (×{m:g})" for m in sorted(mults))
    at_controls = ", ×".join(f"{x:g}" for x in control_mults)
    names = ", ".join(
        m.name + (f" (at ×{at_controls})" if m.control is not None else "") for m in methods
    )
    layout = "scanned layers" if scale.scan_layers else "unrolled layers"
    return SuiteSpec(
        name=scale.name,
        description=(
            f"{scale.device} suite: {scale.what}. {scale.model} ({layout}, "
            f"{dict(scale.model_overrides)}; random initialisation, float32 master weights, "
            f"full-parameter), {steps} steps of {scale.batch_size}×{scale.seq_len} byte-level "
            "tokens of the shipped WikiText-2 sample, warm-up 10 %, cosine, evaluated on "
            f"{scale.eval_batches} batches at {scale.evals} points; learning rates {lrs}; "
            f"methods: {names}; one seed." + note
        ),
        settings=(
            Setting(
                name=scale.model,
                model=scale.model,
                model_overrides=dict(scale.model_overrides),
                base_lr=CALM_LR,
                base_lr_note="the paper's calm learning rate",
            ),
        ),
        methods=tuple(methods),
        lr_multipliers=mults,
        multiplier_methods=multiplier_methods,
        seeds=(0,),
        train=train_fields(scale, steps),
        device=scale.device,
    )
