"""lbw-optax: training-control governance (LBW-Guard) and SGG as Optax transformations.

The stability peers it is compared with (ZClip, SPAM, AdaGC, skip-step, StableAdamW) are in
:mod:`lbw_optax.peers`; the conformance checks every transformation passes in
:mod:`lbw_optax.testing`.
"""

from lbw_optax import peers
from lbw_optax._accumulate import AccumulateGradientsState, accumulate_gradients
from lbw_optax._common import donatable
from lbw_optax._governor import GovernorPolicy, GovernorState, governor_policy
from lbw_optax._guard import CLIPPED_MAX_UPDATE_RATIO, GuardState, guard, lbw_adamw, resolve_policy
from lbw_optax._policy import Decision, Policy
from lbw_optax._reference import ReferencePolicy, ReferenceState, reference_policy
from lbw_optax._regime import Regime
from lbw_optax._schedule_free import schedule_free_eval_params
from lbw_optax._sense import Signals, tensor_names
from lbw_optax._sgg import SGGState, sgg, sgg_adamw
from lbw_optax._telemetry import telemetry

__version__ = "0.1.0"

__all__ = [
    "CLIPPED_MAX_UPDATE_RATIO",
    "AccumulateGradientsState",
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
    "accumulate_gradients",
    "donatable",
    "governor_policy",
    "guard",
    "lbw_adamw",
    "peers",
    "reference_policy",
    "resolve_policy",
    "schedule_free_eval_params",
    "sgg",
    "sgg_adamw",
    "telemetry",
    "tensor_names",
]
