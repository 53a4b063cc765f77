"""The stability peers and the stress suite's controls, registered as training-loop optimizers.

Importing this module registers:

* ``zclip``: :func:`lbw_optax.peers.zclip`, then AdamW (z-score clipping of the global
  gradient norm).
* ``skip-step``: :func:`lbw_optax.peers.skip_step` over global-norm clipping at
  ``max_grad_norm`` (1.0) and AdamW; registered as guarded, because it holds
  non-finite steps itself (zero update, moments kept), so the loop trains through them.
* ``adagc``: :func:`lbw_optax.peers.adagc`, then AdamW (per-tensor adaptive clipping).
* ``spam``: :func:`lbw_optax.peers.spam_adamw` (spike-aware clipping with periodic moment
  resets).
* ``stable-adamw``: :func:`lbw_optax.peers.stable_adamw` (AdamW with per-tensor update
  clipping).
* ``prodigy``, ``dadapt-adamw``: ``optax.contrib.prodigy`` / ``dadapt_adamw``; the learning
  rate is their multiplier of the estimated step size (1.0 is the authors' setting).
* ``mechanic``: ``optax.contrib.mechanize`` over AdamW.
* ``schedule-free-adamw``: ``optax.contrib.schedule_free_adamw``, evaluated at its averaged
  parameters.
* ``reduce-on-plateau``: AdamW, then ``optax.contrib.reduce_on_plateau`` on the loss.
* ``apply-if-finite``: ``optax.apply_if_finite`` over AdamW (guarded: it holds NaN/Inf steps).

Every peer takes ``config.optimizer_args`` as keyword arguments of its factory (the suites
scale the peers' time constants to their runs that way).

and provides :func:`register_replay`, the open-loop replay control: AdamW whose learning rate is
the run's schedule times a recorded per-step scale trace, with no feedback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import lbw_optax
from lbw.train.config import OptimizerConfig
from lbw.train.optimizers import _REGISTRY, register_optimizer

REPLAY_PREFIX = "replay-"


@register_optimizer("zclip")
def zclip(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """ZClip, then AdamW (``lbw_optax.peers.zclip`` with its defaults)."""
    adamw = optax.adamw(learning_rate, **config.adamw_args)
    return optax.chain(lbw_optax.peers.zclip(**config.optimizer_args), adamw)


@register_optimizer("skip-step", guarded=True)
def skip_step(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """AdamW that skips loss or gradient-norm spikes (> mean + 6σ over 128 steps) and NaN/Inf."""
    args = dict(config.optimizer_args)
    max_grad_norm = args.pop("max_grad_norm", 1.0)  # None: no clipping.
    inner = optax.adamw(learning_rate, **config.adamw_args)
    if max_grad_norm is not None:
        inner = optax.chain(optax.clip_by_global_norm(max_grad_norm), inner)
    return lbw_optax.peers.skip_step(inner, **args)


@register_optimizer("adagc")
def adagc(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """AdaGC per-tensor adaptive clipping, then AdamW."""
    adamw = optax.adamw(learning_rate, **config.adamw_args)
    return optax.chain(lbw_optax.peers.adagc(**config.optimizer_args), adamw)


@register_optimizer("spam")
def spam(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """SPAM: AdamW with spike-aware clipping and momentum resets."""
    return lbw_optax.peers.spam_adamw(learning_rate, **config.adamw_args, **config.optimizer_args)


@register_optimizer("stable-adamw")
def stable_adamw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """StableAdamW with the paper's β2 = 0.99 and ε = 1e-6; β1 and weight decay from the config."""
    args = dict(b1=config.b1, weight_decay=config.weight_decay, **config.optimizer_args)
    return lbw_optax.peers.stable_adamw(learning_rate, **args)


def _multiplier(config: OptimizerConfig, learning_rate) -> optax.Schedule:
    """The run's schedule one update ahead, for the methods whose learning rate multiplies a
    learned step size: their first step would otherwise divide by (or be) a zero learning rate
    when the warm-up starts at 0. Peaks at ``config.learning_rate`` (1.0: the authors')."""
    if config.warmup_steps == 0:
        return learning_rate
    return lambda count: learning_rate(count + 1)


