"""Fault injection: pure functions applied inside the jitted step and to the schedule.

Faults are keyed by step number (the k-th update is step k). Inside the step they are decided by
comparing the optimizer's traced step counter with constant arrays of fault steps, with
``jnp.where``, so a run compiles its step once whatever the faults. Corrupted batches are applied
by the data pipeline (:class:`train.data.DataStream`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lbw.train.config import FaultConfig


def _at(step: jax.Array, steps: tuple[int, ...]) -> jax.Array:
    """Whether the traced ``step`` is one of ``steps`` (False for an empty tuple)."""
    if not steps:
        return jnp.array(False)
    return jnp.any(step == jnp.asarray(steps, jnp.int32))


def loss_factor(step: jax.Array, faults: FaultConfig) -> jax.Array:
    """NaN on the ``nan_loss_steps``, else 1; multiply the loss by it before differentiating."""
    return jnp.where(_at(step, faults.nan_loss_steps), jnp.nan, 1.0).astype(jnp.float32)


def perturb_grads(grads, step: jax.Array, faults: FaultConfig):
    """Scales the gradients by ``grad_spike_factor`` on spike steps and poisons them with NaN on
    ``nan_grad_steps``; leaves them alone (same dtype) on every other step."""
    if not (faults.grad_spike_steps or faults.nan_grad_steps):
        return grads
    factor = jnp.where(_at(step, faults.grad_spike_steps), faults.grad_spike_factor, 1.0)
    factor = jnp.where(_at(step, faults.nan_grad_steps), jnp.nan, factor)
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)


def shock_schedule(schedule: optax.Schedule, faults: FaultConfig) -> optax.Schedule:
    """``schedule`` times ``lr_shock_factor`` on the shock's steps.

    An optax schedule receives the number of updates already applied, ``count``; the update it
    serves is step ``count + 1``.
    """
    if faults.lr_shock_start is None or faults.lr_shock_steps == 0:
        return schedule
    start, stop = faults.lr_shock_start, faults.lr_shock_start + faults.lr_shock_steps

    def shocked(count):
        step = count + 1
        return schedule(count) * jnp.where(
            (step >= start) & (step < stop), faults.lr_shock_factor, 1.0
        )

    return shocked
