"""The jitted train step (with its cache, shared by runs in one process), the optimizer it
updates, and the evaluation of a model."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lbw import models
from lbw.train import sharding
from lbw.train.config import FaultConfig, TrainConfig
from lbw.train.faults import loss_factor, perturb_grads
from lbw.train.optimizers import eval_params, set_peak_learning_rate


def make_optimizer(
    config: TrainConfig, model: models.Decoder, wrt: Any
) -> tuple[nnx.Optimizer, optax.Schedule]:
    """The ``nnx.Optimizer`` of ``config`` over the variables ``wrt`` of ``model``, and its
    learning-rate schedule: ``config.optim.build``'s (shared by the runs in one process that
    agree on it), with the peak learning rate set in the state under ``peak_lr_in_state`` (the
    schedule then has a peak of 1)."""
    schedule, tx = config.optim.build(
        config.steps, faults=config.faults, grad_accum=config.grad_accum
    )
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    if config.peak_lr_in_state:
        set_peak_learning_rate(optimizer.opt_state, config.learning_rate)
    return optimizer, schedule


def make_train_step(config: TrainConfig, wrt: Any, mesh: jax.sharding.Mesh | None = None):
    """The jitted step ``(model, optimizer, tokens [B, T+1]) -> (loss, finite)``; with
    ``grad_accum`` K, a micro-step (the optimizer updates the model at every K-th call).

    Faults are decided on device from the optimizer's step counter (see :mod:`train.faults`), so
    the step is traced once. Runs in one process with the same faults and trainable filter share
    one step function, and so its compilation cache. With a ``mesh``, the updated model and
    optimizer state keep the FSDP layout of :func:`train.sharding.param_sharding`.

    The model and the optimizer are donated: the step writes the new parameters and state into
    the old ones' memory (arrays read from them before the call are invalid after it).
    """
    return _train_step(config.faults, wrt, mesh, config.grad_accum)


@functools.lru_cache(maxsize=16)
def _train_step(
    faults: FaultConfig, wrt: Any, mesh: jax.sharding.Mesh | None = None, grad_accum: int = 1
):

    @functools.partial(nnx.jit, donate_argnums=(0, 1))
    def train_step(model, optimizer, tokens):
        # The update this call (a micro-step of it, with grad_accum) performs, counted from 1.
        step = optimizer.step[...] // grad_accum + 1
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T] each

        def loss_fn(model):
            loss = models.cross_entropy_loss(model(inputs), targets)
            if faults.nan_loss_steps:
                loss = loss * loss_factor(step, faults)
            return loss

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        grads = perturb_grads(grads, step, faults)
        optimizer.update(model, grads, value=loss)
        if mesh is not None:
            nnx.update(model, sharding.constrain(nnx.state(model), mesh))
            nnx.update(optimizer, sharding.constrain(nnx.state(optimizer), mesh))
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        return loss, finite

    return train_step


# The fields that define the optimizer and its schedule.
def raw(tree: Any) -> Any:
    """The arrays of a tree of ``nnx.Variable`` (an optimizer state or a model state)."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda v: v.get_value() if is_var(v) else v, tree, is_leaf=is_var)


def evaluate_optimizer_point(
    name: str,
    model: models.Decoder,
    optimizer: nnx.Optimizer,
    wrt: Any,
    batches: np.ndarray,
    mesh: jax.sharding.Mesh | None = None,
) -> float:
    """:func:`evaluate` at the parameters the optimizer names for evaluation (its registered
    ``eval_params``, e.g. schedule-free's averaged sequence), the model's own otherwise. The
    model's trained parameters are put back afterwards."""
    point = eval_params(name)
    if point is None:
        return evaluate(model, batches, mesh)
    current = raw(nnx.state(model, wrt))
    nnx.update(model, point(raw(optimizer.opt_state), current))
    try:
        return evaluate(model, batches, mesh)
    finally:
        nnx.update(model, current)


@nnx.jit
def _eval_step(model, tokens):
    return models.cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])


def evaluate(
    model: models.Decoder, batches: np.ndarray, mesh: jax.sharding.Mesh | None = None
) -> float:
    """Mean loss of ``model`` over the fixed evaluation ``batches`` [n, B, T+1] (each sharded
    over the ``mesh``'s batch axes when there is one)."""
    put = jnp.asarray if mesh is None else (lambda b: sharding.global_batch(b, mesh))
    losses = [_eval_step(model, put(b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))
