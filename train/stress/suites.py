"""The suite catalogue: ``quick`` (CPU, minutes: the product claim), ``full`` (CPU, hours),
``paper`` (a GPU), ``gpu`` and ``gpu-depth`` (one GPU within a budget,
:mod:`train.stress.gpu_plan`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lbw.train.stress import gpu_plan
from lbw.train.stress.spec import BASELINE, Method, Setting, SuiteSpec

# The shipped data, a tiny Qwen2.5-style model, a short cosine run: a ~10-minute CPU suite.
QUICK_TRAIN = dict(
    data="wikitext2",
    seq_len=64,
    batch_size=8,
    steps=200,
    warmup_steps=20,
    schedule="cosine",
    eval_every=50,
    eval_batches=4,
    log_every=5,
    checkpoint_every=0,
)

GOVERNOR = dict(policy="governor")
REFERENCE = dict(policy="reference")

# The peers' time constants as fractions of the run (the library defaults stay the papers',
# set for runs of 10k steps and more). SGG: T at 5 % of the steps, the top of the paper's
# 1-5 % (Appendix A), so 20 re-clusterings per run. SPAM: two moment resets per run (every
# third of it), the ramp and the no-clip window keeping their reference ratios to the
# interval (150 and 20 of 500). AdaGC and ZClip: warm-ups of 5 % of the run, half the
# learning-rate warm-up. Reduce-on-plateau: the loss averaged over 2.5 % of the run, so its
# patience of 10 such means is a quarter of the run.
TIME_CONSTANTS = {
    "sgg": {"recluster_every": 0.05},
    "lbw+sgg": {"recluster_every": 0.05},
    "spam": {"reset_interval": 1 / 3, "warmup_steps": 0.1, "clip_delay": 0.04 / 3},
    "adagc": {"warmup_steps": 0.05},
    "zclip": {"warmup_steps": 0.05},
    "reduce-on-plateau": {"accumulation_size": 0.025},
}


def _peer(name: str, optimizer: str | None = None, **kwargs) -> Method:
    """A method with the suite's time constants for ``optimizer`` (default: ``name``)."""
    optimizer = optimizer or name
    return Method(
        name=name, optimizer=optimizer, time_constants=TIME_CONSTANTS.get(optimizer, {}), **kwargs
    )


# The learning-rate-robust methods a user would pick instead of a governor. Prodigy and
# D-Adaptation run at their own base, 1.0 (a multiplier of the learned step), times the
# suite's multipliers; the others at the setting's base times the multipliers.
LR_FREE = (
    _peer("stable-adamw"),
    _peer("prodigy", base_lr=1.0),
    _peer("dadapt-adamw", base_lr=1.0),
    _peer("mechanic"),
    _peer("schedule-free-adamw"),
    _peer("reduce-on-plateau"),
    _peer("apply-if-finite"),
)


def _core_methods(clips: Sequence[float]) -> list[Method]:
    methods = [BASELINE]
    for c in clips:
        label = "adamw+clip" if len(clips) == 1 else f"adamw+clip{c:g}"
        methods.append(Method(name=label, optimizer="adamw+clip", overrides={"clip_threshold": c}))
    methods += [
        Method(name="reference", optimizer="lbw", overrides=REFERENCE),
        Method(name="governor", optimizer="lbw", overrides=GOVERNOR),
        Method(
            name="governor+clip",
            optimizer="lbw+clip",
            overrides={**GOVERNOR, "clip_threshold": clips[0]},
        ),
        _peer("sgg"),
        _peer("governor+sgg", "lbw+sgg", overrides=GOVERNOR),
        _peer("zclip"),
        _peer("skip-step"),
    ]
    return methods


# The product default, the governor over clipped AdamW, and its effective-LR control: AdamW at
# the learning rate × that run's mean applied scale. (``effective-lr`` reads the governor
# alone, as the committed results do.)
DEFAULT_CONTROL = Method(
    name="effective-lr(governor+clip)",
    optimizer="adamw",
    control="effective-lr",
    source="governor+clip",
)

