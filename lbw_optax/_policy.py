"""What a governance policy is: a config plus a pure ``decide`` over scalars.

A policy never sees parameters or gradients, only the :class:`~lbw_optax.Signals` sensed
at the step, its own small state and the guard's current posture. That keeps every policy a
handful of scalar operations (cheap, testable alone, identical under any sharding), and lets a
user add a policy without touching the rest of the guard.
"""

import abc
from typing import Any, NamedTuple

import jax

from lbw_optax._sense import Signals


class Decision(NamedTuple):
    """A policy's output for one step.

    Attributes:
      regime: int32 scalar, a :class:`~lbw_optax.Regime` value.
      scale: float32 scalar in ``[policy.min_scale, policy.max_scale]``, the factor applied to
        the inner optimizer's update.
      hold: bool scalar; when true the step is held: zero update, inner state not advanced.
      tensor_scale: a further factor per sensed tensor (float32 ``[n]``, leaf order of the
        non-empty update tensors, each in ``(0, 1]``), for policies that limit tensors one by
        one; the scalar 1 (the default) leaves every tensor at ``scale``.
    """

    regime: jax.Array
    scale: jax.Array
    hold: jax.Array
    tensor_scale: jax.Array | float = 1.0


class Policy(abc.ABC):
    """Base class of governance policies.

    Subclasses are frozen dataclasses of validated hyperparameters that implement
    :meth:`init` and :meth:`decide`. Class attributes:

    - ``needs_value``: the policy cannot decide without the loss, so the guard requires
      ``value=``. A policy that reads the loss only when it is given leaves it ``False`` and
      checks ``Signals.loss_seen`` (the governor does).
    - ``needs_momentum``: the policy reads ``Signals.grad_momentum_cos``, so the guard senses
      the alignment of the gradients with the inner optimizer's first moment.
    - ``needs_tensor_norms``: the policy reads ``Signals.tensor_update_norms`` and
      ``tensor_param_norms``, so the guard senses them (it needs ``params``).
    """

    needs_value = False
    needs_momentum = False
    needs_tensor_norms = False

    @property
    @abc.abstractmethod
    def scale_bounds(self) -> tuple[float, float]:
        """The closed interval every decided scale lies in."""

    @abc.abstractmethod
    def init(self) -> Any:
        """Returns the policy's initial state (a NamedTuple of scalars)."""

    @abc.abstractmethod
    def decide(
        self,
        signals: Signals,
        state: Any,
        *,
        step: jax.Array,
        scale: jax.Array,
        regime: jax.Array,
    ) -> tuple[Decision, Any]:
        """Chooses the posture for this step.

        On a non-finite step the guard discards the decision and the new state (it holds the
        step and keeps the old state), so a policy may assume finite signals.

        Args:
          signals: what was sensed at this step.
          state: the policy's state from the previous step.
          step: int32, the guard's step counter, 1 on the first update.
          scale: the scale in force before this step.
          regime: the regime of the previous step.

        Returns:
          ``(decision, new_state)``.
        """
