"""AdaGC: per-tensor adaptive gradient clipping (Wang et al., 2025)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _common
from lbw_optax._validate import check_in_range, check_non_negative_int, check_positive


class AdaGCState(NamedTuple):
    """State of :func:`adagc`. Per-tensor fields are trees of float32 scalars, one per tensor.

    Attributes:
      adagc_count: int32, updates seen (1 after the first update).
      adagc_observed: int32, finite steps seen; the first ``warmup_steps`` of them are the
        warm-up.
      adagc_gamma: per tensor, γ: during warm-up the smallest non-zero clipped norm seen, after
        it the EMA of the tensor's clipped norm (0 while no non-zero gradient was seen).
      adagc_clip_coef: per tensor, the factor applied to the tensor at the latest step (1 on a
        non-finite step).
      adagc_clipped_tensors: int32, tensors whose factor was < 1 at the latest step.
      adagc_nonfinite_steps: int32, steps whose gradients were NaN/Inf (left as they were).
    """

    adagc_count: jax.Array
    adagc_observed: jax.Array
    adagc_gamma: Any
    adagc_clip_coef: Any
    adagc_clipped_tensors: jax.Array
    adagc_nonfinite_steps: jax.Array
    # What lbw_optax.telemetry reports.
    telemetry_fields = (
        "adagc_count",
        "adagc_observed",
        "adagc_gamma",
        "adagc_clip_coef",
        "adagc_clipped_tensors",
        "adagc_nonfinite_steps",
    )


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """min(num / den, 1), and 1 where den is 0 (nothing to clip)."""
    positive = den > 0
    return jnp.where(positive, jnp.minimum(num / jnp.where(positive, den, 1.0), 1.0), 1.0)


def adagc(
    beta: float = 0.99,
    lambda_rel: float = 1.04,
    warmup_steps: int = 100,
    warmup_clip: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips each tensor's gradient relative to the EMA of its own clipped norm.

    Each tensor :math:`i` keeps a scalar :math:`\gamma_i`. After warm-up:

    .. math::
      h_i = \min\!\left(\lambda_{rel}\frac{\gamma_i}{\|g_i\|}, 1\right), \qquad
      \hat g_i = h_i\,g_i, \qquad
      \gamma_i \leftarrow \beta\gamma_i + (1-\beta)\,\|\hat g_i\| .

    During the first ``warmup_steps`` finite steps, as in the paper's Algorithm 1, the whole
    gradient is clipped to the global norm ``warmup_clip`` (``λ_abs``),
    :math:`\hat g = \min(\lambda_{abs}/\|g\|, 1)\,g`, and :math:`\gamma_i` records the smallest
    clipped tensor norm seen, :math:`\gamma_i \leftarrow \min(\gamma_i, \|\hat g_i\|)`
    (:math:`\gamma_i = \|\hat g_i\|` at the first step).

    Zero-safety (the paper does not say): during warm-up a zero norm does not lower γ; a
    zero-norm tensor is left as it is; a tensor with γ = 0 (never a non-zero gradient yet,
    e.g. a LoRA factor at initialisation) is not clipped and starts its EMA at its first
    non-zero norm. A non-finite gradient leaves the gradients as they are and γ untouched
    (skip such steps with :func:`lbw_optax.guard` or :func:`optax.apply_if_finite`).

    Args:
      beta: EMA decay of γ, in (0, 1).
      lambda_rel: relative threshold λ_rel, > 0.
      warmup_steps: finite steps of global clipping that initialise γ, >= 0.
      warmup_clip: global-norm threshold λ_abs during warm-up, > 0.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` to chain before an optimizer.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> tx = lbw_optax.peers.adagc(warmup_steps=1)
      >>> state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
      >>> _, state = tx.update({"a": jnp.full(2, 0.1), "b": jnp.full(2, 0.1)}, state)
      >>> clipped, state = tx.update({"a": jnp.full(2, 1.0), "b": jnp.full(2, 0.1)}, state)
      >>> [round(float(c), 3) for c in jax.tree.leaves(state.adagc_clip_coef)]
      [0.104, 1.0]

    Defaults are the authors' code's: ``lishuai-97/AdaGC``, ``megatron-gpt2.patch`` (commit
    32c249f), class ``AdaGC`` added to ``megatron/optimizer/clip_grads.py``:
    ``clip_ratio=1.04, beta=0.99, start_clip_steps=100``, the same values in its launch
    script ``run_pretrain_gpt2_345m.sh`` (``--clip-ratio 1.04 --clip-beta 0.99 --clip-grad
    1.0``). A third-party port uses 1.05 and 0.98. The reference divides by ``norm + 1e-6``
    when clipping; here the ratio is exact (zero-safe as described above).

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model Pretraining
      <https://arxiv.org/abs/2502.11034>`_, 2025.
    """
    _common.check(check_in_range, "beta", beta, 0.0, 1.0, closed="neither")
    _common.check(check_positive, "lambda_rel", lambda_rel)
    _common.check(check_non_negative_int, "warmup_steps", warmup_steps)
    _common.check(check_positive, "warmup_clip", warmup_clip)

    def init_fn(params):
        scalar = lambda _: jnp.zeros([], jnp.float32)
        return AdaGCState(
            adagc_count=jnp.zeros([], jnp.int32),
            adagc_observed=jnp.zeros([], jnp.int32),
            adagc_gamma=jax.tree.map(scalar, params),
            adagc_clip_coef=jax.tree.map(lambda _: jnp.ones([], jnp.float32), params),
            adagc_clipped_tensors=jnp.zeros([], jnp.int32),
            adagc_nonfinite_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norms = jax.tree.map(_common.tensor_norm, updates)
        total = jnp.sqrt(sum(n * n for n in jax.tree.leaves(norms)))
        finite = jnp.isfinite(total)
        warming = state.adagc_observed < warmup_steps
        global_coef = _safe_ratio(jnp.asarray(warmup_clip, jnp.float32), total)

        def per_tensor(norm, gamma):
            seen = gamma > 0
            coef = jnp.where(
                warming, global_coef, jnp.where(seen, _safe_ratio(lambda_rel * gamma, norm), 1.0)
            )
            clipped = coef * norm
            lowest = jnp.where(seen, jnp.minimum(gamma, clipped), clipped)
            warm_gamma = jnp.where(clipped > 0, lowest, gamma)
            ema_gamma = jnp.where(seen, beta * gamma + (1.0 - beta) * clipped, clipped)
            new_gamma = jnp.where(warming, warm_gamma, ema_gamma)
            return jnp.where(finite, coef, 1.0), jnp.where(finite, new_gamma, gamma)

        norm_leaves, treedef = jax.tree.flatten(norms)
        gamma_leaves = treedef.flatten_up_to(state.adagc_gamma)
        coefs, gammas = zip(*map(per_tensor, norm_leaves, gamma_leaves), strict=True)
        coefs = jax.tree.unflatten(treedef, coefs)
        gammas = jax.tree.unflatten(treedef, gammas)
        new_updates = jax.tree.map(lambda g, c: (g * c).astype(g.dtype), updates, coefs)
        clipped_tensors = sum(
            ((c < 1.0).astype(jnp.int32) for c in jax.tree.leaves(coefs)), jnp.zeros([], jnp.int32)
        )
        new_state = AdaGCState(
            adagc_count=optax.safe_increment(state.adagc_count),
            adagc_observed=_common.count_if(state.adagc_observed, finite),
            adagc_gamma=gammas,
            adagc_clip_coef=coefs,
            adagc_clipped_tensors=clipped_tensors,
            adagc_nonfinite_steps=_common.count_if(state.adagc_nonfinite_steps, ~finite),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
