"""Sense: the per-step telemetry a policy reads, computed on device in one pass."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Signals(NamedTuple):
    """What the guard sensed at a step. Every field is a float32 scalar.

    Attributes:
      loss: the loss passed as ``value=`` (0 when no loss is given).
      grad_norm: global L2 norm of the gradients (pre-clip, as the optimizer received them).
      grad_ms_max: the largest per-tensor mean of g² (the published rule's sensor).
      grad_ms_mean: the mean over tensors of the per-tensor mean of g².
      grad_mean: the mean of all gradient elements (its sign is the published rule's
        oscillation cue).
    """

    loss: jax.Array
    grad_norm: jax.Array
    grad_ms_max: jax.Array
    grad_ms_mean: jax.Array
    grad_mean: jax.Array


def empty_signals() -> Signals:
    zero = jnp.zeros([], jnp.float32)
    return Signals(zero, zero, zero, zero, zero)


def _sum_and_sum_of_squares(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # One variadic reduction reads g once for both sums. (Two separate jnp.sum calls read it
    # twice, and XLA shares g*g with Adam's second moment, materialising it.)
    g = g.astype(jnp.float32)
    zero = jnp.zeros([], jnp.float32)
    add_pairs = lambda a, b: (a[0] + b[0], a[1] + b[1])
    return jax.lax.reduce((g, g * g), (zero, zero), add_pairs, tuple(range(g.ndim)))


def sense(grads: Any, value: jax.Array | None) -> tuple[Signals, jax.Array]:
    """Reduces the gradients (and the loss) to a few scalars.

    Each tensor contributes two sums, Σg and Σg², computed by one variadic reduction, so
    sensing costs one read of the gradients. A NaN or Inf anywhere makes Σg² non-finite, so
    the same reduction also tells whether the step is finite (a sum of squares that
    overflows float32 counts as non-finite too, deliberately: such a step is not safe).

    Returns:
      ``(signals, finite)`` where ``finite`` is a bool scalar: loss and gradients finite.
    """
    leaves = [g for g in jax.tree.leaves(grads) if g.size > 0]
    if not leaves:
        raise ValueError("the gradient tree has no non-empty arrays to sense")
    sums, sq_sums = zip(*(_sum_and_sum_of_squares(g) for g in leaves), strict=True)
    mean_squares = jnp.stack([s / g.size for s, g in zip(sq_sums, leaves, strict=True)])
    total, total_sq = sum(sums), sum(sq_sums)
    count = sum(g.size for g in leaves)
    loss = jnp.zeros([], jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    if loss.shape != ():
        raise ValueError(f"value must be the scalar loss of the step, got shape {loss.shape}")
    finite = jnp.isfinite(total_sq) & jnp.isfinite(total) & jnp.isfinite(loss)
    signals = Signals(
        loss=loss,
        grad_norm=jnp.sqrt(total_sq),
        grad_ms_max=jnp.max(mean_squares),
        grad_ms_mean=jnp.mean(mean_squares),
        grad_mean=total / count,
    )
    return signals, finite
