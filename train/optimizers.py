"""Optimizers by name: an open registry of ``factory(config, learning_rate) -> optax transform``.

Built-in names:

* ``adamw``: ``optax.adamw``.
* ``adamw+clip``: global-norm clipping at ``clip_threshold``, then AdamW.
* ``lbw``: ``lbw_optax.guard(inner, policy=policy)`` with ``policy`` ``"governor"`` or
  ``"reference"``; ``inner`` is the optimizer named by ``config.inner`` (:data:`INNER`:
  AdamW by default, ``lbw_optax.lbw_adamw``).
* ``lbw+clip``: ``lbw_optax.guard(adamw, clip_threshold=clip_threshold)``, ``lbw_adamw``'s layout.
* ``sgg``: ``lbw_optax.sgg_adamw``.
* ``lbw+sgg``: ``lbw_optax.guard(lbw_optax.sgg_adamw(...), policy=policy)``.

``config.optimizer_args`` reaches the library factories of ``sgg``, of ``lbw+sgg``'s SGG and of
the peers (:mod:`train.peers`) as keyword arguments; for ``lbw`` and ``lbw+clip``, those of the
policy (``lbw_optax.governor_policy`` or ``reference_policy``), e.g. ``{"max_boost": 3.0}``.

Add a peer with the decorator::

    @register_optimizer("my_opt")
    def my_opt(config, learning_rate):
        return optax.chain(..., optax.adamw(learning_rate, weight_decay=config.weight_decay))

The factory receives the run's :class:`~train.config.OptimizerConfig` (its optimizer fields,
and ``stacked``, the model's layout) and the learning-rate schedule (a callable of the update
count, warm-up, decay and any learning-rate shock included). Whatever it returns is wrapped with
``lbw_optax.donatable``, so the loop can always pass the loss as ``value=`` and donate the state.
A run builds its optimizer with :meth:`OptimizerConfig.build <train.config.OptimizerConfig.build>`
(:func:`build` here).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import lbw_optax
from lbw import models
from lbw.train.config import FaultConfig, Optimizer, OptimizerConfig, TrainConfig

Factory = Callable[[OptimizerConfig, optax.Schedule], optax.GradientTransformation]
_REGISTRY: dict[str, Factory] = {}

# Optimizers whose state holds a guard: without one, a non-finite loss stops the run.
_GUARDED: set[str] = set()
# ``eval_params(opt_state, params) -> params`` of optimizers evaluated elsewhere than at the
# parameters they train (schedule-free methods).
EvalParams = Callable[[Any, Any], Any]
_EVAL_PARAMS: dict[str, EvalParams] = {}
_APPLIED_SCHEDULES: dict[str, Callable[[optax.Schedule], optax.Schedule]] = {}


def register_optimizer(
    name: str,
    *,
    guarded: bool = False,
    eval_params: EvalParams | None = None,
    applied_schedule: Callable[[optax.Schedule], optax.Schedule] | None = None,
) -> Callable[[Factory], Factory]:
    """Registers ``factory`` under ``name`` (a decorator).

    Args:
      name: the name users pass as ``--optimizer``.
      guarded: whether the optimizer holds non-finite steps itself (as ``lbw_optax.guard``
        does); the loop then keeps training through a NaN/Inf loss instead of stopping.
      eval_params: for an optimizer whose evaluation point is not the trained parameters
        (e.g. ``optax.contrib.schedule_free_eval_params``), ``(opt_state, params) -> params``
        on plain arrays; the loop evaluates there.
      applied_schedule: for an optimizer that multiplies the run's schedule by its own factor
        (the replay control), ``schedule -> the schedule it applies``; the loop logs that one.

    Raises:
      ValueError: if ``name`` is already registered.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"An optimizer named {name!r} is already registered.")
        _REGISTRY[name] = factory
        if guarded:
            _GUARDED.add(name)
        if eval_params is not None:
            _EVAL_PARAMS[name] = eval_params
        if applied_schedule is not None:
            _APPLIED_SCHEDULES[name] = applied_schedule
        return factory

    return decorator


def applied_schedule(name: str, schedule: optax.Schedule) -> optax.Schedule:
    """The learning-rate schedule optimizer ``name`` applies, given the run's ``schedule``."""
    hook = _APPLIED_SCHEDULES.get(name)
    return schedule if hook is None else hook(schedule)


def eval_params(name: str) -> EvalParams | None:
    """The registered evaluation point of optimizer ``name``, or ``None`` (its parameters)."""
    return _EVAL_PARAMS.get(name)


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def is_guarded(name: str) -> bool:
    """Whether the optimizer ``name`` was registered as holding non-finite steps."""
    return name in _GUARDED


