"""Stability peers from other papers and codebases, as optax transformations.

What the guard is compared with (``docs/peers.md``): each follows its authors' reference code,
and reports its record through :func:`lbw_optax.telemetry`. As optax keeps third-party methods
in ``optax.contrib``, they live apart from the core API. A peer that is a whole optimizer has an
``*_adamw`` alias (:func:`spam_adamw`, :func:`stable_adamw`); the others compose with any
optimizer:

- :func:`zclip` and :func:`adagc` clip the gradients: ``optax.chain(zclip(), optax.adamw(lr))``;
- :func:`skip_step` wraps an optimizer:
  ``skip_step(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)))``.
"""

from lbw_optax.peers._adagc import AdaGCState, adagc
from lbw_optax.peers._skip_step import SkipStepState, skip_step
from lbw_optax.peers._spam import ScaleBySpamState, SpamRecord, scale_by_spam, spam_adamw
from lbw_optax.peers._stable_adamw import (
    ScaleByStableAdamState,
    StableAdamRecord,
    scale_by_stable_adam,
    stable_adamw,
)
from lbw_optax.peers._zclip import ZClipState, zclip

__all__ = [
    "AdaGCState",
    "ScaleBySpamState",
    "ScaleByStableAdamState",
    "SkipStepState",
    "SpamRecord",
    "StableAdamRecord",
    "ZClipState",
    "adagc",
    "scale_by_spam",
    "scale_by_stable_adam",
    "skip_step",
    "spam_adamw",
    "stable_adamw",
    "zclip",
]
