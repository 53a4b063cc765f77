"""Gradient accumulation that hands the inner transformation the window's mean loss."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax._validate import check_positive_int


class AccumulateGradientsState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      value_sum: float32 ``[]``, the sum of the ``value=`` losses of the current window's
        micro-steps so far (0 at the start of a window).
      inner_state: the ``optax.MultiStepsState`` that accumulates the gradients and holds the
        inner transformation's state.
    """

    value_sum: jax.Array
    inner_state: Any


def accumulate_gradients(
    inner: optax.GradientTransformation, every_k: int
) -> optax.GradientTransformationExtraArgs:
    r"""``optax.MultiSteps`` whose inner transformation reads the mean loss of the window.

    Gradient accumulation over ``every_k`` micro-batches: the micro-steps' gradients are
    averaged (by ``optax.MultiSteps``) and ``inner`` updates once per window with

    .. math::
      g = \frac{1}{k}\sum_{i=1}^{k} g_i, \qquad \ell = \frac{1}{k}\sum_{i=1}^{k} \ell_i,

    where :math:`\ell_i` is the ``value=`` of micro-step :math:`i`. ``optax.MultiSteps`` alone
    forwards the ``value=`` of the window's last micro-step, so a guard under it would sense
    that one micro-batch's loss (micro-losses 1, 2, 3, 10 read as 10, not 4); here it senses
    the loss of the whole batch its update comes from. Between two updates the returned
    updates are zero, as with ``optax.MultiSteps``.

    A window with a non-finite gradient or loss gives a non-finite mean (a guard holds that
    update); the next window starts from zero. (``optax.MultiSteps`` alone restarts its sums
    by multiplying them by 0, so one NaN gradient stays in them for every later window.)

    Args:
      inner: the transformation to run once per window, e.g. ``lbw_optax.lbw_adamw(lr)``.
      every_k: micro-steps per update, ``k`` >= 1.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass the micro-batch's loss as ``value=``.

    Raises:
      ValueError: if ``every_k`` is not a positive int.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> tx = lbw_optax.accumulate_gradients(lbw_optax.lbw_adamw(1e-3), every_k=4)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> for loss in (1.0, 2.0, 3.0, 10.0):
      ...     updates, state = tx.update({"w": jnp.ones(3)}, state, params, value=loss)
      >>> float(lbw_optax.telemetry(state)["loss"])
      4.0

    References:
      The accumulation itself is ``optax.MultiSteps``.
    """
    check_positive_int("every_k", every_k)
    multi = optax.MultiSteps(inner, every_k_schedule=every_k)

    def init_fn(params):
        return AccumulateGradientsState(
            value_sum=jnp.zeros([], jnp.float32), inner_state=multi.init(params)
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        value_sum = state.value_sum
        if value is not None:
            value_sum = value_sum + jnp.asarray(value, jnp.float32)
            mean = value_sum / (state.inner_state.mini_step + 1).astype(jnp.float32)
            extra_args = dict(extra_args, value=mean)
        updates, inner_state = multi.update(updates, state.inner_state, params, **extra_args)
        # A new window starts from zero by a select: MultiSteps multiplies the sums by 0,
        # which keeps a NaN for ever.
        restart = lambda x: jnp.where(inner_state.mini_step == 0, jnp.zeros_like(x), x)
        inner_state = inner_state._replace(acc_grads=jax.tree.map(restart, inner_state.acc_grads))
        return updates, AccumulateGradientsState(restart(value_sum), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
