"""Skip-step: skip updates whose loss or gradient norm spikes over a rolling window."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _common
from lbw_optax._validate import check_ordered, check_positive, check_positive_int


class SkipStepState(NamedTuple):
    """State of :func:`skip_step`: the rolling windows, the record and the inner state.

    Attributes:
      skipstep_count: int32, updates seen (1 after the first update).
      skip_loss_window: float32 ``[window]``, ring buffer of the latest finite losses.
      skip_grad_norm_window: float32 ``[window]``, ring buffer of the matching pre-clip
        global gradient norms.
      skip_recorded: int32, finite steps written into the windows so far (the next slot is
        ``skip_recorded % window``; the windows hold ``min(skip_recorded, window)`` values).
      skipstep_loss: float32, the latest finite loss.
      skipstep_grad_norm: float32, the latest finite pre-clip global gradient norm.
      skipstep_skipped: bool, whether the latest step was skipped.
      skipstep_skipped_steps: int32, skipped steps so far (non-finite ones included).
      skipstep_nonfinite_steps: int32, steps whose loss or gradients were NaN/Inf.
      inner_state: the wrapped transformation's state.
    """

    skipstep_count: jax.Array
    skip_loss_window: jax.Array
    skip_grad_norm_window: jax.Array
    skip_recorded: jax.Array
    skipstep_loss: jax.Array
    skipstep_grad_norm: jax.Array
    skipstep_skipped: jax.Array
    skipstep_skipped_steps: jax.Array
    skipstep_nonfinite_steps: jax.Array
    inner_state: Any
    # What lbw_optax.telemetry reports.
    telemetry_fields = (
        "skipstep_count",
        "skip_loss_window",
        "skip_grad_norm_window",
        "skip_recorded",
        "skipstep_loss",
        "skipstep_grad_norm",
        "skipstep_skipped",
        "skipstep_skipped_steps",
        "skipstep_nonfinite_steps",
    )


def _window_mean_std(window: jax.Array, filled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and sample standard deviation (ddof=1) of the first ``filled`` slots."""
    valid = jnp.arange(window.shape[0]) < filled
    n = filled.astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, window, 0.0)) / jnp.maximum(n, 1.0)
    sq = jnp.sum(jnp.where(valid, (window - mean) ** 2, 0.0))
    return mean, jnp.sqrt(sq / jnp.maximum(n - 1.0, 1.0))


