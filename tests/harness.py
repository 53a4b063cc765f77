"""The transformations of lbw_optax that the checks of :mod:`lbw_optax.testing` run on.

A transformation joins by adding a :class:`Case` to :data:`CASES`. ``make`` is called with a
``learning_rate=`` keyword (a float or a schedule, so ``optax.inject_hyperparams`` can drive it)
and returns the transformation. The checks themselves are the public :mod:`lbw_optax.testing`;
the tests are in ``tests/test_harness.py``.
"""

import dataclasses
import functools
from collections.abc import Callable

import optax

import lbw_optax


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., optax.GradientTransformation]
    learning_rate: float = 1e-2
    # Whether the update is linear in the learning rate at ``learning_rate`` (the governor's
    # per-tensor limiter caps it, on purpose, where ten times that rate would bind).
    linear_in_lr: bool = True
    # Run in the slow pass only (``-m slow``, as .ci/run does): the peers and the compositions,
    # whose checks repeat what the default run's cases (the default ``lbw_adamw``, the
    # published rule's ``lbw_adamw`` and ``sgg_adamw``) already cover.
    slow: bool = False


def _guarded_sgd(learning_rate):
    return lbw_optax.guard(optax.sgd(learning_rate, momentum=0.9), policy="reference")


CASES: list[Case] = [
    Case(
        "lbw_adamw-governor",
        functools.partial(lbw_optax.lbw_adamw, policy="governor"),
        linear_in_lr=False,
    ),
    Case("lbw_adamw-reference", functools.partial(lbw_optax.lbw_adamw, policy="reference")),
    Case("guard-sgd-reference", _guarded_sgd, slow=True),
    # recluster_every=5: the 100-step tests re-cluster many times.
    Case("sgg_adamw", functools.partial(lbw_optax.sgg_adamw, recluster_every=5)),
    Case(
        "guard-sgg_adamw",
        lambda learning_rate: lbw_optax.guard(
            lbw_optax.sgg_adamw(learning_rate, recluster_every=5)
        ),
        linear_in_lr=False,
        slow=True,
    ),
    # Peers. Paper defaults where 100 steps exercise them; AdaGC leaves warm-up at step 10 and
    # SPAM resets every 20 steps, so the 100-step tests cover the adaptive and reset paths.
    Case(
        "zclip",
        lambda learning_rate: optax.chain(lbw_optax.peers.zclip(), optax.adamw(learning_rate)),
        slow=True,
    ),
    Case(
        "skip_step",
        lambda learning_rate: lbw_optax.peers.skip_step(
            optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate))
        ),
        slow=True,
    ),
    Case(
        "adagc",
        lambda learning_rate: optax.chain(
            lbw_optax.peers.adagc(warmup_steps=10), optax.adamw(learning_rate)
        ),
        slow=True,
    ),
    Case(
        "spam_adamw",
        functools.partial(lbw_optax.peers.spam_adamw, reset_interval=20, warmup_steps=5),
        slow=True,
    ),
    Case("stable_adamw", lbw_optax.peers.stable_adamw, slow=True),
]
