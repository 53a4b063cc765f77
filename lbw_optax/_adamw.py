"""What the ``*_adamw`` optimizers share: their AdamW argument checks and the AdamW they build.

Each (:func:`lbw_optax.lbw_adamw`, :func:`lbw_optax.sgg_adamw`,
:func:`lbw_optax.peers.spam_adamw`, ...) takes AdamW's arguments as :func:`optax.adamw` names
them and hands them here unchanged.
"""

from typing import Any

import jax
import optax

from lbw_optax import _validate


def check_adamw_args(learning_rate, b1, b2, eps, weight_decay, eps_root=0.0) -> None:
    """Validates the AdamW arguments given as Python numbers (arrays pass: inject_hyperparams)."""
    number = lambda x: isinstance(x, int | float) and not isinstance(x, bool)
    if number(learning_rate):
        _validate.check_non_negative("learning_rate", learning_rate)
    elif not callable(learning_rate) and not isinstance(learning_rate, jax.Array):
        raise ValueError(
            f"learning_rate must be a number, an array or a schedule, got {learning_rate!r}"
        )
    if number(b1):
        _validate.check_in_range("b1", b1, 0.0, 1.0, closed="left")
    if number(b2):
        _validate.check_in_range("b2", b2, 0.0, 1.0, closed="left")
    for name, value in (("eps", eps), ("eps_root", eps_root), ("weight_decay", weight_decay)):
        if number(value):
            _validate.check_non_negative(name, value)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: Any = None,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """:func:`optax.adamw` with every argument forwarded, after :func:`check_adamw_args`
    (in the wrappers' order: the positional ones, then the keyword-only ones)."""
    check_adamw_args(learning_rate, b1, b2, eps, weight_decay, eps_root)
    return optax.adamw(
        learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        weight_decay=weight_decay,
        mask=mask,
        nesterov=nesterov,
    )


def decoupled(
    scale_by: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """``chain(scale_by, add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``:
    AdamW's layout around another normalised step, the weight decay left out of its scaling."""
    return optax.chain(
        scale_by,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
