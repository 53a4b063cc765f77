"""SPAM: spike-aware Adam with momentum reset (Huang et al., 2025)."""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _adamw, _common
from lbw_optax._validate import (
    check_in_range,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)

# The reference code's warm-up ramps the step size from 1 - 0.99 = 0.01 back to 1.
_WARMUP_START = 0.99


class SpamRecord(NamedTuple):
    """The record of :func:`scale_by_spam` (what :func:`lbw_optax.telemetry` reports).

    Attributes:
      spam_count: int32, updates seen (1 after the first update); the bias-correction step,
        never reset.
      spam_since_reset: int32, updates since the latest momentum reset (0 at the reset step;
        ``warmup_steps`` before the first reset, when no warm-up is due).
      spam_resets: int32, momentum resets so far.
      spam_warmup_scale: float32, the factor on the Adam step at the latest update (1 outside
        the warm-up that follows a reset).
      spam_clipped: int32, elements clipped as spikes at the latest update.
      spam_clipped_total: int32, elements clipped so far (saturates at the int32 maximum).
    """

    spam_count: jax.Array
    spam_since_reset: jax.Array
    spam_resets: jax.Array
    spam_warmup_scale: jax.Array
    spam_clipped: jax.Array
    spam_clipped_total: jax.Array
    # What lbw_optax.telemetry reports.
    telemetry_fields = (
        "spam_count",
        "spam_since_reset",
        "spam_resets",
        "spam_warmup_scale",
        "spam_clipped",
        "spam_clipped_total",
    )


class ScaleBySpamState(NamedTuple):
    """State of :func:`scale_by_spam`.

    Attributes:
      record: the scalar :class:`SpamRecord` (kept apart so telemetry skips the moments).
      mu: first moment, like the params.
      nu: second moment, like the params.
    """

    record: SpamRecord
    mu: Any
    nu: Any


def warmup_scale(since_reset: jax.Array, warmup_steps: int) -> jax.Array:
    """The reference code's cosine warm-up after a reset, ``1 - 0.99·(1 + cos(πk/(N+1)))/2``."""
    k = since_reset.astype(jnp.float32)
    ramp = 1.0 - _WARMUP_START * 0.5 * (1.0 + jnp.cos(math.pi * k / (warmup_steps + 1.0)))
    return jnp.where(since_reset < warmup_steps, ramp, 1.0).astype(jnp.float32)


