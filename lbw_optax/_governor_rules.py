"""The governor's decision as small pure functions of arrays, wired by ``GovernorPolicy.decide``.

Each stage is testable alone (``tests/test_governor_rules.py`` restates each in NumPy):

- :func:`update_stats`: the running statistics of one signal (fast and slow EMAs, a slow
  exponentially weighted variance), fed a winsorised input once warm;
- :func:`classify`: z-scores against the statistics before the step, spikes and severe spikes;
- :func:`next_regime`: the regime, with hysteresis (``dwell`` to engage, ``calm_steps`` to let go);
- :func:`control_scale`: the bounded, slew-limited global scale;
- :func:`limit_tensors`: the per-tensor update limiter (trust-ratio style).

The thresholds come from ``knobs``, a :class:`~lbw_optax.GovernorPolicy` (any object with its
fields), so that each stage is a function of arrays and a config.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lbw_optax._regime import Regime

TINY = 1e-12
# Floors of the standard deviations, so that a perfectly constant signal (variance 0) does not
# turn float rounding into a huge z-score: relative to the loss level, and in log-norm units.
LOSS_SD_FLOOR = 1e-3
LOG_NORM_SD_FLOOR = 1e-2
DAMPING_REGIMES = (Regime.STRESSED, Regime.OSCILLATION, Regime.SPIKE)


def ema(mean: jax.Array, x: jax.Array, decay: float) -> jax.Array:
    """``mean + (1 - decay)(x - mean)``: written so that a constant signal stays constant."""
    return mean + (1.0 - decay) * (x - mean)


def ew_var(var: jax.Array, mean: jax.Array, x: jax.Array, decay: float) -> jax.Array:
    """The exponentially weighted variance after ``x``, with ``mean`` the EMA before it."""
    return decay * (var + (1.0 - decay) * jnp.square(x - mean))


class Stats(NamedTuple):
    """The running statistics of one signal (float32 scalars)."""

    fast: jax.Array
    slow: jax.Array
    var: jax.Array


def update_stats(
    stats: Stats,
    x: jax.Array,
    *,
    first: jax.Array,
    seen: jax.Array | bool,
    warm: jax.Array,
    sd: jax.Array,
    knobs: Any,
) -> Stats:
    """The statistics after ``x``: seeded with it on the ``first`` value, kept unchanged when
    not ``seen``; once ``warm`` the input is winsorised at ``slow + spike_z·sd`` so that one
    outlier moves them a bounded amount (``knobs``: ``spike_z``, ``fast_decay``,
    ``slow_decay``)."""
    fast_decay, slow_decay = knobs.fast_decay, knobs.slow_decay
    x_in = jnp.where(warm, jnp.minimum(x, stats.slow + knobs.spike_z * sd), x)
    seeded = lambda old, decay: jnp.where(first, x_in, ema(old, x_in, decay))
    return Stats(
        fast=jnp.where(seen, seeded(stats.fast, fast_decay), stats.fast),
        slow=jnp.where(seen, seeded(stats.slow, slow_decay), stats.slow),
        var=jnp.where(
            seen & ~first,
            ew_var(stats.var, stats.slow, x_in, slow_decay),
            jnp.where(seen, 0.0, stats.var),
        ),
    )


def spreads(loss: Stats, log_norm: Stats) -> tuple[jax.Array, jax.Array]:
    """The floored standard deviations of the loss and of log ‖g‖."""
    loss_sd = jnp.maximum(jnp.sqrt(loss.var), LOSS_SD_FLOOR * jnp.abs(loss.slow) + TINY)
    norm_sd = jnp.maximum(jnp.sqrt(log_norm.var), LOG_NORM_SD_FLOOR)
    return loss_sd, norm_sd


class Progress(NamedTuple):
    """How far the statistics are (bool scalars)."""

    first: jax.Array  # no step observed yet.
    warm: jax.Array  # `warmup` steps observed.
    seen: jax.Array  # this step has its loss.
    loss_first: jax.Array  # no loss observed yet.
    loss_warm: jax.Array  # this step has its loss, and `warmup` losses were observed.


class Spikes(NamedTuple):
    """What :func:`classify` reads from one step."""

    loss_z: jax.Array  # float32, the loss z-score (0 without a loss or statistics).
    grad_z: jax.Array  # float32, the log-gradient-norm z-score (0 on the first step).
    spike: jax.Array  # bool.
    severe: jax.Array  # bool, a spike to hold.


def classify(
    loss: jax.Array,
    log_norm: jax.Array,
    loss_stats: Stats,
    norm_stats: Stats,
    progress: Progress,
    knobs: Any,
) -> Spikes:
    """Z-scores of the loss and log ‖g‖ against the statistics *before* the step.

    A spike: a loss z-score above ``spike_z`` with the loss ``min_spike_rise`` above its slow
    mean, or a log-norm z-score above it; severe: the same above ``hold_z``, or a gradient norm
    ``hold_ratio`` times its running geometric mean whatever the variance says (early training
    inflates the variance, and such a step would poison Adam's moments for hundreds of steps).
    """
    first, warm, seen, loss_first, loss_warm = progress
    spike_z, hold_z, min_spike_rise = knobs.spike_z, knobs.hold_z, knobs.min_spike_rise
    loss_sd, norm_sd = spreads(loss_stats, norm_stats)
    loss_z = jnp.where(loss_first | ~seen, 0.0, (loss - loss_stats.slow) / loss_sd)
    grad_z = jnp.where(first, 0.0, (log_norm - norm_stats.slow) / norm_sd)
    loss_rise = jnp.where(loss_first, 0.0, loss / (jnp.abs(loss_stats.slow) + TINY) - 1.0)
    loss_outlier = lambda z: loss_warm & (loss_z > z) & (loss_rise > min_spike_rise)
    norm_jump = jnp.where(first, 0.0, log_norm - norm_stats.slow)
    huge = norm_jump > jnp.log(knobs.hold_ratio)
    severe = loss_outlier(hold_z) | (warm & ((grad_z > hold_z) | huge))
    spike = loss_outlier(spike_z) | (warm & ((grad_z > spike_z) | huge))
    return Spikes(loss_z=loss_z, grad_z=grad_z, spike=spike, severe=severe)


class RegimeStep(NamedTuple):
    """What :func:`next_regime` decides."""

    regime: jax.Array  # int32, the new regime.
    pressure_steps: jax.Array  # int32, consecutive steps with a stress or oscillation cue.
    calm_streak: jax.Array  # int32, consecutive steps with no cue at all.
    engaged: jax.Array  # bool, a cue has held for `dwell` steps.
    sticky: jax.Array  # bool, a damping regime without a current cue, not yet settled.


def next_regime(
    regime: jax.Array,
    scale: jax.Array,
    *,
    spike: jax.Array,
    stressed: jax.Array,
    pressure: jax.Array,
    pressure_steps: jax.Array,
    calm_streak: jax.Array,
    knobs: Any,
) -> RegimeStep:
    """The regime with hysteresis: ``SPIKE`` at once; ``STRESSED`` (``OSCILLATION`` when only
    the norm cue is on) once a cue (``pressure``) has held ``dwell`` steps; a damping regime is
    kept until no cue has been seen for ``calm_steps`` steps, then ``RECOVERY`` while the
    ``scale`` is below ``max_scale``, then ``STABLE``."""
    pressure_steps = jnp.where(pressure, pressure_steps + 1, 0)
    calm_streak = jnp.where(pressure | spike, 0, calm_streak + 1)
    engaged = pressure_steps >= knobs.dwell
    was_damping = jnp.isin(regime, jnp.array(DAMPING_REGIMES))
    unsettled = was_damping & ~(calm_streak >= knobs.calm_steps)
    new_regime = jnp.select(
        [spike, engaged & stressed, engaged, unsettled, scale < knobs.max_scale],
        [Regime.SPIKE, Regime.STRESSED, Regime.OSCILLATION, regime, Regime.RECOVERY],
        Regime.STABLE,
    ).astype(jnp.int32)
    return RegimeStep(
        regime=new_regime,
        pressure_steps=pressure_steps.astype(jnp.int32),
        calm_streak=calm_streak.astype(jnp.int32),
        engaged=engaged,
        sticky=unsettled & ~(spike | engaged),
    )


def control_scale(
    scale: jax.Array, spike: jax.Array, stressed: jax.Array, step: RegimeStep, knobs: Any
) -> jax.Array:
    """The next scale: ``× spike_factor`` on a spike, ``× (1 - damping)`` engaged and stressed,
    ``× (1 - damping/2)`` engaged otherwise, kept while ``step.sticky``, else ``+ release``;
    clipped to ``[min_scale, max_scale]``."""
    damping, engaged = knobs.damping, step.engaged
    cuts = [knobs.spike_factor, 1.0 - damping, 1.0 - 0.5 * damping]
    cut = jnp.select([spike, engaged & stressed, engaged], cuts, 1.0)
    kept = jnp.where(step.sticky, scale, scale + knobs.release)
    new_scale = jnp.where(spike | engaged, scale * cut, kept)
    return jnp.clip(new_scale, knobs.min_scale, knobs.max_scale)


class Limits(NamedTuple):
    """What :func:`limit_tensors` decides."""

    tensor_scale: jax.Array  # float32 [n], each tensor's factor in (0, 1].
    update_ratio: jax.Array  # float32, the largest ratio before the limit.
    limited: jax.Array  # int32, tensors cut.


def annealed_limit(
    max_update_ratio: float,
    update_norm: jax.Array,
    peak_update_norm: jax.Array,
    *,
    spike: jax.Array,
    limit_anneal: float,
) -> tuple[jax.Array, jax.Array]:
    """``(limit, peak)``: ``max_update_ratio · (‖u‖ / peak ‖u‖)^limit_anneal``, the peak the
    largest inner update norm so far (spikes left out)."""
    peak = jnp.where(spike, peak_update_norm, jnp.maximum(peak_update_norm, update_norm))
    relative = update_norm / jnp.where(peak > 0, peak, 1.0)
    return max_update_ratio * jnp.clip(relative, 0.0, 1.0) ** limit_anneal, peak


def limit_tensors(
    scale: jax.Array,
    update_norms: jax.Array,
    param_norms: jax.Array,
    sizes: jax.Array,
    *,
    limit: jax.Array | float,
    param_floor: float,
) -> Limits:
    """Per-tensor factors so that no tensor moves more than ``limit`` times its norm (floored
    at ``param_floor·√size``, for tensors that start at zero) in one step:
    ``min(1, limit·max(‖θ‖, floor·√n) / (scale·‖u‖))``."""
    ref = jnp.maximum(param_norms, param_floor * jnp.sqrt(sizes))
    ratio = scale * update_norms / ref
    tensor_scale = jnp.where(ratio > limit, limit / jnp.where(ratio > 0, ratio, 1.0), 1.0)
    return Limits(
        tensor_scale=tensor_scale.astype(jnp.float32),
        update_ratio=jnp.max(ratio, initial=0.0).astype(jnp.float32),
        limited=jnp.sum(ratio > limit).astype(jnp.int32),
    )


PEAK_GROWTH = 0.01  # A peak that grows by less than 1 % is settled.


def settle_peak(
    peak: jax.Array, age: jax.Array, ratio: jax.Array, *, spike: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(peak, age)`` after ``ratio``: the largest ratio so far (spikes left out), and the
    steps since it last grew by more than :data:`PEAK_GROWTH`."""
    grew = ~spike & (ratio > peak * (1.0 + PEAK_GROWTH))
    new_peak = jnp.where(spike, peak, jnp.maximum(peak, ratio))
    return new_peak.astype(jnp.float32), jnp.where(grew, 0, age + 1).astype(jnp.int32)


def next_boost(
    boost: jax.Array,
    peak_ratio: jax.Array,
    *,
    calm: jax.Array,
    target_ratio: float,
    max_boost: float,
    release: float,
) -> jax.Array:
    """The trust-ratio floor, the limiter's mirror image: a factor in ``[1, max_boost]`` that
    rises by at most ``release`` per ``calm`` step towards ``target_ratio / peak_ratio`` (what
    would bring the largest relative update seen so far up to the limit), and drops to 1 on
    any step that is not calm. A learning rate whose steps never came near the limit is too
    low; one that reached it gets no boost."""
    want = jnp.where(peak_ratio > 0, target_ratio / jnp.where(peak_ratio > 0, peak_ratio, 1.0), 1.0)
    want = jnp.clip(want, 1.0, max_boost)
    return jnp.where(calm, jnp.minimum(boost + release, want), 1.0).astype(jnp.float32)
