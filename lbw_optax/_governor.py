"""Our governance policy: loss- and gradient-aware, with hysteresis and a per-tensor limiter."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _governor_rules as rules
from lbw_optax import _validate
from lbw_optax._policy import Decision, Policy
from lbw_optax._sense import Signals


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
      calm_streak: int32, consecutive steps with no cue at all (a damping regime lets go when
        it reaches the policy's ``calm_steps``).
      consecutive_holds: int32, held steps in a row (bounded by ``max_holds``).
      loss_z: float32, the latest loss z-score.
      grad_z: float32, the latest log-gradient-norm z-score.
      loss_trend: float32, the latest ``loss_fast / loss_slow - 1``.
      grad_trend: float32, the latest ``log_norm_fast - log_norm_slow``.
      alignment: float32, EMA of the gradient–momentum cosine.
      own_scale: float32, the statistical rules' scale (spikes, stress, oscillation).
      update_ratio: float32, the largest per-tensor relative update ``‖Δθ‖/‖θ‖`` the global
        scale alone would have applied (before the per-tensor limiter).
      limited_tensors: int32, tensors the per-tensor limiter cut at the latest step.
      peak_update_norm: float32, the largest inner update norm seen (spikes left out), which
        the annealed limit is relative to; :class:`optax.MaskedNode` when ``limit_anneal=0``.
      boost: float32, the trust-ratio floor's factor in ``[1, max_boost]``;
        :class:`optax.MaskedNode` when ``max_boost=1``.
      peak_update_ratio: float32, the largest relative update ``‖Δθ‖/‖θ‖`` seen at the
        unboosted scale (spikes left out), which the boost is read from;
        :class:`optax.MaskedNode` when ``max_boost=1``.
      peak_ratio_age: int32, steps since that peak last grew by more than 1 % (the boost
        waits for ``calm_steps`` of them); :class:`optax.MaskedNode` when ``max_boost=1``.
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
    calm_streak: jax.Array
    consecutive_holds: jax.Array
    loss_z: jax.Array
    grad_z: jax.Array
    loss_trend: jax.Array
    grad_trend: jax.Array
    alignment: jax.Array
    own_scale: jax.Array
    update_ratio: jax.Array
    limited_tensors: jax.Array
    peak_update_norm: jax.Array | optax.MaskedNode = optax.MaskedNode()
    boost: jax.Array | optax.MaskedNode = optax.MaskedNode()
    peak_update_ratio: jax.Array | optax.MaskedNode = optax.MaskedNode()
    peak_ratio_age: jax.Array | optax.MaskedNode = optax.MaskedNode()


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
    max_update_ratio: float | None = 0.035
    param_floor: float = 0.02
    limit_anneal: float = 0.5
    max_boost: float = 1.0

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
        if self.max_update_ratio is not None:
            _validate.check_positive("max_update_ratio", self.max_update_ratio)
        _validate.check_non_negative("param_floor", self.param_floor)
        _validate.check_non_negative("limit_anneal", self.limit_anneal)
        _validate.check_in_range("max_boost", self.max_boost, 1.0, float("inf"), closed="left")
        if self.max_boost > 1 and self.max_update_ratio is None:
            raise ValueError(
                "max_boost > 1 needs the limiter: the boost is read from max_update_ratio, "
                "which is None"
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
    def boosts(self) -> bool:
        """Whether the trust-ratio floor is on (``max_boost > 1``, not pinned)."""
        return self.max_boost > 1 and self.min_scale < self.max_scale

    @property
    def scale_bounds(self) -> tuple[float, float]:
        return (self.min_scale, self.max_scale * (self.max_boost if self.boosts else 1.0))

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
            calm_streak=izero,
            consecutive_holds=izero,
            loss_z=zero,
            grad_z=zero,
            loss_trend=zero,
            grad_trend=zero,
            alignment=zero,
            own_scale=jnp.ones([], jnp.float32),
            update_ratio=zero,
            limited_tensors=izero,
            peak_update_norm=zero if self.limit_anneal > 0 else optax.MaskedNode(),
            boost=jnp.ones([], jnp.float32) if self.boosts else optax.MaskedNode(),
            peak_update_ratio=zero if self.boosts else optax.MaskedNode(),
            peak_ratio_age=izero if self.boosts else optax.MaskedNode(),
        )

    def decide(self, signals: Signals, state: GovernorState, *, step, scale, regime):
        del step  # The governor counts the finite steps it observed instead.
        first = state.observed == 0
        warm = state.observed >= self.warmup
        # The loss cues read the steps that were given their loss; a step without one (a
        # wrapper that does not forward value=) has none, and leaves the loss statistics.
        seen = jnp.asarray(signals.loss_seen)
        losses_seen = state.observed - state.steps_without_loss
        loss_first = losses_seen == 0
        loss_warm = seen & (losses_seen >= self.warmup)
        loss, log_norm = signals.loss, jnp.log(signals.grad_norm + rules.TINY)
        old_loss = rules.Stats(state.loss_fast, state.loss_slow, state.loss_var)
        old_norm = rules.Stats(state.log_norm_fast, state.log_norm_slow, state.log_norm_var)

        # Interpret: z-scores against the statistics *before* this step, then the statistics,
        # winsorised once warm (during warm-up they learn the signals' real spread).
        progress = rules.Progress(first, warm, seen, loss_first, loss_warm)
        spikes = rules.classify(loss, log_norm, old_loss, old_norm, progress, self)
        loss_sd, norm_sd = rules.spreads(old_loss, old_norm)
        new_loss = rules.update_stats(
            old_loss, loss, first=loss_first, seen=seen, warm=loss_warm, sd=loss_sd, knobs=self
        )
        new_norm = rules.update_stats(
            old_norm, log_norm, first=first, seen=True, warm=warm, sd=norm_sd, knobs=self
        )
        # 0 until a loss is seen (its statistics are still 0, not a falling loss).
        loss_trend = jnp.where(
            loss_first & ~seen, 0.0, new_loss.fast / (jnp.abs(new_loss.slow) + rules.TINY) - 1.0
        )
        grad_trend = new_norm.fast - new_norm.slow
        alignment = jnp.where(
            state.observed <= 1,  # The first step has no momentum to align with.
            signals.grad_momentum_cos,
            rules.ema(state.alignment, signals.grad_momentum_cos, self.alignment_decay),
        )
        overshoot = warm & (alignment < self.overshoot_cos) if self.needs_momentum else False
        stressed = loss_warm & (loss_trend > self.stress_trend)
        pressure = stressed | (warm & (grad_trend > self.oscillation_trend)) | overshoot

        step_regime = rules.next_regime(
            regime,
            scale,
            spike=spikes.spike,
            stressed=stressed,
            pressure=pressure,
            pressure_steps=state.pressure_steps,
            calm_streak=state.calm_streak,
            knobs=self,
        )
        new_scale = rules.control_scale(
            state.own_scale, spikes.spike, stressed, step_regime, self
        ).astype(jnp.float32)
        boost = state.boost
        if self.boosts:  # Calm: warm, no cue, no damping regime, the peak ratio settled.
            damping = jnp.isin(step_regime.regime, jnp.array(rules.DAMPING_REGIMES))
            settled = state.peak_ratio_age >= self.calm_steps
            boost = rules.next_boost(
                state.boost,
                state.peak_update_ratio,
                calm=warm & ~pressure & ~damping & settled,
                target_ratio=self.max_update_ratio,
                max_boost=self.max_boost,
                release=self.release,
            )
            applied_scale = new_scale * boost
        else:
            applied_scale = new_scale
        limits, peak_update_norm = self._limit(signals, state, applied_scale, spikes.spike)
        peak_update_ratio, peak_ratio_age = state.peak_update_ratio, state.peak_ratio_age
        if self.boosts:
            peak_update_ratio, peak_ratio_age = rules.settle_peak(
                peak_update_ratio,
                peak_ratio_age,
                limits.update_ratio / boost,
                spike=spikes.spike,
            )

        # A hold is a cut to zero, so a policy pinned to one scale never holds.
        can_hold = self.min_scale < self.max_scale
        hold = spikes.severe & (state.consecutive_holds < self.max_holds) & can_hold
        new_state = GovernorState(
            observed=state.observed + 1,
            steps_without_loss=(state.steps_without_loss + ~seen).astype(jnp.int32),
            loss_fast=new_loss.fast,
            loss_slow=new_loss.slow,
            loss_var=new_loss.var,
            log_norm_fast=new_norm.fast,
            log_norm_slow=new_norm.slow,
            log_norm_var=new_norm.var,
            pressure_steps=step_regime.pressure_steps,
            calm_streak=step_regime.calm_streak,
            consecutive_holds=jnp.where(hold, state.consecutive_holds + 1, 0).astype(jnp.int32),
            loss_z=spikes.loss_z,
            grad_z=spikes.grad_z,
            loss_trend=loss_trend,
            grad_trend=grad_trend,
            alignment=alignment,
            own_scale=new_scale,
            update_ratio=limits.update_ratio,
            limited_tensors=limits.limited,
            peak_update_norm=peak_update_norm,
            boost=boost,
            peak_update_ratio=peak_update_ratio,
            peak_ratio_age=peak_ratio_age,
        )
        decision = Decision(step_regime.regime, applied_scale, hold, limits.tensor_scale)
        return decision, new_state

    def _limit(self, signals, state, scale, spike) -> tuple[rules.Limits, jax.Array]:
        """The per-tensor limiter's factors (none when off or pinned) and the new peak."""
        peak_update_norm, limit = state.peak_update_norm, self.max_update_ratio
        if self.limit_anneal > 0 and limit is not None:
            limit, peak_update_norm = rules.annealed_limit(
                limit,
                signals.update_norm,
                peak_update_norm,
                spike=spike,
                limit_anneal=self.limit_anneal,
            )
        if limit is None or self.min_scale == self.max_scale:  # Pinned: none.
            none = rules.Limits(1.0, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32))
            return none, peak_update_norm
        limits = rules.limit_tensors(
            scale,
            signals.tensor_update_norms,
            signals.tensor_param_norms,
            signals.tensor_sizes,
            limit=limit,
            param_floor=self.param_floor,
        )
        return limits, peak_update_norm


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
    max_update_ratio: float | None = 0.035,
    param_floor: float = 0.02,
    limit_anneal: float = 0.5,
    max_boost: float = 1.0,
) -> GovernorPolicy:
    r"""Our governance policy: a per-tensor update limiter, regimes read from the loss and the
    gradients, holds on severe spikes.

    **Limit** (every step from the first, no statistics needed): each tensor's applied update
    is cut, if needed, so that its norm is at most ``max_update_ratio`` times the tensor's
    norm before the step, the norm floored at ``param_floor·√size`` (for tensors that start at
    zero, LoRA's B or biases): the factor ``min(1, r·max(‖θ‖, floor·√n) / (scale·‖u‖))``
    (trust-ratio style; Kosson et al. 2024 on the angular update; LARS/LAMB). A stressed
    learning rate is held to a bounded step from step 1, before a statistic could react.

    With ``limit_anneal = p > 0`` the limit follows the schedule: it is
    ``max_update_ratio · (‖u‖ / peak ‖u‖)^p``, where ``‖u‖`` is the inner update's global norm
    and the peak its largest value so far (spikes left out). A learning rate far above the
    productive one is held at the limit through the whole run, so with a fixed limit the
    run never anneals; the annealed limit decays as the inner update does.

    **Sense** (every step, on device): the loss :math:`\ell` (``value=``) and the global
    gradient norm :math:`\|g\|`. A step given no loss (a wrapper that does not forward
    ``value=``, as ``flax.training.train_state.TrainState`` and ``optax.lookahead``) runs with
    its loss cues off: no loss z-score, trend or spike, and the loss statistics keep their
    values (``steps_without_loss`` counts those steps); the limiter and the gradient cues need
    no loss. Running statistics: fast and slow EMAs of :math:`\ell` and of :math:`\log\|g\|`,
    and slow exponentially weighted variances. Inputs to the statistics are winsorised at
    ``slow + spike_z·sd`` after warm-up, so an outlier moves them a bounded amount.

    **Interpret** (after ``warmup`` observed steps; before that the regime is ``STABLE`` and
    the scale untouched):

    - *spike*: loss z-score ``(ℓ - slow)/sd > spike_z`` with the loss at least
      ``min_spike_rise`` above its slow mean, or log-norm z-score ``> spike_z``; *severe* the
      same with ``hold_z``, or a gradient norm more than ``hold_ratio`` times its running
      geometric mean (the variance can be inflated by early training).
    - *stress cue*: the loss is rising, ``loss_fast / loss_slow - 1 > stress_trend``.
    - *oscillation cue*: the gradient norm is growing,
      ``log_norm_fast - log_norm_slow > oscillation_trend`` (the symptom of steps that
      overshoot a sharpening valley), or, with ``overshoot_cos`` set, the EMA of the
      gradient–momentum cosine is below it.

    Regimes with hysteresis: ``SPIKE`` at once on a spike; ``STRESSED`` (or ``OSCILLATION``
    when only the norm cue is on) once a cue has held for ``dwell`` consecutive steps; a
    damping regime is kept until no cue has been seen for ``calm_steps`` steps, then
    ``RECOVERY`` until the scale is back at ``max_scale``, then ``STABLE``.

    **Control** (of the global scale; off by default, ``damping=0``, ``spike_factor=1``: the
    limiter does the control, and the regimes are still read and reported): spike:
    ``scale ·= spike_factor``; engaged stress: ``scale ·= 1 - damping``; engaged oscillation:
    ``scale ·= 1 - damping/2``; a damping regime without a current cue keeps its scale;
    otherwise ``scale += release``. The scale is clipped to ``[min_scale, max_scale]``, so it
    moves down by at most one bounded factor and up by at most ``release`` per step. A severe
    spike also **holds** the step (zero update, inner state not advanced), at most
    ``max_holds`` steps in a row so a lasting level shift is eventually accepted. With constant
    loss and gradients no cue ever fires and the guard is the identity; with
    ``min_scale == max_scale`` the policy is pinned (it never holds nor limits).

    **Boost** (the trust-ratio floor, the limiter's mirror image; off by default,
    ``max_boost=1``): a learning rate whose largest relative update so far (at the unboosted
    scale, spikes left out) stayed below ``max_update_ratio`` is too low to need a limit, so
    the applied scale is multiplied by a boost that rises by at most ``release`` per calm step
    (warm, no cue, no damping regime, and that peak settled: grown by less than 1 % for
    ``calm_steps`` steps, so a rising learning-rate warm-up is never boosted) towards
    ``max_update_ratio / peak ratio``, at most ``max_boost``, and drops to 1 on any cue or
    spike. The limiter still bounds every boosted step. The guard's ``control_energy`` counts
    ``|1 − scale|``, so ``1 − control_energy / steps`` is not a boosted run's mean scale.
    Measured in ``results/governor-probe/v5.md``.

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
      overshoot_cos: alignment EMA below which the steps overshoot (an oscillation cue), in
        [-1, 1]; ``None``: not sensed.
      alignment_decay: decay of the alignment EMA, in [0, 1).
      max_update_ratio: the per-tensor limit on ``‖Δθ‖ / ‖θ‖`` per step (> 0); ``None``: no
        limiter (and the update is not sensed).
      param_floor: the floor of ``‖θ‖`` as a root-mean-square (>= 0).
      limit_anneal: the exponent of the limit's decay with the inner update norm relative to
        its peak (>= 0; 0: a fixed limit).
      max_boost: the largest factor of the trust-ratio floor (>= 1; 1: off); needs the
        limiter (``max_update_ratio`` not ``None``).

    Returns:
      A :class:`GovernorPolicy` for :func:`~lbw_optax.guard`.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> policy = lbw_optax.governor_policy(warmup=10)
      >>> tx = lbw_optax.guard(optax.adamw(1e-3), policy=policy)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params, value=jnp.float32(2.0))
      >>> int(lbw_optax.telemetry(state)["observed"])
      1

    References:
      Kosson et al., "Analyzing & Reducing the Need for Learning Rate Warmup in GPT
      Training", NeurIPS 2024.
    """
    # Every argument is a field of the same name (tests/test_api.py checks the defaults).
    return GovernorPolicy(**locals())