def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    theta: float = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    clip_delay: int = 20,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam with spike-aware clipping and periodic momentum resets.

    At step :math:`t` (1-based), first, if :math:`t \bmod \Delta T = 0` the moments are reset
    to zero. Then, on steps with :math:`t \bmod \Delta T \ge N_c` (``clip_delay``: none of the
    first :math:`N_c - 1` steps of training nor the reset step and the :math:`N_c - 1` after
    it, while the moments refill), each element whose squared gradient is a spike relative to
    the second moment *before* this step is clipped (only where :math:`v > 0`, so an element
    with no history is never clipped to zero):

    .. math::
      g \leftarrow \operatorname{sign}(g)\sqrt{\theta v} \quad\text{where}\quad g^2 > \theta v .

    Adam follows with the bias correction of the global step :math:`t` (not reset, as in the
    paper's Algorithm 1 and code), and its step is multiplied by the cosine warm-up
    :math:`1 - 0.99\cdot\tfrac12\big(1 + \cos\frac{\pi k}{N + 1}\big)` for the
    :math:`k = 0, \dots, N-1` steps since the latest reset (:math:`N` = ``warmup_steps``;
    from 0.01 back to 1, the reference code's ``CosineDecay(0.99, N)``). No warm-up is
    applied at the start of training, as in the reference code.

    NaN/Inf gradients are not handled (chain :func:`optax.apply_if_finite` or use
    :func:`lbw_optax.guard`).

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator, >= 0.
      theta: spike threshold θ on g²/v, > 0.
      reset_interval: ΔT, steps between momentum resets, >= 1.
      warmup_steps: N, steps of cosine warm-up after each reset, >= 0.
      clip_delay: :math:`N_c`, no spike is clipped while :math:`t \bmod \Delta T < N_c`, >= 0
        (the reference code's ``grad_accu_steps``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, lbw_optax
      >>> tx = lbw_optax.peers.scale_by_spam(clip_delay=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)
      >>> _, state = tx.update({"w": jnp.array([1.0, 1e3])}, state)
      >>> int(state.record.spam_clipped)
      1

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
      <https://arxiv.org/abs/2501.06842>`_, ICLR 2025. Reference code:
      ``TianjinYellow/SPAM-Optimizer``, ``galore_torch/SPAM.py`` (commit e8185fb):
      ``grad_accu_steps=20`` (line 102) and the clipping condition on the 1-based step
      (lines 237-243); the reset (lines 226-229) and the warm-up restart (lines 289-295).
    """
    _common.check(check_in_range, "b1", b1, 0.0, 1.0, closed="left")
    _common.check(check_in_range, "b2", b2, 0.0, 1.0, closed="left")
    _common.check(check_non_negative, "eps", eps)
    _common.check(check_positive, "theta", theta)
    _common.check(check_positive_int, "reset_interval", reset_interval)
    _common.check(check_non_negative_int, "warmup_steps", warmup_steps)
    _common.check(check_non_negative_int, "clip_delay", clip_delay)

    def init_fn(params):
        zero = jnp.zeros([], jnp.int32)
        record = SpamRecord(
            spam_count=zero,
            spam_since_reset=jnp.asarray(warmup_steps, jnp.int32),
            spam_resets=zero,
            spam_warmup_scale=jnp.ones([], jnp.float32),
            spam_clipped=zero,
            spam_clipped_total=zero,
        )
        mu, nu = optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        return _common.distinct_buffers(ScaleBySpamState(record=record, mu=mu, nu=nu))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        record = state.record
        count = optax.safe_increment(record.spam_count)
        reset = count % reset_interval == 0
        zero_if_reset = lambda tree: jax.tree.map(lambda x: jnp.where(reset, 0, x), tree)
        mu, nu = zero_if_reset(state.mu), zero_if_reset(state.nu)
        clipping = count % reset_interval >= clip_delay

        def clip(g, v):
            g32, v32 = g.astype(jnp.float32), v.astype(jnp.float32)
            limit = theta * v32
            spike = clipping & (v32 > 0) & (g32 * g32 > limit)
            return jnp.where(spike, jnp.sign(g32) * jnp.sqrt(limit), g32).astype(g.dtype), spike

        leaves, treedef = jax.tree.flatten(updates)
        clipped, spikes = zip(*map(clip, leaves, treedef.flatten_up_to(nu)), strict=True)
        grads = jax.tree.unflatten(treedef, clipped)
        n_clipped = sum((jnp.sum(s, dtype=jnp.int32) for s in spikes), jnp.zeros([], jnp.int32))

        mu = optax.tree.update_moment(grads, mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, nu, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        since_reset = jnp.where(reset, 0, optax.safe_increment(record.spam_since_reset))
        scale = warmup_scale(since_reset, warmup_steps)
        new_updates = jax.tree.map(
            lambda m, v, g: (scale * m / (jnp.sqrt(v) + eps)).astype(g.dtype),
            mu_hat,
            nu_hat,
            updates,
        )
        total = record.spam_clipped_total
        new_record = SpamRecord(
            spam_count=count,
            spam_since_reset=since_reset,
            spam_resets=jnp.where(
                reset, optax.safe_increment(record.spam_resets), record.spam_resets
            ),
            spam_warmup_scale=scale,
            spam_clipped=n_clipped,
            spam_clipped_total=jnp.where(
                total > jnp.iinfo(jnp.int32).max - n_clipped,
                jnp.iinfo(jnp.int32).max,
                total + n_clipped,
            ),
        )
        new_state = ScaleBySpamState(
            record=new_record,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spam_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    theta: float = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    clip_delay: int = 20,
) -> optax.GradientTransformationExtraArgs:
    """SPAM with decoupled weight decay, like :func:`optax.adamw` around :func:`scale_by_spam`.

    ``optax.chain(scale_by_spam(...), optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate))``: the post-reset warm-up scales the Adam
    step only, not the weight decay, as in the reference code.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, weight_decay, mask: as in :func:`optax.adamw`.
      theta, reset_interval, warmup_steps, clip_delay: as in :func:`scale_by_spam`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import lbw_optax
      >>> tx = lbw_optax.peers.spam_adamw(1e-3)

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
      <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
    """
    _adamw.check_adamw_args(learning_rate, b1, b2, eps, weight_decay)
    return _adamw.decoupled(
        scale_by_spam(
            b1,
            b2,
            eps,
            theta=theta,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            clip_delay=clip_delay,
        ),
        learning_rate,
        weight_decay,
        mask,
    )
