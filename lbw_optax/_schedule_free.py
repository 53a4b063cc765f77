"""Schedule-free evaluation through wrappers: find ``optax.contrib.schedule_free``'s state at
any depth of an optimizer state."""

from typing import Any

import jax
import optax
import optax.contrib


def _is_schedule_free(node: Any) -> bool:
    return isinstance(node, optax.contrib.ScheduleFreeState)


def find_schedule_free_state(opt_state: Any) -> Any | None:
    """The one :class:`optax.contrib.ScheduleFreeState` in ``opt_state`` (walked by type, at
    any depth), or ``None`` when there is none.

    Raises:
      ValueError: if there is more than one.
    """
    found = [
        n for n in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free) if _is_schedule_free(n)
    ]
    if len(found) > 1:
        raise ValueError(
            f"the optimizer state holds {len(found)} schedule-free states; call "
            "optax.contrib.schedule_free_eval_params on the one to evaluate"
        )
    return found[0] if found else None


def schedule_free_eval_params(opt_state: Any, params: optax.Params) -> optax.Params:
    """The parameters to evaluate a schedule-free optimizer at, from any optimizer state.

    :func:`optax.contrib.schedule_free_eval_params` needs the
    :class:`optax.contrib.ScheduleFreeState` itself; this finds it inside a guard, a chain,
    ``optax.MultiSteps`` or ``optax.inject_hyperparams`` first. (On a
    :class:`~lbw_optax.GuardState` optax's function works too.)

    Args:
      opt_state: an optimizer state that holds one ``optax.contrib.schedule_free`` state.
      params: the parameters being trained (schedule-free's ``y`` sequence).

    Returns:
      The averaged parameters ``x``, to evaluate at.

    Raises:
      ValueError: if ``opt_state`` holds no schedule-free state, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, optax.contrib, lbw_optax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = lbw_optax.guard(optax.contrib.schedule_free_adamw(1e-2))
      >>> state = tx.init(params)
      >>> eval_params = lbw_optax.schedule_free_eval_params(state, params)
    """
    state = find_schedule_free_state(opt_state)
    if state is None:
        raise ValueError(
            "the optimizer state holds no optax.contrib.schedule_free state to evaluate"
        )
    return optax.contrib.schedule_free_eval_params(state, params)
