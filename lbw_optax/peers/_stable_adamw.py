"""StableAdamW: AdamW with per-tensor update clipping (Wortsman et al., 2023)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _adamw, _common
from lbw_optax._validate import check_in_range, check_non_negative


class StableAdamRecord(NamedTuple):
    """The record of :func:`scale_by_stable_adam` (what :func:`lbw_optax.telemetry` reports).

    Attributes:
      stable_count: int32, updates seen (1 after the first update).
      stable_clipped_tensors: int32, tensors whose step was scaled down at the latest update
        (their RMS of g²/v̂ exceeded 1).
      stable_min_factor: float32, the smallest per-tensor factor ``1/max(1, RMS)`` at the
        latest update (1 when nothing was clipped).
    """

    stable_count: jax.Array
    stable_clipped_tensors: jax.Array
    stable_min_factor: jax.Array
    # What lbw_optax.telemetry reports.
    telemetry_fields = ("stable_count", "stable_clipped_tensors", "stable_min_factor")


class ScaleByStableAdamState(NamedTuple):
    """State of :func:`scale_by_stable_adam`.

    Attributes:
      record: the scalar :class:`StableAdamRecord` (kept apart so telemetry skips the moments).
      mu: first moment, like the params.
      nu: second moment, like the params.
    """

    record: StableAdamRecord
    mu: Any
    nu: Any


def scale_by_stable_adam(
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam, each tensor's step clipped by the RMS of :math:`g^2/\hat v`.

    With Adam's bias-corrected moments :math:`\hat m_t, \hat v_t` (this step's gradient
    included), for each parameter tensor

    .. math::
      \mathrm{RMS}_t = \sqrt{\operatorname{mean}\big(g_t^2 / \max(\hat v_t, \epsilon^2)\big)},
      \qquad
      u_t = \frac{1}{\max(1, \mathrm{RMS}_t)}
        \Big(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\,\theta_{t-1}\Big).

    When :math:`\hat v` lags a sudden rise of :math:`g^2` (the state the paper links to loss
    spikes), the RMS exceeds 1 and the tensor's step, weight decay included, shrinks; otherwise
    this is AdamW. The paper writes the moments with the corrected decays
    :math:`\hat\beta = \beta\frac{1 - \beta^{t-1}}{1 - \beta^t}` instead of a bias correction:
    the same :math:`\hat m_t, \hat v_t`. Chain :func:`optax.scale_by_learning_rate` after it
    (or use :func:`stable_adamw`), so the learning rate multiplies the clipped step as
    :math:`\eta_t = \alpha_t / \max(1, \mathrm{RMS}_t)` does in the paper. NaN/Inf gradients
    are not handled (use :func:`lbw_optax.guard` or :func:`optax.apply_if_finite`).

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1) (the paper uses 0.99 at scale).
      eps: ε in the denominator and in :math:`\max(\hat v, \epsilon^2)`, >= 0.
      weight_decay: λ, decoupled weight decay (needs ``params``), >= 0.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, lbw_optax
      >>> tx = lbw_optax.peers.scale_by_stable_adam()
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> _, state = tx.update({"w": jnp.full(3, 0.01)}, state)
      >>> updates, state = tx.update({"w": jnp.full(3, 1.0)}, state)
      >>> int(state.record.stable_clipped_tensors)
      1

    References:
      Wortsman et al., `Stable and low-precision training for large-scale vision-language
      models <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023 (Algorithm 2, StableAdamW).
    """
    _common.check(check_in_range, "b1", b1, 0.0, 1.0, closed="left")
    _common.check(check_in_range, "b2", b2, 0.0, 1.0, closed="left")
    _common.check(check_non_negative, "eps", eps)
    _common.check(check_non_negative, "weight_decay", weight_decay)

    def init_fn(params):
        record = StableAdamRecord(
            stable_count=jnp.zeros([], jnp.int32),
            stable_clipped_tensors=jnp.zeros([], jnp.int32),
            stable_min_factor=jnp.ones([], jnp.float32),
        )
        return ScaleByStableAdamState(
            record=record, mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None and not (isinstance(weight_decay, float | int) and weight_decay == 0):
            raise ValueError("scale_by_stable_adam with weight_decay > 0 needs params.")
        count = optax.safe_increment(state.record.stable_count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)

        def per_tensor(g, m, v, p):
            g32, v32 = g.astype(jnp.float32), v.astype(jnp.float32)
            rms = jnp.sqrt(jnp.mean(g32 * g32 / jnp.maximum(v32, eps * eps)))
            factor = 1.0 / jnp.maximum(1.0, rms)
            step = m.astype(jnp.float32) / (jnp.sqrt(v32) + eps)
            if p is not None:
                step = step + weight_decay * p.astype(jnp.float32)
            return (factor * step).astype(g.dtype), factor

        leaves, treedef = jax.tree.flatten(updates)
        param_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(leaves)
        out, factors = zip(
            *map(
                per_tensor,
                leaves,
                treedef.flatten_up_to(mu_hat),
                treedef.flatten_up_to(nu_hat),
                param_leaves,
            ),
            strict=True,
        )
        factors = jnp.stack(factors) if factors else jnp.ones([1], jnp.float32)
        record = StableAdamRecord(
            stable_count=count,
            stable_clipped_tensors=jnp.sum(factors < 1.0, dtype=jnp.int32),
            stable_min_factor=jnp.min(factors),
        )
        new_state = ScaleByStableAdamState(
            record=record,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
) -> optax.GradientTransformationExtraArgs:
    """StableAdamW: ``chain(scale_by_stable_adam(...), scale_by_learning_rate(learning_rate))``.

    The defaults follow the paper's (β2 = 0.99 with update clipping in place of β2 = 0.98
    without, ε = 1e-6), with this package's weight decay 1e-4.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, weight_decay: as in :func:`scale_by_stable_adam`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import lbw_optax
      >>> tx = lbw_optax.peers.stable_adamw(1e-3)

    References:
      Wortsman et al., `Stable and low-precision training for large-scale vision-language
      models <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023.
    """
    _adamw.check_adamw_args(learning_rate, b1, b2, eps, weight_decay)
    return optax.chain(
        scale_by_stable_adam(b1, b2, eps, weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