# The opt-in boost (a trust-ratio floor) over the default, as chosen on the probes of
# results/governor-probe/v5.md: ``full`` confirms it at every multiplier before it may become
# the default.
BOOSTED_DEFAULT = Method(
    name="governor+clip+boost",
    optimizer="lbw+clip",
    overrides={
        **GOVERNOR,
        "clip_threshold": 1.0,
        "optimizer_args": {"max_boost": 3.0, "release": 0.03},
    },
)

# Learning rates below the base, ×0.1 and ×0.3, that a user might pick: run only by some
# methods (``SuiteSpec.multiplier_methods``).
LOW_MULTIPLIERS = (0.1, 0.3)

# A setting of the suite's own model without learning-rate warm-up (its own AdamW sweep): the
# clipping baselines and the product default with its control, at ×1 and ×10.
WARMUP0 = dict(train={"warmup_steps": 0}, lr_multipliers=(1.0, 10.0))


def quick() -> SuiteSpec:
    """The default suite: the product claim on CPU, within ten minutes on two quiet cores.

    The default (the governor over clipped AdamW), the baseline a practitioner switches from
    (AdamW + clip 1.0), bare AdamW and the default's effective-LR control, from too-low to
    stressed learning rates, with and without warm-up. The peers, the published rule, the
    unclipped governor, SGG and other inner optimizers run in ``full``.
    """
    quick_methods = (*_core_methods([1.0]), DEFAULT_CONTROL)
    default = ("adamw", "adamw+clip", "governor+clip", DEFAULT_CONTROL.name)
    return SuiteSpec(
        name="quick",
        description=(
            "CPU suite: the shipped WikiText-2 sample, a 2-layer cut of the tiny Qwen2.5-3B-style "
            "preset (byte-level), full-parameter training, 200 steps of 8×64 tokens, cosine "
            "schedule. `tiny_qwen2_5_3b` (20 warm-up steps): AdamW, AdamW + clip 1.0, the "
            "default (the governor over clipping) and its effective-LR control at ×0.1, ×0.3, "
            "×1, ×3 and ×10 of the sweep's base learning rate. `tiny_qwen2_5_3b+warmup0` (the "
            "same model without warm-up, its own AdamW sweep): those four at ×1 and ×10. Two "
            "seeds. The other methods run in `full`."
        ),
        settings=(
            Setting(
                name="tiny_qwen2_5_3b",
                model="tiny_qwen2_5_3b",
                model_overrides={"num_layers": 2},
                lr_grid=(3e-4, 1e-3, 3e-3),
                methods=default,
            ),
            Setting(
                name="tiny_qwen2_5_3b+warmup0",
                model="tiny_qwen2_5_3b",
                model_overrides={"num_layers": 2},
                lr_grid=(3e-4, 1e-3, 3e-3),
                methods=default,
                **WARMUP0,
            ),
        ),
        methods=tuple(m for m in quick_methods if m.name in default),
        lr_multipliers=(*LOW_MULTIPLIERS, 1.0, 3.0, 10.0),
        seeds=(0, 1),
        train=QUICK_TRAIN,
    )


# The quick suite's run, 1.5x longer, evaluated on twice the batches.
FULL_TRAIN = dict(QUICK_TRAIN, steps=300, warmup_steps=30, eval_batches=8)

# Faults of the full suite, at fixed steps of its 300-step runs.
FULL_FAULTS = {
    "none": {},
    "grad-spike": {"grad_spike_steps": (150,), "grad_spike_factor": 1e4},
    "nan-loss": {"nan_loss_steps": (150,)},
    "corrupt": {"corrupt_start": 150, "corrupt_steps": 10},
    "lr-shock": {"lr_shock_start": 150, "lr_shock_steps": 10, "lr_shock_factor": 10.0},
}

# What the size ladder, TinyLlama and LoRA settings run: the baselines, both rules, the control.
LADDER_METHODS = ("adamw", "adamw+clip1", "reference", "governor", "effective-lr")

# What the full suite runs at ×0.1 and ×0.3 of tiny_qwen2_5_3b's base: the baselines, the
# governor alone and over clipping, the latter's control and the learning-rate-free peers.
FULL_LOW_METHODS = (
    "adamw",
    "adamw+clip1",
    "adamw+clip0.5",
    "governor",
    "governor+clip",
    DEFAULT_CONTROL.name,
    BOOSTED_DEFAULT.name,
    "prodigy",
    "dadapt-adamw",
    "mechanic",
    "schedule-free-adamw",
)