@register_optimizer("prodigy")
def prodigy(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Prodigy (Mishchenko & Defazio 2024) with the authors' settings: learning rate 1.0 as a
    multiplier (the run's ``--lr``), the run's schedule, ``safeguard_warmup=True`` under a
    warm-up, decoupled weight decay."""
    args = dict(
        betas=(config.b1, config.b2),
        weight_decay=config.weight_decay,
        safeguard_warmup=config.warmup_steps > 0,
    )
    args.update(config.optimizer_args)
    return optax.contrib.prodigy(_multiplier(config, learning_rate), **args)


@register_optimizer("dadapt-adamw")
def dadapt_adamw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """D-Adaptation AdamW (Defazio & Mishchenko 2023): learning rate 1.0 as a multiplier
    (the run's ``--lr``) on the run's schedule, decoupled weight decay."""
    args = dict(betas=(config.b1, config.b2), weight_decay=config.weight_decay)
    args.update(config.optimizer_args)
    return optax.contrib.dadapt_adamw(_multiplier(config, learning_rate), **args)


# Measured in the quick suite's setting (seed 0, 200 steps, final eval ppl; AdamW at 1e-3: 9.21
# over seeds 0/1): s_init 1e-6 with the base at LR 1.0 (the authors' usage) 26.5, and with the
# base at 1e-3: s_init 1e-2 24.6, 1e-1 12.4, 1.0 10.2. From below, the learned scale does not
# catch up within a short run.
MECHANIC_S_INIT = 1.0


@register_optimizer("mechanic")
def mechanic(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Mechanic (Cutkosky et al. 2023) over AdamW on the run's schedule and learning rate, with
    ``s_init`` 1.0: the learned scale starts at the base optimizer's own step and corrects the
    given learning rate up or down, so it runs at the suites' multipliers like AdamW. The
    authors' usage (base learning rate 1, ``s_init`` 1e-6 to 1e-8, the scale learned from
    below) never leaves the byte-unigram plateau in a 200-step run (see ``MECHANIC_S_INIT``).
    Mechanic's own weight decay 0.01 and 6 betas."""
    args = dict(s_init=MECHANIC_S_INIT)
    args.update(config.optimizer_args)
    return optax.contrib.mechanize(optax.adamw(learning_rate, **config.adamw_args), **args)


@register_optimizer("schedule-free-adamw", eval_params=lbw_optax.schedule_free_eval_params)
def schedule_free_adamw(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Schedule-free AdamW (Defazio et al. 2024): the run's peak learning rate, constant, with
    its own linear warm-up over ``warmup_steps`` (no decay: the averaging replaces it); it is
    evaluated at its averaged parameters x. A learning-rate shock fault does not reach it."""
    args = dict(
        warmup_steps=config.warmup_steps or None,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    args.update(config.optimizer_args)
    return optax.contrib.schedule_free_adamw(config.learning_rate, **args)


@register_optimizer("reduce-on-plateau")
def reduce_on_plateau(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """AdamW, then ``optax.contrib.reduce_on_plateau`` on the training loss (``value=``):
    PyTorch's ``ReduceLROnPlateau`` defaults (factor 0.1, patience 10, rtol 1e-4) over the
    mean loss of 10 steps (``accumulation_size``), the train loss standing in for its epochs."""
    args = dict(factor=0.1, patience=10, rtol=1e-4, accumulation_size=10)
    args.update(config.optimizer_args)
    return optax.chain(
        optax.adamw(learning_rate, **config.adamw_args),
        optax.contrib.reduce_on_plateau(**args),
    )


@register_optimizer("apply-if-finite", guarded=True)
def apply_if_finite(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """``optax.apply_if_finite`` over AdamW: a step with NaN/Inf updates is skipped (inner
    state kept) up to 5 consecutive times, after which it is applied."""
    args = dict(max_consecutive_errors=5)
    args.update(config.optimizer_args)
    return optax.apply_if_finite(optax.adamw(learning_rate, **config.adamw_args), **args)


def replay_schedule(schedule: optax.Schedule, trace: Sequence[float]) -> optax.Schedule:
    """``schedule(count) × trace[count]``; the last value of ``trace`` is kept past its end.

    ``trace[k]`` is the scale applied at step ``k + 1`` (an optax schedule receives the number
    of updates already applied).
    """
    values = jnp.asarray(np.asarray(trace, np.float32))
    last = values.shape[0] - 1

    def replayed(count):
        return schedule(count) * values[jnp.minimum(count, last)]

    return replayed


def register_replay(trace: Sequence[float]) -> str:
    """Registers AdamW on ``schedule × trace`` and returns its optimizer name.

    The name is ``replay-`` followed by a digest of the trace, so the same trace always gets
    the same name (registering it again is a no-op) and runs with different traces never share
    a compiled step. The factory is an ordinary registry entry: the trace reaches the optimizer
    without any field in :class:`~train.config.OptimizerConfig`.

    Args:
      trace: the per-step applied scale of the run to replay (0 on a held step).

    Raises:
      ValueError: for an empty trace or one with a non-finite or negative value.
    """
    values = np.asarray(trace, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"trace must be a non-empty 1-D sequence, got shape {values.shape}.")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("trace must hold finite values >= 0.")
    digest = hashlib.sha256(np.round(values, 7).astype(np.float32).tobytes()).hexdigest()[:12]
    name = f"{REPLAY_PREFIX}{digest}"
    if name not in _REGISTRY:
        frozen = tuple(float(v) for v in values)

        def factory(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
            return optax.adamw(replay_schedule(learning_rate, frozen), **config.adamw_args)

        factory.__doc__ = f"AdamW on the learning-rate schedule × a {len(frozen)}-step trace."
        applied = lambda schedule: replay_schedule(schedule, frozen)
        register_optimizer(name, applied_schedule=applied)(factory)
    return name
