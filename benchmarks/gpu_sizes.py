"""The GPU evidence's sizes and budgets: what differs between the GPU run and the smoke mode
(:mod:`benchmarks.gpu_evidence`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from lbw.train.stress import gpu_plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    """What differs between the GPU run and the smoke mode.

    Attributes:
      scale, depth_scale: the two suites (:mod:`train.stress.gpu_plan`).
      total_budget_s: the whole command, from the start of :func:`main`.
      suite_budget_s: the main suite, its probe included.
      guard_reserve_s: what the suites leave for the cost stage whatever they plan.
      depth_min_s: the depth stage starts (with its probe) only when this much is left for it.
      guard_rounds, guard_steps: interleaved rounds, and donated steps per method per round.
      unrolled_compile_s: a guess of one unrolled step's compilation (the probe's is scanned),
        to decide whether the unrolled part of the cost stage fits.
      hlo_bytes_of: the scanned steps whose HLO bytes (one compilation each) are counted, in
        order: AdamW's and the default's before the unrolled part, the others after it.
    """

    scale: gpu_plan.Scale
    depth_scale: gpu_plan.Scale
    total_budget_s: float
    suite_budget_s: float
    guard_reserve_s: float
    depth_min_s: float
    guard_rounds: int
    guard_steps: int
    unrolled_compile_s: float
    hlo_bytes_of: tuple[str, ...]
    sgg_repeats: int
    model_presets: tuple[tuple[str, str], ...]  # (label, preset name).
    model_overrides: dict[str, Any]
    model_batch: int
    model_seq: int
    model_rounds: int
    model_steps: int


GPU_SIZES = Sizes(
    scale=gpu_plan.GPU,
    depth_scale=gpu_plan.DEPTH,
    total_budget_s=465.0,
    suite_budget_s=360.0,
    guard_reserve_s=75.0,
    depth_min_s=40.0,
    guard_rounds=6,
    guard_steps=5,
    unrolled_compile_s=45.0,  # 39.7 s measured for the unrolled governor on an H200.
    hlo_bytes_of=("adamw", "lbw_adamw", "adamw+clip(1.0)", "lbw(reference)", "sgg"),
    sgg_repeats=10,
    model_presets=(("0.5B", "qwen2_5_0_5b"), ("1.5B", "qwen2_5_1_5b")),
    model_overrides={},
    model_batch=8,
    model_seq=512,
    model_rounds=3,
    model_steps=4,
)
SMOKE_SIZES = Sizes(
    scale=gpu_plan.SMOKE,
    depth_scale=gpu_plan.DEPTH_SMOKE,
    total_budget_s=165.0,
    suite_budget_s=90.0,
    guard_reserve_s=45.0,
    depth_min_s=8.0,
    guard_rounds=2,
    guard_steps=2,
    unrolled_compile_s=3.0,
    hlo_bytes_of=("adamw", "lbw_adamw"),  # Each is a compilation: the CPU does the two first only.
    sgg_repeats=2,
    model_presets=(("0.5B stand-in", "tiny_qwen2_5_3b"), ("1.5B stand-in", "tiny_qwen2_5_7b")),
    model_overrides={"num_layers": 1},
    model_batch=2,
    model_seq=32,
    model_rounds=2,
    model_steps=2,
)