def full() -> SuiteSpec:
    """CPU, hours: every method and control, the size ladder, TinyLlama, LoRA, faults, 3 seeds."""
    qwen_grid = (3e-4, 1e-3, 3e-3, 1e-2)
    ladder = dict(methods=LADDER_METHODS, lr_multipliers=(1.0, 10.0), lr_grid=qwen_grid[:3])
    settings = (
        Setting(name="tiny_qwen2_5_3b", model="tiny_qwen2_5_3b", lr_grid=qwen_grid),
        Setting(
            name="tiny_qwen2_5_3b+lora8",
            model="tiny_qwen2_5_3b",
            lora_rank=8,
            pretrain={"learning_rate": 1e-3},
            methods=LADDER_METHODS,
            lr_multipliers=(1.0, 10.0),
            lr_grid=(1e-3, 3e-3, 1e-2),
        ),
        Setting(
            name="tiny_qwen2_5_3b+2000-steps",
            model="tiny_qwen2_5_3b",
            base_lr=3e-3,
            base_lr_note="the tiny_qwen2_5_3b sweep's choice at 300 steps",
            methods=("adamw", "adamw+clip1", "governor", "effective-lr"),
            lr_multipliers=(1.0, 10.0),
            train={"steps": 2000, "warmup_steps": 200, "eval_every": 250},
            seeds=(0, 1),
        ),
        Setting(
            name="tiny_qwen2_5_3b+warmup0",
            model="tiny_qwen2_5_3b",
            lr_grid=qwen_grid,
            methods=("adamw", "adamw+clip1", "governor+clip", DEFAULT_CONTROL.name),
            **WARMUP0,
        ),
        Setting(
            name="tiny_tinyllama_1_1b",
            model="tiny_tinyllama_1_1b",
            lr_grid=qwen_grid[:3],
            methods=(*LADDER_METHODS, "governor+clip"),
            lr_multipliers=(LOW_MULTIPLIERS[1], 1.0, 3.0, 10.0, 30.0),
        ),
        Setting(name="tiny_qwen2_5_7b", model="tiny_qwen2_5_7b", **ladder),
        Setting(name="tiny_qwen2_5_14b", model="tiny_qwen2_5_14b", **ladder),
    )
    methods = (
        *_core_methods([1.0, 0.5]),
        _peer("adagc"),
        _peer("spam"),
        *LR_FREE,
        Method(name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"),
        Method(
            name="effective-lr(reference)",
            optimizer="adamw",
            control="effective-lr",
            source="reference",
        ),
        DEFAULT_CONTROL,
        Method(name="replay", optimizer="adamw", control="replay", source="governor"),
        BOOSTED_DEFAULT,
    )
    return SuiteSpec(
        name="full",
        description=(
            "CPU suite (about 4.5 hours on two cores, so run in parts): 300 steps of 8×64 "
            "byte-level tokens of the shipped WikiText-2 sample, cosine schedule, 30 warm-up "
            "steps unless stated. The tiny Qwen2.5-3B-style preset (4 layers, full parameters) "
            "runs every method and control at ×1/×3/×10/×30 of its AdamW-swept base learning "
            "rate, clipping at 1.0 and 0.5, and each fault type (at ×1, the baselines, both rules, "
            "the governor over clipping and the peers), and the learning-rate-robust methods "
            "(StableAdamW, Prodigy and "
            "D-Adaptation at ×1-×30 of their own base 1.0, Mechanic, schedule-free AdamW, "
            "reduce-on-plateau, apply-if-finite); at ×0.1 and ×0.3 it runs AdamW, both clippings, "
            "the governor, the governor over clipping and its effective-LR control, Prodigy, "
            "D-Adaptation, Mechanic and schedule-free AdamW. `tiny_qwen2_5_3b+warmup0` (the same "
            "preset with no warm-up, its own AdamW sweep) runs AdamW, clipping at 1.0, the "
            "governor over clipping and its effective-LR control at ×1 and ×10. LoRA (rank 8, "
            "on a base pre-trained by AdamW for 300 steps), the TinyLlama-style preset (full "
            "parameters) and the size ladder (tiny Qwen2.5 7B/14B-style presets) run AdamW, "
            "clipping at 1.0, both rules and the effective-LR control at ×1 and ×10 (30 warm-up "
            "steps); the TinyLlama-style preset also runs the governor over clipping, and ×0.3 "
            "(AdamW, clipping, the governor alone and over clipping), ×3 and ×30. "
            "`tiny_qwen2_5_3b+2000-steps` (200 warm-up steps): AdamW, clipping at 1.0, "
            "the governor and its effective-LR control at ×1 and ×10, two seeds. The opt-in "
            "boost over the default (`governor+clip+boost`: max_boost 3, release 0.03) runs at "
            "every multiplier of `tiny_qwen2_5_3b`. Three seeds elsewhere."
        ),
        settings=settings,
        methods=methods,
        lr_multipliers=(*LOW_MULTIPLIERS, 1.0, 3.0, 10.0, 30.0),
        multiplier_methods=dict.fromkeys(LOW_MULTIPLIERS, FULL_LOW_METHODS),
        faults=FULL_FAULTS,
        fault_settings=("tiny_qwen2_5_3b",),
        fault_multipliers=(1.0,),
        fault_methods=(
            "adamw",
            "adamw+clip1",
            "reference",
            "governor",
            "governor+clip",
            "zclip",
            "skip-step",
            "adagc",
            "spam",
            "stable-adamw",
            "apply-if-finite",
        ),
        seeds=(0, 1, 2),
        train=FULL_TRAIN,
    )


def _wikitext103_cached() -> bool:
    """Whether ``datasets`` can load WikiText-103 here (reachable Hub or a local cache)."""
    try:
        import datasets

        datasets.load_dataset_builder("Salesforce/wikitext", "wikitext-103-raw-v1")
    except Exception:  # Offline, missing package: any error means "not available".
        return False
    return True


def paper() -> SuiteSpec:
    """For a GPU: the paper's learning rates on the largest presets that fit one device."""
    data = "wikitext103" if _wikitext103_cached() else "wikitext2"
    train = dict(
        data=data,
        seq_len=512,
        batch_size=8,
        steps=1000,
        warmup_steps=50,
        schedule="cosine",
        eval_every=100,
        eval_batches=32,
        log_every=10,
        checkpoint_every=0,
    )
    return SuiteSpec(
        name="paper",
        description=(
            f"GPU suite: data {data}; Qwen2.5-0.5B-style and TinyLlama-1.1B-style decoders "
            "(random initialisation, full-parameter), 1000 steps of 8×512 tokens; the paper's "
            "learning rates 1e-4 (calm) and the stress rates 1e-3 and 3e-3; three seeds."
        ),
        settings=(
            Setting(
                name="qwen2_5_0_5b",
                model="qwen2_5_0_5b",
                base_lr=1e-4,
                base_lr_note="the paper's calm learning rate",
            ),
            Setting(
                name="tinyllama_1_1b",
                model="tinyllama_1_1b",
                base_lr=1e-4,
                base_lr_note="the paper's calm learning rate",
            ),
        ),
        methods=(
            *_core_methods([1.0]),
            Method(
                name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"
            ),
            Method(name="replay", optimizer="adamw", control="replay", source="governor"),
        ),
        lr_multipliers=(1.0, 10.0, 30.0),
        seeds=(0, 1, 2),
        train=train,
        device="GPU",
    )


def gpu() -> SuiteSpec:
    """For one GPU, within a budget (:mod:`train.stress.gpu_plan`: a plan may give up ×30, then
    steps)."""
    return gpu_plan.suite(gpu_plan.GPU)


def gpu_depth() -> SuiteSpec:
    """For one GPU, within a budget: ``small_125m`` for 1,000 steps (a plan may give up ×1)."""
    return gpu_plan.suite(gpu_plan.DEPTH)


SUITES: dict[str, Callable[[], SuiteSpec]] = {
    "quick": quick,
    "full": full,
    "paper": paper,
    "gpu": gpu,
    "gpu-depth": gpu_depth,
}
