"""The language-modelling loss shared by training, evaluation and tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean next-token cross-entropy, computed in float32.

    ``logits[:, t]`` must be the prediction for ``targets[:, t]``: for a batch of ``tokens``,
    call ``model(tokens[:, :-1])`` and pass ``targets=tokens[:, 1:]``.

    Args:
      logits: [B, T, V] in any float dtype.
      targets: int token ids, [B, T].
      mask: optional [B, T] weights (1 for positions that count, 0 for padding).

    Returns:
      A float32 scalar: the mean over positions whose mask is nonzero (0 when none is).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets
    )  # [B, T]
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