def skip_step(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    sigma_factor: float = 6.0,
    min_history: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips the step when the loss or the gradient norm is a ``sigma_factor``-σ outlier.

    Keeps a rolling window of the last ``window`` finite losses (``value=``) and pre-clip
    global gradient norms. Once at least ``min_history`` steps are recorded (by default
    ``window // 2 - 1``: with the step itself, half a window, as OLMo-core requires; the
    first skip can come at step 64 with the default window), a step is skipped when

    .. math::
      \ell_t > \bar\ell + k\,s_\ell \quad\text{or}\quad
      \|g_t\| > \overline{\|g\|} + k\,s_{\|g\|},

    with means and sample standard deviations (ddof = 1) over the window *before* step
    :math:`t`, :math:`k` = ``sigma_factor``. A skipped step returns a zero update and keeps
    the inner state (Adam's moments and step count) unchanged. Non-finite loss or gradients
    (or a norm that overflows float32) are skipped too.

    Every finite step is recorded in the window, spikes included (as in OLMo-core), so a
    lasting level shift is accepted after a while; a non-finite value is never recorded, so
    one NaN cannot poison the window. No host synchronisation happens.

    OLMo-core, Levanter and MaxText always pair it with global-norm clipping at 1.0, inside:
    ``skip_step(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)))`` decides on the
    loss and the pre-clip norm, and a step that is not skipped applies AdamW to the clipped
    gradients (OLMo-core's ``SkipStepAdamWConfig`` with ``max_grad_norm=1.0``,
    ``src/examples/moe/train.py``, commit fa6c501, lines 114 and 129).

    Args:
      inner: the transformation to protect (e.g. ``optax.adamw(1e-3)``); it receives the
        gradients, ``params`` and every extra argument, ``value`` included.
      window: length of the rolling window, >= 2.
      sigma_factor: k, the number of standard deviations over the mean that skips, > 0.
      min_history: recorded steps needed before any spike is skipped, in [2, window];
        ``None`` for ``max(2, window // 2 - 1)``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
      ``(updates, state, params=None, *, value, **extra_args)`` and raises ``ValueError``
      without ``value``.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> tx = lbw_optax.peers.skip_step(optax.adamw(1e-3), window=8, min_history=4)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> for loss in (2.0, 2.1, 1.9, 2.0, 20.0):
      ...     grads = {"w": jnp.full(3, 0.1)}
      ...     updates, state = tx.update(grads, state, params, value=jnp.float32(loss))
      >>> bool(lbw_optax.telemetry(state)["skipstep_skipped"])
      True

    References:
      ``olmo_core.optim.SkipStepOptimizer`` in `OLMo-core <https://github.com/allenai/OLMo-core>`_,
      ``src/olmo_core/optim/skip_step_optimizer.py`` (commit fa6c501): 128 steps and 6σ
      (lines 37-38), no skip while fewer than ``max(2, window // 2)`` losses, the current one
      included, are stored (line 94), mean and ddof-1 std of the earlier ones (lines 97, 101).
      Levanter and MaxText skip steps by the same rule.
    """
    window = _common.check(_check_at_least_two, "window", window)
    if min_history is None:  # Traced under optax.inject_hyperparams: a traced default.
        traced = isinstance(window, jax.core.Tracer)
        min_history = jnp.maximum(2, window // 2 - 1) if traced else max(2, int(window) // 2 - 1)
    _common.check(check_positive, "sigma_factor", sigma_factor)
    min_history = _common.check(_check_at_least_two, "min_history", min_history)
    if not any(isinstance(v, jax.core.Tracer) for v in (window, min_history)):
        check_ordered("min_history", min_history, "window", window)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        zero = jnp.zeros([], jnp.float32)
        state = SkipStepState(
            skipstep_count=jnp.zeros([], jnp.int32),
            skip_loss_window=jnp.zeros([int(window)], jnp.float32),
            skip_grad_norm_window=jnp.zeros([int(window)], jnp.float32),
            skip_recorded=jnp.zeros([], jnp.int32),
            skipstep_loss=zero,
            skipstep_grad_norm=zero,
            skipstep_skipped=jnp.array(False),
            skipstep_skipped_steps=jnp.zeros([], jnp.int32),
            skipstep_nonfinite_steps=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )
        return _common.distinct_buffers(state)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        if value is None:
            raise ValueError(
                "skip_step compares the loss with its rolling window: pass it as "
                "tx.update(grads, state, params, value=loss)"
            )
        loss = jnp.asarray(value, jnp.float32)
        if loss.shape != ():
            raise ValueError(f"value must be the scalar loss of the step, got shape {loss.shape}")
        norm = _common.global_norm(updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(norm)

        filled = jnp.minimum(state.skip_recorded, window)
        loss_mean, loss_std = _window_mean_std(state.skip_loss_window, filled)
        norm_mean, norm_std = _window_mean_std(state.skip_grad_norm_window, filled)
        ready = filled >= min_history
        spike = (loss > loss_mean + sigma_factor * loss_std) | (
            norm > norm_mean + sigma_factor * norm_std
        )
        skip = ~finite | (ready & spike)

        extra_args["value"] = value
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), inner_updates)

        slot = state.skip_recorded % window
        record = lambda buf, x: jnp.where(finite, buf.at[slot].set(x), buf)
        new_state = SkipStepState(
            skipstep_count=optax.safe_increment(state.skipstep_count),
            skip_loss_window=record(state.skip_loss_window, loss),
            skip_grad_norm_window=record(state.skip_grad_norm_window, norm),
            skip_recorded=_common.count_if(state.skip_recorded, finite),
            skipstep_loss=_common.keep_if(finite, loss, state.skipstep_loss),
            skipstep_grad_norm=_common.keep_if(finite, norm, state.skipstep_grad_norm),
            skipstep_skipped=skip,
            skipstep_skipped_steps=_common.count_if(state.skipstep_skipped_steps, skip),
            skipstep_nonfinite_steps=_common.count_if(state.skipstep_nonfinite_steps, ~finite),
            inner_state=optax.tree.where(skip, state.inner_state, inner_state),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_at_least_two(name: str, value: Any) -> None:
    check_positive_int(name, value)
    if value < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
