"""lbw-optax: training-control governance (LBW-Guard) and friends as Optax transformations."""

from lbw_optax._accumulate import AccumulateGradientsState, accumulate_gradients
from lbw_optax._adagc import AdaGCState, adagc, adagc_adamw
from lbw_optax._common import donatable
from lbw_optax._governor import GovernorPolicy, GovernorState, governor_policy
from lbw_optax._guard import GuardState, guard, lbw_adamw
from lbw_optax._policy import Decision, Policy
from lbw_optax._reference import ReferencePolicy, ReferenceState, reference_policy
from lbw_optax._regime import Regime
from lbw_optax._schedule_free import schedule_free_eval_params
from lbw_optax._sense import Signals, tensor_names
from lbw_optax._sgg import SGGState, sgg, sgg_adamw
from lbw_optax._skip_step import SkipStepState, skip_step, skip_step_adamw
from lbw_optax._spam import ScaleBySpamState, SpamRecord, scale_by_spam, spam_adamw
from lbw_optax._stable_adamw import (
    ScaleByStableAdamState,
    StableAdamRecord,
    scale_by_stable_adam,
    stable_adamw,
)
from lbw_optax._telemetry import register_telemetry_state, telemetry
from lbw_optax._zclip import ZClipState, zclip, zclip_adamw

__version__ = "0.1.0"

__all__ = [
    "AccumulateGradientsState",
    "AdaGCState",
    "Decision",
    "GovernorPolicy",
    "GovernorState",
    "GuardState",
    "Policy",
    "ReferencePolicy",
    "ReferenceState",
    "Regime",
    "SGGState",
    "ScaleBySpamState",
    "ScaleByStableAdamState",
    "Signals",
    "SkipStepState",
    "SpamRecord",
    "StableAdamRecord",
    "ZClipState",
    "accumulate_gradients",
    "adagc",
    "adagc_adamw",
    "donatable",
    "governor_policy",
    "guard",
    "lbw_adamw",
    "reference_policy",
    "register_telemetry_state",
    "scale_by_spam",
    "scale_by_stable_adam",
    "schedule_free_eval_params",
    "sgg",
    "sgg_adamw",
    "skip_step",
    "skip_step_adamw",
    "spam_adamw",
    "stable_adamw",
    "telemetry",
    "tensor_names",
    "zclip",
    "zclip_adamw",
]