def check_optimizer(name: str) -> None:
    """Raises ``ValueError`` listing the known names if ``name`` is not registered."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; known: {', '.join(available_optimizers())}.")


def build_optimizer(
    config: OptimizerConfig | TrainConfig, learning_rate: optax.Schedule
) -> optax.GradientTransformationExtraArgs:
    """The transformation registered as ``config.optimizer``, accepting ``value=``, with the
    learning rate ``learning_rate`` (a schedule or a number); a :class:`TrainConfig` stands for
    its ``optim``. The factory alone: :meth:`OptimizerConfig.build` adds what a run needs.

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    if isinstance(config, TrainConfig):
        config = config.optim
    check_optimizer(config.optimizer)
    # donatable: a peer whose state holds the parameters (prodigy, mechanic) would refuse the
    # loop's donated step.
    return lbw_optax.donatable(_REGISTRY[config.optimizer](config, learning_rate))


def _adamw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, **config.adamw_args)


def _sgg_adamw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    sgg_adamw = getattr(lbw_optax, "sgg_adamw", None)
    if sgg_adamw is None:
        raise ValueError(
            f"optimizer {config.optimizer!r} needs lbw_optax.sgg_adamw, which this version of "
            f"lbw_optax ({lbw_optax.__version__}) does not provide."
        )
    return sgg_adamw(learning_rate, **config.adamw_args, **config.optimizer_args)


