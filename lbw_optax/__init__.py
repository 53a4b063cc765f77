"""lbw-optax: training-control governance (LBW-Guard) and friends as Optax transformations."""

from lbw_optax._governor import GovernorPolicy, GovernorState, governor_policy
from lbw_optax._guard import GuardState, guard, lbw_adamw
from lbw_optax._policy import Decision, Policy
from lbw_optax._reference import ReferencePolicy, ReferenceState, reference_policy
from lbw_optax._regime import Regime
from lbw_optax._sense import Signals
from lbw_optax._sgg import SGGState, sgg, sgg_adamw
from lbw_optax._telemetry import register_telemetry_state, telemetry

register_telemetry_state(GuardState)
register_telemetry_state(SGGState)

__version__ = "0.1.0"

__all__ = [
    "Decision",
    "GovernorPolicy",
    "GovernorState",
    "GuardState",
    "Policy",
    "ReferencePolicy",
    "ReferenceState",
    "Regime",
    "SGGState",
    "Signals",
    "governor_policy",
    "guard",
    "lbw_adamw",
    "reference_policy",
    "register_telemetry_state",
    "sgg",
    "sgg_adamw",
    "telemetry",
]
