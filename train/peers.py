"""The stability peers and the stress suite's controls, registered as training-loop optimizers.

Importing this module registers:

* ``zclip``: :func:`lbw_optax.zclip_adamw` (z-score clipping of the global gradient norm).
* ``skip-step``: :func:`lbw_optax.skip_step_adamw`; registered as guarded, because it holds
  non-finite steps itself (zero update, moments kept), so the loop trains through them.
* ``adagc``: :func:`lbw_optax.adagc_adamw` (per-tensor adaptive clipping).
* ``spam``: :func:`lbw_optax.spam_adamw` (spike-aware clipping with periodic moment resets).

and provides :func:`register_replay`, the open-loop replay control: AdamW whose learning rate is
the run's schedule times a recorded per-step scale trace, with no feedback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax

import lbw_optax
from train.config import TrainConfig
from train.optimizers import _REGISTRY, register_optimizer

REPLAY_PREFIX = "replay-"


def _adamw_args(config: TrainConfig) -> dict:
    return dict(b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)


@register_optimizer("zclip")
def zclip(config: TrainConfig, learning_rate) -> optax.GradientTransformation:
    """ZClip, then AdamW (``lbw_optax.zclip_adamw`` with its defaults)."""
    return lbw_optax.zclip_adamw(learning_rate, **_adamw_args(config))


@register_optimizer("skip-step", guarded=True)
def skip_step(config: TrainConfig, learning_rate) -> optax.GradientTransformation:
    """AdamW that skips loss or gradient-norm spikes (> mean + 6σ over 128 steps) and NaN/Inf."""
    return lbw_optax.skip_step_adamw(learning_rate, **_adamw_args(config))


@register_optimizer("adagc")
def adagc(config: TrainConfig, learning_rate) -> optax.GradientTransformation:
    """AdaGC per-tensor adaptive clipping, then AdamW."""
    return lbw_optax.adagc_adamw(learning_rate, **_adamw_args(config))


@register_optimizer("spam")
def spam(config: TrainConfig, learning_rate) -> optax.GradientTransformation:
    """SPAM: AdamW with spike-aware clipping and momentum resets."""
    return lbw_optax.spam_adamw(learning_rate, **_adamw_args(config))


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
    without any field in :class:`~train.config.TrainConfig`.

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

        def factory(config: TrainConfig, learning_rate) -> optax.GradientTransformation:
            return optax.adamw(replay_schedule(learning_rate, frozen), **_adamw_args(config))

        factory.__doc__ = f"AdamW on the learning-rate schedule × a {len(frozen)}-step trace."
        register_optimizer(name)(factory)
    return name