def _lion(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    # Lion's own betas (0.9, 0.99); its learning rate is typically 3-10x below AdamW's.
    return optax.lion(learning_rate, weight_decay=config.weight_decay)


def _muon(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    # Muon on the 2-D tensors, AdamW (config's betas) on the rest, one learning rate.
    return optax.contrib.muon(
        learning_rate,
        weight_decay=config.weight_decay,
        adam_b1=config.b1,
        adam_b2=config.b2,
        adam_weight_decay=config.weight_decay,
    )


def _adafactor(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    return optax.adafactor(learning_rate, weight_decay_rate=config.weight_decay or None)


def _sgd(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=config.b1)


# The optimizers ``lbw`` can govern (``--inner``): name -> factory(config, learning_rate).
INNER: dict[str, Factory] = {
    "adamw": _adamw,
    "lion": _lion,
    "muon": _muon,
    "adafactor": _adafactor,
    "sgd": _sgd,
}


@register_optimizer("adamw")
def adamw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """AdamW."""
    return _adamw(config, learning_rate)


@register_optimizer("lion")
def lion(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Lion (``optax.lion``), ungoverned: the baseline of ``lbw --inner lion``."""
    return _lion(config, learning_rate)


@register_optimizer("muon")
def muon(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Muon (``optax.contrib.muon``), ungoverned: the baseline of ``lbw --inner muon``."""
    return _muon(config, learning_rate)


@register_optimizer("adamw+clip")
def adamw_clip(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Global-norm clipping at ``config.clip_threshold``, then AdamW."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_threshold), _adamw(config, learning_rate)
    )


# The guarded optimizers that take the peak learning rate inside the guard (peak_lr_in_state):
# the guard's per-tensor limiter is not linear in the learning rate, so it must see the update
# with its real peak.
PEAK_INSIDE = frozenset({"lbw", "lbw+clip", "lbw+sgg"})


POLICIES = {"governor": lbw_optax.governor_policy, "reference": lbw_optax.reference_policy}


def _policy(config: OptimizerConfig, knobs: dict[str, Any], clipped: bool = False):
    """``config.policy`` by name, or built with ``knobs`` as its factory's keyword arguments
    on top of the defaults the guard gives it by name (``clipped``: over clipped gradients)."""
    if not knobs:
        return config.policy
    factory = POLICIES[config.policy]
    unknown = sorted(set(knobs) - set(inspect.signature(factory).parameters))
    if unknown:
        raise ValueError(
            f"optimizer_args {unknown} are not arguments of {factory.__name__} "
            f"(policy {config.policy!r} of {config.optimizer!r})."
        )
    named = lbw_optax.resolve_policy(config.policy, clipped=clipped)
    return dataclasses.replace(named, **knobs)


def _governed(
    config: OptimizerConfig,
    inner: optax.GradientTransformation,
    knobs=None,
    clip_threshold: float | None = None,
):
    """``lbw_optax.guard(inner, policy=..., clip_threshold=...)``: ``config.policy``, with
    ``knobs`` (the policy's keyword arguments) if any; with ``peak_lr_in_state``, the peak
    (held in the state) scales ``inner``'s update inside the guard."""
    if config.peak_lr_in_state:
        inner = optax.chain(inner, scale_by_peak_learning_rate())
    stacked = models.stacked_layers if config.stacked else None  # Each layer limited on its own.
    policy = _policy(config, knobs or {}, clipped=clip_threshold is not None)
    return lbw_optax.guard(inner, policy=policy, stacked=stacked, clip_threshold=clip_threshold)


@register_optimizer("lbw", guarded=True)
def lbw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """``config.inner`` (AdamW by default) governed by the LBW guard with ``config.policy``."""
    if config.inner not in INNER:
        raise ValueError(f"Unknown inner optimizer {config.inner!r}; known: {', '.join(INNER)}.")
    return _governed(config, INNER[config.inner](config, learning_rate), config.optimizer_args)


@register_optimizer("lbw+clip", guarded=True)
def lbw_clip(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Global-norm clipping at ``config.clip_threshold`` then AdamW, governed by the guard
    (``lbw_optax.lbw_adamw``'s layout: the guard senses the unclipped gradients)."""
    inner = _adamw(config, learning_rate)
    return _governed(config, inner, config.optimizer_args, config.clip_threshold)


@register_optimizer("sgg")
def sgg(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """SGG-AdamW (``lbw_optax.sgg_adamw``)."""
    return _sgg_adamw(config, learning_rate)


@register_optimizer("lbw+sgg", guarded=True)
def lbw_sgg(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """SGG-AdamW governed by the LBW guard with ``config.policy``."""
    return _governed(config, _sgg_adamw(config, learning_rate))


def learning_rate_schedule(
    config: OptimizerConfig | TrainConfig,
    steps: int | None = None,
    faults: FaultConfig | None = None,
) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then cosine decay or constant.

    The cosine decays to ``min_lr_ratio × learning_rate`` at ``steps``. A learning-rate shock in
    ``faults`` multiplies the result on its steps (see :func:`train.faults.shock_schedule`). A
    :class:`TrainConfig` gives its ``optim``, ``steps`` and ``faults``.
    """
    from lbw.train.faults import shock_schedule

    if isinstance(config, TrainConfig):
        config, steps, faults = config.optim, config.steps, config.faults
    if steps is None:
        raise ValueError("learning_rate_schedule needs the run's steps.")
    peak = config.learning_rate
    warmup = min(config.warmup_steps, steps)
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else peak,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=steps,
            end_value=config.min_lr_ratio * peak,
        )
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    return shock_schedule(schedule, faults or FaultConfig())


@functools.lru_cache(maxsize=16)
def build(config: OptimizerConfig, steps: int, faults: FaultConfig, grad_accum: int) -> Optimizer:
    """:meth:`OptimizerConfig.build`: the schedule and the run's transformation, cached so that
    runs in one process with equal arguments share them (and so their compiled step)."""
    schedule = learning_rate_schedule(config, steps, faults)
    tx = build_optimizer(config, schedule)
    # With peak_lr_in_state the learning rate here is 1: the peak is set in the state (inside
    # the guard, for a guard).
    if config.peak_lr_in_state and config.optimizer not in PEAK_INSIDE:
        tx = optax.with_extra_args_support(optax.chain(tx, scale_by_peak_learning_rate()))
    if grad_accum > 1:
        tx = lbw_optax.accumulate_gradients(tx, grad_accum)
    return Optimizer(schedule, tx)


class PeakLearningRateState(NamedTuple):
    """State of :func:`scale_by_peak_learning_rate`."""

    peak_learning_rate: jax.Array  # [] float32


def scale_by_peak_learning_rate() -> optax.GradientTransformation:
    """Multiplies the updates by a peak learning rate held in the state.

    ``chain(inner built with a peak-1 schedule, scale_by_peak_learning_rate())`` computes
    ``peak × inner_update``: the inner update with the peak learning rate whenever that update is
    linear in its learning rate (AdamW, clipping, the guard, SGG, the peers). The peak is data,
    not a constant of the compiled step, so runs that differ only in it share one compilation.
    ``init`` sets it to 1; :func:`set_peak_learning_rate` sets the run's value.

    Returns:
      An ``optax.GradientTransformation``.
    """

    def init_fn(params):
        del params
        return PeakLearningRateState(peak_learning_rate=jnp.ones([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        peak = state.peak_learning_rate
        updates = jax.tree.map(lambda u: (peak * u).astype(u.dtype), updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def set_peak_learning_rate(opt_state: Any, value: float) -> None:
    """Sets the peak of the :func:`scale_by_peak_learning_rate` state inside ``opt_state`` (an
    ``nnx.Optimizer``'s ``opt_state``, whose leaves are variables), in place.

    Raises:
      ValueError: if ``opt_state`` holds no such state, or more than one.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PeakLearningRateState))
        if isinstance(s, PeakLearningRateState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected one scale_by_peak_learning_rate state in the optimizer, found {len(found)}."
        )
    found[0].peak_learning_rate[...] = jnp.asarray(value, jnp.float32)


# The peers register themselves when imported (train.peers imports this module's registry).
from lbw.train import peers  # noqa: E402, F401
