"""The control skeleton shared by the guard, SGG and the peers: float32 norms, actuation by a
scale, counters, keeping the old value on a non-finite step, concrete hyperparameter checks."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def tensor_norm(g: jax.Array) -> jax.Array:
    """L2 norm of one tensor, accumulated in float32 whatever its dtype (bf16 included)."""
    g = g.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(g * g))


def global_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a tree of arrays, accumulated in float32 (0 for an empty tree)."""
    squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def scale_tree(tree: Any, factor: jax.Array) -> Any:
    """Multiplies every array by a float32 scalar, keeping each array's dtype."""
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), tree)


def count_if(counter: jax.Array, condition: jax.Array) -> jax.Array:
    """Advances an int32 counter (saturating) where ``condition`` holds."""
    return jnp.where(condition, optax.safe_increment(counter), counter)


def keep_if(condition: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old``, leaf by leaf (the value kept on a
    non-finite step: ``keep_if(finite, new, old)``)."""
    return optax.tree.where(condition, new, old)


def concrete(value: Any) -> Any:
    """A Python number for a number or a concrete scalar array; a tracer is returned as is.

    ``optax.inject_hyperparams`` passes every numeric argument as an array, traced inside
    ``update``; hyperparameters are checked where their value is known.
    """
    if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array | np.ndarray):
        return value
    return value.item() if value.ndim == 0 else value


def check(checker: Callable[..., None], name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs a ``lbw_optax._validate`` check on a concrete value; returns that value."""
    value = concrete(value)
    if not isinstance(value, jax.core.Tracer):
        checker(name, value, *args, **kwargs)
    return value
