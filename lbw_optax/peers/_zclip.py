"""ZClip: z-score adaptive clipping of the global gradient norm (Kumar et al., 2025)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _common
from lbw_optax._validate import check_in_range, check_positive, check_positive_int


class ZClipState(NamedTuple):
    """State of :func:`zclip`. Every field is a scalar.

    Attributes:
      zclip_count: int32, updates seen (1 after the first update).
      zclip_observed: int32, finite gradient norms seen; the first ``warmup_steps`` of them
        only initialise the statistics.
      zclip_mean: float32, μ: during warm-up the mean of the finite norms seen so far, after
        it the EMA of the (clipped) norm.
      zclip_var: float32, σ²: during warm-up the population variance of those norms, after
        it the EMA of the squared deviation from μ.
      zclip_norm: float32, the latest global norm as received (pre-clip; may be NaN/Inf).
      zclip_zscore: float32, the latest z = (‖g‖ − μ)/(σ + eps) (0 during warm-up and on
        non-finite steps).
      zclip_clipped: bool, whether the latest step was clipped.
      zclip_clipped_steps: int32, steps clipped by the z-score rule so far.
      zclip_capped_steps: int32, steps whose norm (after the z-score rule) exceeded the fixed
        cap ``max_grad_norm`` and was clipped to it, warm-up included.
      zclip_nonfinite_steps: int32, steps whose norm was NaN/Inf (left as they were).
    """

    zclip_count: jax.Array
    zclip_observed: jax.Array
    zclip_mean: jax.Array
    zclip_var: jax.Array
    zclip_norm: jax.Array
    zclip_zscore: jax.Array
    zclip_clipped: jax.Array
    zclip_clipped_steps: jax.Array
    zclip_capped_steps: jax.Array
    zclip_nonfinite_steps: jax.Array
    # What lbw_optax.telemetry reports.
    telemetry_fields = (
        "zclip_count",
        "zclip_observed",
        "zclip_mean",
        "zclip_var",
        "zclip_norm",
        "zclip_zscore",
        "zclip_clipped",
        "zclip_clipped_steps",
        "zclip_capped_steps",
        "zclip_nonfinite_steps",
    )


def zclip(
    alpha: float = 0.97,
    z_threshold: float = 2.5,
    warmup_steps: int = 25,
    eps: float = 1e-6,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips the global gradient norm when it is an outlier of its own running statistics.

    ZClip tracks the mean μ and variance σ² of the global gradient norm ‖g‖ with an EMA of
    decay ``alpha``. The first ``warmup_steps`` finite norms only initialise μ and σ² (their
    mean and population variance; no clipping). After warm-up, with

    .. math::
      z = \frac{\|g\| - \mu}{\sigma + \epsilon},

    a step with :math:`z > z_{thr}` is rescaled to the norm (the paper's "reciprocal"
    z-score mode, ``clip_option="adaptive_scaling"`` in the reference code)

    .. math::
      \|g\|_{clip} = \mu + \frac{z_{thr}^2}{z}\,\sigma ,

    and the statistics are then updated with the norm after clipping ``n``:
    :math:`\mu \leftarrow \alpha\mu + (1-\alpha)n`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(n - \mu)^2` (with the new μ, as in
    the paper and its code).

    Like the reference code, ZClip also caps the norm at a fixed ``max_grad_norm`` (1.0 by
    default), warm-up included: the gradients are rescaled to norm
    :math:`\min(n, \text{max\_grad\_norm})` where :math:`n` is the norm after the z-score rule
    (the raw norm during warm-up). The cap does not feed the statistics: the warm-up records
    the raw norms and the EMAs take the z-score-clipped norm, as the reference does. Pass
    ``max_grad_norm=None`` for the z-score rule alone.

    ZClip does not handle NaN/Inf: a non-finite norm leaves the gradients as they are and the
    statistics untouched (counted in ``zclip_nonfinite_steps``). Skip such steps with
    :func:`lbw_optax.guard` or :func:`optax.apply_if_finite`.

    Args:
      alpha: EMA decay of μ and σ², in (0, 1).
      z_threshold: z-score above which a step is clipped, > 0.
      warmup_steps: finite norms that initialise the statistics, >= 1.
      eps: added to σ in the z-score (zero-safe when all norms were equal), > 0.
      max_grad_norm: the fixed cap on the global norm, > 0, or ``None`` for no cap.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` to chain before an optimizer.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> tx = optax.chain(lbw_optax.peers.zclip(warmup_steps=2), optax.adamw(1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> for norm in (1.0, 1.2, 50.0):
      ...     grads = {"w": jnp.full(3, norm / 3**0.5)}
      ...     updates, state = tx.update(grads, state, params)
      >>> bool(lbw_optax.telemetry(state)["zclip_clipped"])
      True

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025. Reference code: ``bluorion-com/ZClip``,
      ``zclip/zclip.py`` (commit 584ce4f): ``max_grad_norm=1.0`` default (line 17), the cap
      during warm-up (lines 199-200) and after it (lines 163-164, ``min`` with the adaptive
      value), the EMA update with the z-score-clipped norm (line 210).
    """
    _common.check(check_in_range, "alpha", alpha, 0.0, 1.0, closed="neither")
    _common.check(check_positive, "z_threshold", z_threshold)
    _common.check(check_positive_int, "warmup_steps", warmup_steps)
    _common.check(check_positive, "eps", eps)
    if max_grad_norm is not None:
        _common.check(check_positive, "max_grad_norm", max_grad_norm)

    def init_fn(params):
        del params
        zero = jnp.zeros([], jnp.float32)
        state = ZClipState(
            zclip_count=jnp.zeros([], jnp.int32),
            zclip_observed=jnp.zeros([], jnp.int32),
            zclip_mean=zero,
            zclip_var=zero,
            zclip_norm=zero,
            zclip_zscore=zero,
            zclip_clipped=jnp.array(False),
            zclip_clipped_steps=jnp.zeros([], jnp.int32),
            zclip_capped_steps=jnp.zeros([], jnp.int32),
            zclip_nonfinite_steps=jnp.zeros([], jnp.int32),
        )
        return _common.distinct_buffers(state)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = _common.global_norm(updates)
        finite = jnp.isfinite(norm)
        warming = state.zclip_observed < warmup_steps

        # Warm-up: Welford's running mean and population variance of the finite norms.
        seen = optax.safe_increment(state.zclip_observed).astype(jnp.float32)
        delta = norm - state.zclip_mean
        warm_mean = state.zclip_mean + delta / seen
        warm_var = state.zclip_var + (delta * (norm - warm_mean) - state.zclip_var) / seen

        # After warm-up: z-score, reciprocal clipping, EMA of the clipped norm.
        std = jnp.sqrt(state.zclip_var)
        z = (norm - state.zclip_mean) / (std + eps)
        clip = finite & ~warming & (z > z_threshold)
        safe_z = jnp.where(clip, z, 1.0)
        target = state.zclip_mean + (z_threshold**2 / safe_z) * std
        clipped_norm = jnp.where(clip, target, norm)
        ema_mean = alpha * state.zclip_mean + (1.0 - alpha) * clipped_norm
        ema_var = alpha * state.zclip_var + (1.0 - alpha) * (clipped_norm - ema_mean) ** 2

        # The fixed cap on the norm after the z-score rule (warm-up included).
        if max_grad_norm is None:
            capped, applied = jnp.array(False), clipped_norm
        else:
            capped = finite & (clipped_norm > max_grad_norm)
            applied = jnp.where(capped, jnp.float32(max_grad_norm), clipped_norm)
        changed = clip | capped
        factor = jnp.where(changed, applied / jnp.where(changed, norm, 1.0), 1.0)
        new_updates = _common.scale_tree(updates, factor)
        new_state = ZClipState(
            zclip_count=optax.safe_increment(state.zclip_count),
            zclip_observed=_common.count_if(state.zclip_observed, finite),
            zclip_mean=_common.keep_if(
                finite, jnp.where(warming, warm_mean, ema_mean), state.zclip_mean
            ),
            zclip_var=_common.keep_if(
                finite, jnp.where(warming, warm_var, ema_var), state.zclip_var
            ),
            zclip_norm=norm,
            zclip_zscore=jnp.where(finite & ~warming, z, 0.0),
            zclip_clipped=clip,
            zclip_clipped_steps=_common.count_if(state.zclip_clipped_steps, clip),
            zclip_capped_steps=_common.count_if(state.zclip_capped_steps, capped),
            zclip_nonfinite_steps=_common.count_if(state.zclip_nonfinite_steps, ~finite),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
