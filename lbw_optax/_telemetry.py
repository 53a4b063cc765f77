"""Read the governance record out of any optimizer state, however deeply it is nested."""

from collections.abc import Mapping
from typing import Any

import jax
import optax


def _is_telemetry_state(node: Any) -> bool:
    """A NamedTuple whose class declares the fields it reports (``telemetry_fields``)."""
    return isinstance(node, tuple) and hasattr(type(node), "telemetry_fields")


def _fields(node: Any) -> dict[str, Any]:
    out = {}
    for name in type(node).telemetry_fields:
        value = getattr(node, name)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            out.update(_nested(value))
        else:
            out[name] = _unwrap(value)
    return out


def _nested(node: Any) -> dict[str, Any]:
    """Every field of a NamedTuple held in a reported field (signals, a policy's state)."""
    if _is_telemetry_state(node):
        return _fields(node)
    out = {}
    for name, value in zip(node._fields, node, strict=True):
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            out.update(_nested(value))
        else:
            out[name] = _unwrap(value)
    return out


def _unwrap(value: Any) -> Any:
    # Containers that box one array (e.g. the variables of flax.nnx.Optimizer.opt_state) are
    # pytrees with a single leaf: report the array itself. A tree-valued field (one small
    # array per parameter tensor) is reported as that tree, each of its arrays unboxed; a box
    # of nothing (flax.nnx wraps the optax.MaskedNode of a skipped tensor) as MaskedNode.
    return jax.tree.map(_unbox, value, is_leaf=_is_box)


def _is_box(node: Any) -> bool:
    return not isinstance(node, Mapping | list | tuple) and len(jax.tree.leaves(node)) <= 1


def _unbox(node: Any) -> Any:
    leaves = jax.tree.leaves(node)
    return leaves[0] if leaves else optax.MaskedNode()


def telemetry(opt_state: Any) -> dict[str, jax.Array]:
    """Collects the telemetry fields of every governance state found in ``opt_state``.

    A state takes part by declaring the fields it reports as a class attribute of its
    NamedTuple, ``telemetry_fields = ("step", ...)``; a reported field that is itself a
    NamedTuple (the guard's signals, a policy's state) is flattened into the same dict, and a
    field named ``inner_state`` is searched for further states.

    Walks the state by type (it does not match dictionary keys of the moment trees, so a
    Flax model with parameters called ``scale`` is no problem), so it works for a bare guard
    state, a chain, ``optax.MultiSteps``, ``optax.inject_hyperparams`` or
    ``flax.nnx.Optimizer.opt_state``.

    Args:
      opt_state: any optimizer state (a pytree).

    Returns:
      A dict of arrays: for a guard, ``step``, ``regime``, ``scale``, ``held``,
      ``control_active_steps``, ``regime_switches``, ``control_energy``, ``skipped_steps``,
      ``nonfinite_steps``, the latest sensed signals (``loss``, ``grad_norm``,
      ``grad_ms_max``, ``grad_ms_mean``, ``grad_mean``) and the policy's fields. Empty if the
      state holds no governance state.

    Raises:
      ValueError: if two states report a field of the same name (e.g. two guards in one
        chain); read those with ``optax.tree.get(state, name, filtering=...)``. Or if the state
        holds no governance state but a plain mapping with the fields of one of lbw_optax's (a
        checkpoint restored without a target): restore it into the optimizer's structure.
    """
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=_is_telemetry_state)
        if _is_telemetry_state(node)
    ]
    if not found:
        _check_not_restored_without_target(opt_state)
    nested = [n for node in found for n in _inner_states(node)]
    out: dict[str, jax.Array] = {}
    for node in found + nested:
        for name, value in _fields(node).items():
            if name in out:
                raise ValueError(
                    f"the optimizer state holds more than one field named {name!r} "
                    f"(found again in {type(node).__name__}); read them with optax.tree.get"
                )
            out[name] = value
    return out


def _inner_states(node: Any) -> list[Any]:
    inner = getattr(node, "inner_state", None)
    if inner is None:
        return []
    found = [
        n for n in jax.tree.leaves(inner, is_leaf=_is_telemetry_state) if _is_telemetry_state(n)
    ]
    return found + [m for n in found for m in _inner_states(n)]


def _state_types() -> list[type]:
    """lbw_optax's states that report telemetry, the peers' included."""
    import lbw_optax  # The package, loaded by now; its modules import this one.

    exported = [getattr(lbw_optax, name) for name in lbw_optax.__all__]
    exported += [getattr(lbw_optax.peers, name) for name in lbw_optax.peers.__all__]
    return [t for t in exported if isinstance(t, type) and hasattr(t, "telemetry_fields")]


def _check_not_restored_without_target(opt_state: Any) -> None:
    """Raises if ``opt_state`` holds a mapping with every field of a governance state: what
    Orbax gives back for a checkpoint restored without a target (nested dicts and lists)."""
    fields = {t.__name__: set(t.telemetry_fields) for t in _state_types()}
    is_restored = lambda node: (
        isinstance(node, Mapping) and any(names <= set(node) for names in fields.values())
    )
    for node in jax.tree.leaves(opt_state, is_leaf=is_restored):
        if is_restored(node):
            name = next(n for n, names in fields.items() if names <= set(node))
            raise ValueError(
                f"the optimizer state holds a plain mapping with the fields of {name}, not a "
                f"{name}: a checkpoint restored without a target? Restore it into the "
                "structure of tx.init(params) (with Orbax: a StandardRestore of that state), "
                "then read its telemetry"
            )
