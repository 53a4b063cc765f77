"""Sense: the per-step telemetry a policy reads, computed on device in one pass."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Signals(NamedTuple):
    """What the guard sensed at a step. Every field is a float32 scalar.

    Attributes:
      loss: the loss passed as ``value=`` (0 when no loss is given).
      grad_norm: global L2 norm of the gradients (pre-clip, as the optimizer received them).
      grad_ms_max: the largest per-tensor mean of g² (the published rule's sensor).
      grad_ms_mean: the mean over tensors of the per-tensor mean of g².
      grad_mean: the mean of all gradient elements (its sign is the published rule's
        oscillation cue).
      grad_momentum_cos: cosine between the gradients and the inner optimizer's first moment
        *before* this step (``mu``), when the policy asks for it and the inner state has one
        (0 otherwise). Negative values mean the new gradient opposes the direction the
        optimizer has been moving in: the steps overshoot.
    """

    loss: jax.Array
    grad_norm: jax.Array
    grad_ms_max: jax.Array
    grad_ms_mean: jax.Array
    grad_mean: jax.Array
    grad_momentum_cos: jax.Array


def empty_signals() -> Signals:
    zero = jnp.zeros([], jnp.float32)
    return Signals(zero, zero, zero, zero, zero, zero)


def find_first_moment(inner_state: Any, grads: Any) -> Any | None:
    """The inner optimizer's first moment (a field named ``mu`` shaped like the gradients), or
    ``None`` when there is none or more than one."""
    found = optax.tree.get_all_with_path(inner_state, "mu")
    if len(found) != 1:
        return None
    mu = found[0][1]
    if jax.tree.structure(mu) != jax.tree.structure(grads):
        return None
    shapes_match = all(
        m.shape == g.shape for m, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads), strict=True)
    )
    return mu if shapes_match else None


def _sum_and_sum_of_squares(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # One variadic reduction reads g once for both sums. (Two separate jnp.sum calls read it
    # twice, and XLA shares g*g with Adam's second moment, materialising it.)
    g = g.astype(jnp.float32)
    zero = jnp.zeros([], jnp.float32)
    add_pairs = lambda a, b: (a[0] + b[0], a[1] + b[1])
    return jax.lax.reduce((g, g * g), (zero, zero), add_pairs, tuple(range(g.ndim)))


def _sums_with_momentum(g: jax.Array, m: jax.Array) -> tuple[jax.Array, ...]:
    # Σg, Σg², Σg·m and Σm² in one variadic reduction: one read of g and one of m.
    g, m = g.astype(jnp.float32), m.astype(jnp.float32)
    zero = jnp.zeros([], jnp.float32)
    add = lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True))
    return jax.lax.reduce((g, g * g, g * m, m * m), (zero,) * 4, add, tuple(range(g.ndim)))


def sense(
    grads: Any, value: jax.Array | None, momentum: Any | None = None
) -> tuple[Signals, jax.Array]:
    """Reduces the gradients (and the loss) to a few scalars.

    Each tensor contributes two sums, Σg and Σg², computed by one variadic reduction, so
    sensing costs one read of the gradients. A NaN or Inf anywhere makes Σg² non-finite, so
    the same reduction also tells whether the step is finite (a sum of squares that
    overflows float32 counts as non-finite too, deliberately: such a step is not safe).

    Args:
      grads: the gradients.
      value: the scalar loss, or ``None``.
      momentum: the inner optimizer's first moment before this step, to sense the
        gradient–momentum alignment (costs one read of it), or ``None``.

    Returns:
      ``(signals, finite)`` where ``finite`` is a bool scalar: loss and gradients finite.
    """
    pairs = [
        (g, m)
        for g, m in zip(
            jax.tree.leaves(grads),
            jax.tree.leaves(grads) if momentum is None else jax.tree.leaves(momentum),
            strict=True,
        )
        if g.size > 0
    ]
    if not pairs:
        raise ValueError("the gradient tree has no non-empty arrays to sense")
    leaves = [g for g, _ in pairs]
    if momentum is None:
        sums, sq_sums = zip(*(_sum_and_sum_of_squares(g) for g in leaves), strict=True)
        dot, m_sq = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
    else:
        sums, sq_sums, dots, m_sqs = zip(
            *(_sums_with_momentum(g, m) for g, m in pairs), strict=True
        )
        dot, m_sq = sum(dots), sum(m_sqs)
    mean_squares = jnp.stack([s / g.size for s, g in zip(sq_sums, leaves, strict=True)])
    total, total_sq = sum(sums), sum(sq_sums)
    count = sum(g.size for g in leaves)
    loss = jnp.zeros([], jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    if loss.shape != ():
        raise ValueError(f"value must be the scalar loss of the step, got shape {loss.shape}")
    finite = jnp.isfinite(total_sq) & jnp.isfinite(total) & jnp.isfinite(loss)
    cos = dot / (jnp.sqrt(total_sq * m_sq) + 1e-30)
    cos = jnp.where(jnp.isfinite(cos), cos, 0.0)
    signals = Signals(
        loss=loss,
        grad_norm=jnp.sqrt(total_sq),
        grad_ms_max=jnp.max(mean_squares),
        grad_ms_mean=jnp.mean(mean_squares),
        grad_mean=total / count,
        grad_momentum_cos=cos,
    )
    return signals, finite
