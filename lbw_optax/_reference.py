"""The published LBW-Guard rule, as a policy."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lbw_optax import _validate
from lbw_optax._policy import Decision, Policy
from lbw_optax._regime import Regime
from lbw_optax._sense import Signals

_RATIO_EPS = 1e-12
_SPIKE_DECAY = 0.7
_OSCILLATION_DECAY = 0.85


class ReferenceState(NamedTuple):
    """State of :func:`reference_policy`.

    Attributes:
      ms_ema: float32 scalar, EMA of the sensed gradient mean-square.
      seeded: bool scalar, whether ``ms_ema`` holds a collected value yet.
      prev_grad_mean: float32 scalar, the global mean gradient at the last collection.
      ms_ratio: float32 scalar, the last ratio ``x / (ema + 1e-12)``.
    """

    ms_ema: jax.Array
    seeded: jax.Array
    prev_grad_mean: jax.Array
    ms_ratio: jax.Array


@dataclasses.dataclass(frozen=True)
class ReferencePolicy(Policy):
    """The published LBW-Guard rule; build it with :func:`reference_policy`."""

    stress_threshold: float = 1.1
    spike_threshold: float = 1.5
    min_scale: float = 0.1
    recovery: float = 0.01
    use_max: bool = True
    every: int = 10
    ema_decay: float = 0.85

    needs_value = False

    def __post_init__(self):
        _validate.check_positive("stress_threshold", self.stress_threshold)
        _validate.check_positive("spike_threshold", self.spike_threshold)
        _validate.check_ordered(
            "stress_threshold", self.stress_threshold, "spike_threshold", self.spike_threshold
        )
        _validate.check_in_range("min_scale", self.min_scale, 0.0, 1.0, closed="right")
        _validate.check_non_negative("recovery", self.recovery)
        _validate.check_bool("use_max", self.use_max)
        _validate.check_positive_int("every", self.every)
        _validate.check_in_range("ema_decay", self.ema_decay, 0.0, 1.0, closed="left")
        for name in ("stress_threshold", "spike_threshold", "min_scale", "recovery", "ema_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def scale_bounds(self) -> tuple[float, float]:
        return (self.min_scale, 1.0)

    def init(self) -> ReferenceState:
        zero = jnp.zeros([], jnp.float32)
        return ReferenceState(
            ms_ema=zero, seeded=jnp.array(False), prev_grad_mean=zero, ms_ratio=zero
        )

    def decide(self, signals: Signals, state: ReferenceState, *, step, scale, regime):
        collect = (step == 1) | (step % self.every == 0)
        x = signals.grad_ms_max if self.use_max else signals.grad_ms_mean
        ema = jnp.where(state.seeded, state.ms_ema + (1.0 - self.ema_decay) * (x - state.ms_ema), x)
        ratio = x / (ema + _RATIO_EPS)
        sign_flip = state.prev_grad_mean * signals.grad_mean < 0
        spike = ratio > self.spike_threshold
        oscillation = ~spike & ((ratio > self.stress_threshold) | sign_flip)
        new_scale = jnp.where(
            spike,
            jnp.maximum(self.min_scale, _SPIKE_DECAY * scale),
            jnp.where(
                oscillation,
                jnp.maximum(self.min_scale, _OSCILLATION_DECAY * scale),
                jnp.minimum(1.0, scale + self.recovery),
            ),
        )
        new_regime = jnp.where(
            spike, Regime.SPIKE, jnp.where(oscillation, Regime.OSCILLATION, Regime.STABLE)
        ).astype(jnp.int32)
        new_state = ReferenceState(
            ms_ema=jnp.where(collect, ema, state.ms_ema),
            seeded=state.seeded | collect,
            prev_grad_mean=jnp.where(collect, signals.grad_mean, state.prev_grad_mean),
            ms_ratio=jnp.where(collect, ratio, state.ms_ratio),
        )
        decision = Decision(
            regime=jnp.where(collect, new_regime, regime).astype(jnp.int32),
            scale=jnp.where(collect, new_scale, scale).astype(jnp.float32),
            hold=jnp.array(False),
        )
        return decision, new_state


def reference_policy(
    *,
    stress_threshold: float = 1.1,
    spike_threshold: float = 1.5,
    min_scale: float = 0.1,
    recovery: float = 0.01,
    use_max: bool = True,
    every: int = 10,
    ema_decay: float = 0.85,
) -> ReferencePolicy:
    r"""The published LBW-Guard control rule (the vendor package's behaviour).

    On step 1 and every ``every`` steps the rule collects telemetry and decides; in between the
    scale and the mode are held. With :math:`x` the largest per-tensor mean of :math:`g^2`
    (their mean if ``use_max=False``) and :math:`\bar g` the global mean gradient:

    .. math::
      e \leftarrow x \text{ (first collection)},\quad
      e \leftarrow \beta e + (1-\beta) x \text{ (later)},\qquad r = x / (e + 10^{-12})

    - ``r > spike_threshold``: mode spike, ``scale = max(min_scale, 0.7 scale)``;
    - else ``r > stress_threshold`` or a sign flip (``previous_mean * current_mean < 0``):
      mode oscillation, ``scale = max(min_scale, 0.85 scale)``;
    - else mode calm, ``scale = min(1, scale + recovery)``.

    The decided scale multiplies the inner update of the same step (AdamW at ``lr × scale``,
    decoupled weight decay included). Modes map to regimes: calm → ``STABLE``,
    oscillation → ``OSCILLATION``, spike → ``SPIKE``. The rule does not read the loss.

    Args:
      stress_threshold: ratio above which the mode is oscillation (> 0).
      spike_threshold: ratio above which the mode is spike (>= ``stress_threshold``).
      min_scale: the floor of the scale, in (0, 1]; 1 pins the rule to the identity.
      recovery: additive release per calm collection, >= 0.
      use_max: sense the max over tensors (True) or the mean (False).
      every: collect and decide every this many steps (>= 1).
      ema_decay: EMA decay of the mean-square, in [0, 1).

    Returns:
      A :class:`ReferencePolicy` for :func:`~lbw_optax.guard`.

    Example:
      >>> import optax, lbw_optax
      >>> tx = lbw_optax.guard(optax.adamw(1e-3), policy=lbw_optax.reference_policy())

    References:
      Radianis, "Learn-by-Wire Training Control Governance: Bounded Autonomous Training Under
      Stress for Stability and Efficiency", arXiv 2605.19008, 2026; the ``lbw-guard`` 1.1.3
      package.
    """
    # Every argument is a field of the same name (tests/test_api.py checks the defaults).
    return ReferencePolicy(**locals())
