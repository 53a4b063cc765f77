"""Our governance policy: loss- and gradient-aware, with hysteresis and a slew-limited scale."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _validate
from lbw_optax._policy import Decision, Policy
from lbw_optax._regime import Regime
from lbw_optax._sense import Signals

_TINY = 1e-12
# Floors of the standard deviations, so that a perfectly constant signal (variance 0) does not
# turn float rounding into a huge z-score: relative to the loss level, and in log-norm units.
_LOSS_SD_FLOOR = 1e-3
_LOG_NORM_SD_FLOOR = 1e-2
_DAMPING_REGIMES = (Regime.STRESSED, Regime.OSCILLATION, Regime.SPIKE)


class GovernorState(NamedTuple):
    """State of :func:`governor_policy`. All fields are scalars.

    Attributes:
      observed: int32, finite steps observed so far.
      steps_without_loss: int32, those of them given no loss (``value=``), which the loss
        statistics did not see: they have seen ``observed - steps_without_loss`` losses. (Counted
        this way, a state saved before the field existed, when every step had a loss, resumes
        with the right count, 0.)
      loss_fast: float32, fast EMA of the loss.
      loss_slow: float32, slow EMA of the (winsorised) loss.
      loss_var: float32, slow exponentially weighted variance of the loss.
      log_norm_fast: float32, fast EMA of log ‖g‖.
      log_norm_slow: float32, slow EMA of the (winsorised) log ‖g‖.
      log_norm_var: float32, slow exponentially weighted variance of log ‖g‖.
      pressure_steps: int32, consecutive steps with a stress or oscillation cue.
      calm_steps: int32, consecutive steps with no cue at all.
      consecutive_holds: int32, held steps in a row (bounded by ``max_holds``).
      loss_z: float32, the latest loss z-score.
      grad_z: float32, the latest log-gradient-norm z-score.
      loss_trend: float32, the latest ``loss_fast / loss_slow - 1``.
      grad_trend: float32, the latest ``log_norm_fast - log_norm_slow``.
      alignment: float32, EMA of the gradient–momentum cosine.
      own_scale: float32, the statistical rules' scale (spikes, stress, oscillation).
      pace: float32, the pace controller's scale (slow start, then AIMD on overshoot).
      slow_start: bool, whether the pace is still in its slow start (no overshoot yet).
      since_cut: int32, steps since the pace was last cut.
      update_ratio: float32, the largest per-tensor relative update ``‖Δθ‖/‖θ‖`` the global
        scale alone would have applied (before the per-tensor limiter).
      limited_tensors: int32, tensors the per-tensor limiter cut at the latest step.
      margin: the stability margin's :class:`MarginState`, or :class:`optax.MaskedNode` when
        the margin is off (``margin_low=None``).
      peak_update_norm: float32, the largest inner update norm seen (spikes left out), which
        the annealed limit is relative to; :class:`optax.MaskedNode` when ``limit_anneal=0``.
    """

    observed: jax.Array
    steps_without_loss: jax.Array
    loss_fast: jax.Array
    loss_slow: jax.Array
    loss_var: jax.Array
    log_norm_fast: jax.Array
    log_norm_slow: jax.Array
    log_norm_var: jax.Array
    pressure_steps: jax.Array
    calm_steps: jax.Array
    consecutive_holds: jax.Array
    loss_z: jax.Array
    grad_z: jax.Array
    loss_trend: jax.Array
    grad_trend: jax.Array
    alignment: jax.Array
    own_scale: jax.Array
    pace: jax.Array
    slow_start: jax.Array
    since_cut: jax.Array
    update_ratio: jax.Array
    limited_tensors: jax.Array
    margin: "MarginState | optax.MaskedNode" = optax.MaskedNode()
    peak_update_norm: jax.Array | optax.MaskedNode = optax.MaskedNode()


class MarginState(NamedTuple):
    """State of the governor's stability margin. Float32 scalars but two.

    Attributes:
      last_loss: the loss of the latest finite step.
      predicted_change: the first-order loss change the latest applied step predicted, ``Σ g·Δθ``
        (negative for a descent step; 0 for a held step or before the first).
      actual_change_ema: EMA of the measured change, ``loss_t - loss_{t-1}``.
      predicted_change_ema: EMA of the predicted change of the step before.
      margin_ratio: the latest ``actual_ema / predicted_ema`` (1 while nothing was predicted).
      margin_factor: the margin's scale factor, in ``[min_scale, 1]``.
      since_margin_cut: int32, steps since the factor was last cut (saturates at ``cooldown``).
      margin_skip: bool, the latest step was a spike or held: its loss change is not evidence.
    """

    last_loss: jax.Array
    predicted_change: jax.Array
    actual_change_ema: jax.Array
    predicted_change_ema: jax.Array
    margin_ratio: jax.Array
    margin_factor: jax.Array
    since_margin_cut: jax.Array
    margin_skip: jax.Array


def _ema(mean: jax.Array, x: jax.Array, decay: float) -> jax.Array:
    # Written as mean + (1-d)(x-mean) so that a constant signal stays exactly constant.
    return mean + (1.0 - decay) * (x - mean)


def _ew_var(var: jax.Array, mean: jax.Array, x: jax.Array, decay: float) -> jax.Array:
    return decay * (var + (1.0 - decay) * jnp.square(x - mean))


@dataclasses.dataclass(frozen=True)
class GovernorPolicy(Policy):
    """Our governance policy; build it with :func:`governor_policy`."""

    min_scale: float = 0.1
    max_scale: float = 1.0
    warmup: int = 10
    fast_decay: float = 0.9
    slow_decay: float = 0.99
    spike_z: float = 4.0
    hold_z: float = 8.0
    hold_ratio: float = 10.0
    min_spike_rise: float = 0.05
    stress_trend: float = 0.02
    oscillation_trend: float = 0.1
    dwell: int = 5
    calm_steps: int = 20
    damping: float = 0.0
    spike_factor: float = 1.0
    release: float = 0.01
    max_holds: int = 2
    overshoot_cos: float | None = None
    alignment_decay: float = 0.9
    initial_scale: float = 1.0
    growth: float = 1.0
    pace_cut: float = 1.0
    pace_release: float = 0.01
    cooldown: int = 10
    max_update_ratio: float | None = 0.035
    param_floor: float = 0.02
    limit_anneal: float = 0.5
    margin_low: float | None = None
    margin_cut: float = 0.5
    margin_release: float = 0.02
    margin_decay: float = 0.9
    margin_warmup: int = 3

    def __post_init__(self):
        _validate.check_positive("max_scale", self.max_scale)
        _validate.check_in_range("min_scale", self.min_scale, 0.0, self.max_scale, closed="right")
        _validate.check_non_negative_int("warmup", self.warmup)
        _validate.check_in_range("fast_decay", self.fast_decay, 0.0, 1.0, closed="left")
        _validate.check_in_range("slow_decay", self.slow_decay, self.fast_decay, 1.0, closed="left")
        _validate.check_positive("spike_z", self.spike_z)
        _validate.check_positive("hold_z", self.hold_z)
        _validate.check_ordered("spike_z", self.spike_z, "hold_z", self.hold_z)
        _validate.check_in_range("hold_ratio", self.hold_ratio, 1.0, float("inf"), closed="neither")
        _validate.check_non_negative("min_spike_rise", self.min_spike_rise)
        _validate.check_non_negative("stress_trend", self.stress_trend)
        _validate.check_non_negative("oscillation_trend", self.oscillation_trend)
        _validate.check_positive_int("dwell", self.dwell)
        _validate.check_positive_int("calm_steps", self.calm_steps)
        _validate.check_in_range("damping", self.damping, 0.0, 1.0, closed="left")
        _validate.check_in_range("spike_factor", self.spike_factor, 0.0, 1.0, closed="right")
        _validate.check_non_negative("release", self.release)
        _validate.check_non_negative_int("max_holds", self.max_holds)
        if self.overshoot_cos is not None:
            _validate.check_in_range("overshoot_cos", self.overshoot_cos, -1.0, 1.0)
        _validate.check_in_range("alignment_decay", self.alignment_decay, 0.0, 1.0, closed="left")
        _validate.check_in_range("initial_scale", self.initial_scale, self.min_scale, 1.0)
        _validate.check_in_range("growth", self.growth, 1.0, float("inf"), closed="left")
        _validate.check_in_range("pace_cut", self.pace_cut, 0.0, 1.0, closed="right")
        _validate.check_non_negative("pace_release", self.pace_release)
        _validate.check_non_negative_int("cooldown", self.cooldown)
        if self.max_update_ratio is not None:
            _validate.check_positive("max_update_ratio", self.max_update_ratio)
        _validate.check_non_negative("param_floor", self.param_floor)
        _validate.check_non_negative("limit_anneal", self.limit_anneal)
        if self.margin_low is not None:
            _validate.check_in_range("margin_low", self.margin_low, -1.0, 1.0)
            if self.max_update_ratio is None:
                raise ValueError(
                    "margin_low needs max_update_ratio: the margin reads the per-tensor update "
                    "norms the limiter senses"
                )
        _validate.check_in_range("margin_cut", self.margin_cut, 0.0, 1.0, closed="right")
        _validate.check_non_negative("margin_release", self.margin_release)
        _validate.check_in_range("margin_decay", self.margin_decay, 0.0, 1.0, closed="left")
        _validate.check_non_negative_int("margin_warmup", self.margin_warmup)
        if self.initial_scale < 1.0 and self.growth == 1.0 and self.pace_release == 0.0:
            raise ValueError(
                f"initial_scale={self.initial_scale} < 1 needs growth > 1 or pace_release > 0, "
                "or the pace never reaches 1"
            )

    # It reads the loss when given (Signals.loss_seen) and runs on the gradients without it.
    needs_value = False

    @property
    def needs_momentum(self) -> bool:
        return self.overshoot_cos is not None

    @property
    def needs_tensor_norms(self) -> bool:
        return self.max_update_ratio is not None

    @property
    def needs_grad_update_dots(self) -> bool:
        return self.margin_low is not None

    @property
    def paced(self) -> bool:
        """Whether the overshoot cue drives the pace (AIMD) instead of the damping rules."""
        return self.pace_cut < 1.0 and self.overshoot_cos is not None

    @property
    def scale_bounds(self) -> tuple[float, float]:
        return (self.min_scale, self.max_scale)

    def init(self) -> GovernorState:
        zero = jnp.zeros([], jnp.float32)
        izero = jnp.zeros([], jnp.int32)
        return GovernorState(
            observed=izero,
            steps_without_loss=izero,
            loss_fast=zero,
            loss_slow=zero,
            loss_var=zero,
            log_norm_fast=zero,
            log_norm_slow=zero,
            log_norm_var=zero,
            pressure_steps=izero,
            calm_steps=izero,
            consecutive_holds=izero,
            loss_z=zero,
            grad_z=zero,
            loss_trend=zero,
            grad_trend=zero,
            alignment=zero,
            own_scale=jnp.ones([], jnp.float32),
            pace=jnp.asarray(self.initial_scale, jnp.float32),
            slow_start=jnp.asarray(self.growth > 1.0),
            since_cut=izero,
            update_ratio=zero,
            limited_tensors=izero,
            margin=optax.MaskedNode() if self.margin_low is None else self._margin_init(),
            peak_update_norm=zero if self.limit_anneal > 0 else optax.MaskedNode(),
        )

    def _margin_init(self) -> MarginState:
        zero = jnp.zeros([], jnp.float32)
        return MarginState(
            last_loss=zero,
            predicted_change=zero,
            actual_change_ema=zero,
            predicted_change_ema=zero,
            margin_ratio=jnp.ones([], jnp.float32),
            margin_factor=jnp.ones([], jnp.float32),
            since_margin_cut=jnp.asarray(self.cooldown, jnp.int32),
            margin_skip=jnp.array(True),  # The first step has no predecessor to compare with.
        )

    def _margin_factor(self, m: MarginState, loss, observed, loss_seen) -> MarginState:
        """Compares the loss change since the last step with the change that step predicted;
        shrinks the factor when the ratio of their EMAs falls below ``margin_low``.
        ``observed`` counts the earlier steps with a loss; a step without one is no evidence."""
        evidence = ~m.margin_skip & loss_seen
        seed = observed <= 1  # The first comparison seeds the EMAs.
        actual = loss - m.last_loss
        ema = lambda old, x: jnp.where(seed, x, _ema(old, x, self.margin_decay))
        actual_change_ema = jnp.where(
            evidence, ema(m.actual_change_ema, actual), m.actual_change_ema
        )
        predicted_change_ema = jnp.where(
            evidence, ema(m.predicted_change_ema, m.predicted_change), m.predicted_change_ema
        )
        # Only a predicted decrease is a prediction to test; otherwise no evidence of trouble.
        descending = predicted_change_ema < 0.0
        ratio = jnp.where(
            descending, actual_change_ema / jnp.where(descending, predicted_change_ema, -1.0), 1.0
        )
        ready = observed > self.margin_warmup
        cut = ready & evidence & (ratio < self.margin_low) & (m.since_margin_cut >= self.cooldown)
        factor = jnp.where(
            cut, m.margin_factor * self.margin_cut, m.margin_factor + self.margin_release
        )
        return m._replace(
            actual_change_ema=actual_change_ema,
            predicted_change_ema=predicted_change_ema,
            margin_ratio=ratio.astype(jnp.float32),
            margin_factor=jnp.clip(factor, self.min_scale, 1.0).astype(jnp.float32),
            since_margin_cut=jnp.where(
                cut, 0, jnp.minimum(m.since_margin_cut + 1, self.cooldown)
            ).astype(jnp.int32),
        )

    def decide(self, signals: Signals, state: GovernorState, *, step, scale, regime):
        del step  # The governor counts the finite steps it observed instead.
        first = state.observed == 0
        warm = state.observed >= self.warmup
        loss = signals.loss
        # The loss cues read the steps that were given their loss; a step without one (a
        # wrapper that does not forward value=) has none, and leaves the loss statistics.
        seen = jnp.asarray(signals.loss_seen)
        losses_seen = state.observed - state.steps_without_loss
        loss_first = losses_seen == 0
        loss_warm = seen & (losses_seen >= self.warmup)
        log_norm = jnp.log(signals.grad_norm + _TINY)

        # Interpret: z-scores against the statistics *before* this step.
        loss_sd = jnp.maximum(
            jnp.sqrt(state.loss_var), _LOSS_SD_FLOOR * jnp.abs(state.loss_slow) + _TINY
        )
        norm_sd = jnp.maximum(jnp.sqrt(state.log_norm_var), _LOG_NORM_SD_FLOOR)
        loss_z = jnp.where(loss_first | ~seen, 0.0, (loss - state.loss_slow) / loss_sd)
        grad_z = jnp.where(first, 0.0, (log_norm - state.log_norm_slow) / norm_sd)
        loss_rise = jnp.where(loss_first, 0.0, loss / (jnp.abs(state.loss_slow) + _TINY) - 1.0)
        loss_outlier = lambda z: loss_warm & (loss_z > z) & (loss_rise > self.min_spike_rise)
        # A gradient norm hold_ratio times its running (geometric) mean is severe whatever the
        # variance says: early training inflates the variance, and such a step would poison
        # Adam's moments for hundreds of steps.
        norm_jump = jnp.where(first, 0.0, log_norm - state.log_norm_slow)
        huge = norm_jump > jnp.log(self.hold_ratio)
        severe = loss_outlier(self.hold_z) | (warm & ((grad_z > self.hold_z) | huge))
        spike = loss_outlier(self.spike_z) | (warm & ((grad_z > self.spike_z) | huge))

        # Statistics, winsorised once warm so one outlier cannot poison them (during warm-up
        # they take every value, so that they learn the signals' real spread).
        loss_in = jnp.where(
            loss_warm, jnp.minimum(loss, state.loss_slow + self.spike_z * loss_sd), loss
        )
        norm_in = jnp.where(
            warm, jnp.minimum(log_norm, state.log_norm_slow + self.spike_z * norm_sd), log_norm
        )
        seed = lambda old, x, decay: jnp.where(first, x, _ema(old, x, decay))
        loss_seed = lambda old, x, decay: jnp.where(loss_first, x, _ema(old, x, decay))
        loss_fast = jnp.where(
            seen, loss_seed(state.loss_fast, loss_in, self.fast_decay), state.loss_fast
        )
        loss_slow = jnp.where(
            seen, loss_seed(state.loss_slow, loss_in, self.slow_decay), state.loss_slow
        )
        loss_var = jnp.where(
            seen & ~loss_first,
            _ew_var(state.loss_var, state.loss_slow, loss_in, self.slow_decay),
            jnp.where(seen, 0.0, state.loss_var),
        )
        log_norm_fast = seed(state.log_norm_fast, norm_in, self.fast_decay)
        log_norm_slow = seed(state.log_norm_slow, norm_in, self.slow_decay)
        log_norm_var = jnp.where(
            first, 0.0, _ew_var(state.log_norm_var, state.log_norm_slow, norm_in, self.slow_decay)
        )
        # 0 until a loss is seen (its statistics are still 0, not a falling loss).
        loss_trend = jnp.where(
            loss_first & ~seen, 0.0, loss_fast / (jnp.abs(loss_slow) + _TINY) - 1.0
        )
        grad_trend = log_norm_fast - log_norm_slow
        alignment = jnp.where(
            state.observed <= 1,  # The first step has no momentum to align with.
            signals.grad_momentum_cos,
            _ema(state.alignment, signals.grad_momentum_cos, self.alignment_decay),
        )
        overshoot = (
            alignment < self.overshoot_cos if self.overshoot_cos is not None else jnp.array(False)
        )
        # Paced, the overshoot cue is read from the second step on (a cosine needs no
        # statistics; the first step has no momentum yet) and drives the pace below.
        overshooting = jnp.array(False) if self.paced else warm & overshoot
        stressed = loss_warm & (loss_trend > self.stress_trend)
        oscillating = (warm & (grad_trend > self.oscillation_trend)) | overshooting
        pressure = stressed | oscillating

        # Hysteresis: pressure must persist `dwell` steps to engage; calm must persist
        # `calm_steps` steps before a damping regime gives way to recovery.
        pressure_steps = jnp.where(pressure, state.pressure_steps + 1, 0)
        calm_steps = jnp.where(pressure | spike, 0, state.calm_steps + 1)
        engaged = pressure_steps >= self.dwell
        was_damping = jnp.isin(regime, jnp.array(_DAMPING_REGIMES))
        settled = calm_steps >= self.calm_steps
        below_max = scale < self.max_scale
        new_regime = jnp.select(
            [
                spike,
                engaged & stressed,
                engaged,
                was_damping & ~settled,
                below_max,
            ],
            [Regime.SPIKE, Regime.STRESSED, Regime.OSCILLATION, regime, Regime.RECOVERY],
            Regime.STABLE,
        ).astype(jnp.int32)

        # Control: a bounded, slew-limited scale.
        scale = state.own_scale
        cut = jnp.select(
            [spike, engaged & stressed, engaged],
            [self.spike_factor, 1.0 - self.damping, 1.0 - 0.5 * self.damping],
            1.0,
        )
        damping_now = spike | engaged
        sticky = was_damping & ~settled & ~damping_now
        new_scale = jnp.where(
            damping_now,
            scale * cut,
            jnp.where(sticky, scale, scale + self.release),
        )
        own_scale = jnp.clip(new_scale, self.min_scale, self.max_scale)

        # Pace: slow start (multiplicative growth until the first overshoot), then additive
        # increase and a multiplicative cut on overshoot, at most once per `cooldown` steps.
        congested = (
            (state.observed >= 1) & overshoot & (state.since_cut >= self.cooldown)
            if self.paced
            else jnp.array(False)
        )
        slow_start = state.slow_start & ~congested
        grown = jnp.where(slow_start, state.pace * self.growth, state.pace + self.pace_release)
        calm_pace = jnp.where(overshoot & self.paced, state.pace, grown)
        pace = jnp.clip(
            jnp.where(congested, state.pace * self.pace_cut, calm_pace), self.min_scale, 1.0
        )
        since_cut = jnp.where(congested, 0, jnp.minimum(state.since_cut + 1, self.cooldown))
        margin = state.margin
        margin_factor = 1.0
        if self.margin_low is not None:
            margin = self._margin_factor(margin, loss, losses_seen, seen)
            margin_factor = margin.margin_factor
        new_scale = jnp.clip(own_scale * pace * margin_factor, self.min_scale, self.max_scale)

        # Per-tensor limiter: no tensor moves more than max_update_ratio of its norm (floored
        # at param_floor·√size, for tensors that start at zero) in one step.
        # Annealed (limit_anneal > 0), the limit follows the inner update's norm relative to
        # its peak, so that it decays with the learning-rate schedule.
        peak_update_norm = state.peak_update_norm
        limit = self.max_update_ratio
        if self.limit_anneal > 0 and self.max_update_ratio is not None:
            peak_update_norm = jnp.where(
                spike, peak_update_norm, jnp.maximum(peak_update_norm, signals.update_norm)
            )
            relative = signals.update_norm / jnp.where(peak_update_norm > 0, peak_update_norm, 1.0)
            limit = limit * jnp.clip(relative, 0.0, 1.0) ** self.limit_anneal
        if self.max_update_ratio is None or self.min_scale == self.max_scale:  # Pinned: none.
            tensor_scale, update_ratio, limited = 1.0, jnp.zeros([], jnp.float32), 0
        else:
            ref = jnp.maximum(
                signals.tensor_param_norms, self.param_floor * jnp.sqrt(signals.tensor_sizes)
            )
            ratio = new_scale * signals.tensor_update_norms / ref
            tensor_scale = jnp.where(
                ratio > limit, limit / jnp.where(ratio > 0, ratio, 1.0), 1.0
            ).astype(jnp.float32)
            update_ratio = jnp.max(ratio, initial=0.0)
            limited = jnp.sum(ratio > limit)

        # A hold is a cut to zero, so a policy pinned to one scale never holds.
        can_hold = self.min_scale < self.max_scale
        hold = severe & (state.consecutive_holds < self.max_holds) & can_hold
        if self.margin_low is not None:
            # The first-order change this step predicts: Σ g·Δθ over the applied update.
            predicted = new_scale * jnp.sum(tensor_scale * signals.tensor_grad_update_dots)
            margin = margin._replace(
                last_loss=jnp.where(seen, loss, margin.last_loss),
                predicted_change=jnp.where(hold, 0.0, predicted).astype(jnp.float32),
                margin_skip=spike | hold | ~seen,
            )
        new_state = GovernorState(
            observed=state.observed + 1,
            steps_without_loss=(state.steps_without_loss + ~seen).astype(jnp.int32),
            loss_fast=loss_fast,
            loss_slow=loss_slow,
            loss_var=loss_var,
            log_norm_fast=log_norm_fast,
            log_norm_slow=log_norm_slow,
            log_norm_var=log_norm_var,
            pressure_steps=pressure_steps.astype(jnp.int32),
            calm_steps=calm_steps.astype(jnp.int32),
            consecutive_holds=jnp.where(hold, state.consecutive_holds + 1, 0).astype(jnp.int32),
            loss_z=loss_z,
            grad_z=grad_z,
            loss_trend=loss_trend,
            grad_trend=grad_trend,
            alignment=alignment,
            own_scale=own_scale.astype(jnp.float32),
            pace=pace.astype(jnp.float32),
            slow_start=slow_start,
            since_cut=since_cut.astype(jnp.int32),
            update_ratio=jnp.asarray(update_ratio, jnp.float32),
            limited_tensors=jnp.asarray(limited, jnp.int32),
            margin=margin,
            peak_update_norm=peak_update_norm,
        )
        decision = Decision(
            regime=new_regime,
            scale=new_scale.astype(jnp.float32),
            hold=hold,
            tensor_scale=tensor_scale,
        )
        return decision, new_state


def governor_policy(
    *,
    min_scale: float = 0.1,
    max_scale: float = 1.0,
    warmup: int = 10,
    fast_decay: float = 0.9,
    slow_decay: float = 0.99,
    spike_z: float = 4.0,
    hold_z: float = 8.0,
    hold_ratio: float = 10.0,
    min_spike_rise: float = 0.05,
    stress_trend: float = 0.02,
    oscillation_trend: float = 0.1,
    dwell: int = 5,
    calm_steps: int = 20,
    damping: float = 0.0,
    spike_factor: float = 1.0,
    release: float = 0.01,
    max_holds: int = 2,
    overshoot_cos: float | None = None,
    alignment_decay: float = 0.9,
    initial_scale: float = 1.0,
    growth: float = 1.0,
    pace_cut: float = 1.0,
    pace_release: float = 0.01,
    cooldown: int = 10,
    max_update_ratio: float | None = 0.035,
    param_floor: float = 0.02,
    limit_anneal: float = 0.5,
    margin_low: float | None = None,
    margin_cut: float = 0.5,
    margin_release: float = 0.02,
    margin_decay: float = 0.9,
    margin_warmup: int = 3,
) -> GovernorPolicy:
    r"""Our governance policy: a per-tensor update limiter, regimes read from the loss and the
    gradients, holds on severe spikes.

    **Limit** (every step from the first, no statistics needed): each tensor's applied update
    is cut, if needed, so that its norm is at most ``max_update_ratio`` times the tensor's
    norm before the step, the norm floored at ``param_floor·√size`` (for tensors that start at
    zero, LoRA's B or biases): the factor ``min(1, r·max(‖θ‖, floor·√n) / (scale·‖u‖))``
    (trust-ratio style; Kosson et al. 2024 on the angular update; LARS/LAMB). Calibrated on the
    quick probe so that it barely binds at the swept base learning rate and holds a stressed
    learning rate to a productive step from step 1, before a statistic could react.

    With ``limit_anneal = p > 0`` the limit follows the schedule: it is
    ``max_update_ratio · (‖u‖ / peak ‖u‖)^p``, where ``‖u‖`` is the inner update's global norm
    and the peak its largest value so far (spikes left out). A learning rate far above the
    productive one is held at the limit through the whole run, so with a fixed limit the
    run never anneals; the annealed limit decays as the inner update does, as the run at the
    productive rate would.

    **Sense** (every step, on device): the loss :math:`\ell` (``value=``) and the global
    gradient norm :math:`\|g\|`. A step given no loss (a wrapper that does not forward
    ``value=``, as ``flax.training.train_state.TrainState`` and ``optax.lookahead``) runs with
    its loss cues off: no loss z-score, trend, spike or margin, and the loss statistics keep
    their values (``steps_without_loss`` counts those steps); the limiter and the
    gradient cues need no loss. Running statistics: fast and slow EMAs of :math:`\ell` and of
    :math:`\log\|g\|`, and slow exponentially weighted variances. Inputs to the statistics are
    winsorised at ``slow + spike_z·sd`` after warm-up, so an outlier moves them a bounded amount.

    **Interpret** (after ``warmup`` observed steps; before that the regime is ``STABLE`` and
    the scale untouched):

    - *spike*: loss z-score ``(ℓ - slow)/sd > spike_z`` with the loss at least
      ``min_spike_rise`` above its slow mean, or log-norm z-score ``> spike_z``; *severe* the
      same with ``hold_z``, or a gradient norm more than ``hold_ratio`` times its running
      geometric mean (the variance can be inflated by early training).
    - *stress cue*: the loss is rising, ``loss_fast / loss_slow - 1 > stress_trend``.
    - *oscillation cue*: the gradient norm is growing,
      ``log_norm_fast - log_norm_slow > oscillation_trend`` (the symptom of steps that
      overshoot a sharpening valley).

    Regimes with hysteresis: ``SPIKE`` at once on a spike; ``STRESSED`` (or ``OSCILLATION``
    when only the norm cue is on) once a cue has held for ``dwell`` consecutive steps; a
    damping regime is kept until no cue has been seen for ``calm_steps`` steps, then
    ``RECOVERY`` until the scale is back at ``max_scale``, then ``STABLE``.

    **Control** (of the global scale; these cuts are off by default, ``damping=0``,
    ``spike_factor=1``, ``overshoot_cos=None``, since the probe measured that with the limiter
    they cost: the regimes are still read and reported): spike: ``scale ·= spike_factor``;
    engaged stress: ``scale ·= 1 - damping``;
    engaged oscillation: ``scale ·= 1 - damping/2``; a damping regime without a current cue
    keeps its scale; otherwise ``scale += release``. The scale is clipped to
    ``[min_scale, max_scale]``, so it moves down by at most one bounded factor and up by at most
    ``release`` per step. A severe spike also **holds** the step (zero update, inner state not
    advanced), at most ``max_holds`` steps in a row so a lasting level shift is eventually
    accepted. With constant loss and gradients no cue ever fires and the guard is the identity;
    with ``min_scale == max_scale`` the policy is pinned (it never holds nor limits).

    **Pace** (off by default; measured worse than AdamW on the probe): with ``pace_cut < 1``
    and an ``overshoot_cos``, the gradient–momentum alignment EMA drives a second factor from
    the second step on: a slow start from ``initial_scale`` (×``growth`` per step) until the
    first overshoot (alignment below ``overshoot_cos``), then ×``pace_cut`` on each overshoot
    at most once per ``cooldown`` steps and ``+pace_release`` per step otherwise (AIMD).

    **Stability margin** (off by default, ``margin_low=None``; measured no better than the
    limiter alone on the probe: the loss change is noise-dominated once the loss plateaus, at
    every learning rate): each step predicts the first-order change of the loss it makes,
    ``Σ g·Δθ`` over the applied update (each tensor's ``g·u`` sensed with the limiter's norms,
    one more read of the gradients). The next loss tells the measured change. The ratio of
    their EMAs (``margin_decay``; steps next to a spike or hold left out) is the trust-region
    ratio: near 1 while the first-order model holds, near 0 or negative when the steps
    overshoot. After ``margin_warmup`` steps, a ratio below ``margin_low`` cuts a third factor
    by ``margin_cut`` (at most once per ``cooldown`` steps); otherwise it grows by
    ``margin_release`` per step, up to 1.

    Args:
      min_scale: lower bound of the scale, in (0, ``max_scale``].
      max_scale: upper bound of the scale (> 0); 1 means "never faster than the inner optimizer".
      warmup: finite steps observed before any control (>= 0).
      fast_decay: decay of the fast EMAs, in [0, 1).
      slow_decay: decay of the slow EMAs and variances, in [``fast_decay``, 1).
      spike_z: z-score that marks a spike (> 0).
      hold_z: z-score that marks a severe spike to hold (>= ``spike_z``).
      hold_ratio: a gradient norm this many times its running geometric mean is a severe
        spike whatever its z-score (> 1).
      min_spike_rise: relative rise of the loss above its slow mean also required for a loss
        spike (>= 0).
      stress_trend: relative loss rise that is a stress cue (>= 0).
      oscillation_trend: log gradient-norm growth that is an oscillation cue (>= 0).
      dwell: consecutive cue steps before damping engages (>= 1).
      calm_steps: consecutive calm steps before recovery (>= 1).
      damping: per-step multiplicative cut while stressed, in [0, 1).
      spike_factor: multiplicative cut on a spike, in (0, 1].
      release: per-step additive release while recovering (>= 0).
      max_holds: most consecutive held steps (>= 0; 0 never holds).
      overshoot_cos: alignment EMA below which the steps overshoot (an oscillation cue, or the
        pace's congestion signal), in [-1, 1]; ``None``: not sensed.
      alignment_decay: decay of the alignment EMA, in [0, 1).
      initial_scale, growth, pace_cut, pace_release, cooldown: the pace (above).
      max_update_ratio: the per-tensor limit on ``‖Δθ‖ / ‖θ‖`` per step (> 0); ``None``: no
        limiter (and the update is not sensed).
      param_floor: the floor of ``‖θ‖`` as a root-mean-square (>= 0).
      limit_anneal: the exponent of the limit's decay with the inner update norm relative to
        its peak (>= 0; 0: a fixed limit, as in v2; default 0.5).
      margin_low: the trust-region ratio below which the margin cuts, in [-1, 1]; ``None``:
        no margin (and ``g·u`` is not sensed). Needs ``max_update_ratio``.
      margin_cut, margin_release, margin_decay, margin_warmup: the margin (above).

    Returns:
      A :class:`GovernorPolicy` for :func:`~lbw_optax.guard`.

    Example:
      >>> import optax, lbw_optax
      >>> tx = lbw_optax.guard(optax.adamw(1e-3), policy=lbw_optax.governor_policy(warmup=10))
    """
    # Every argument is a field of the same name (tests/test_api.py checks the defaults).
    return GovernorPolicy(**locals())
