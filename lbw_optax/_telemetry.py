"""Read the governance record out of any optimizer state, however deeply it is nested."""

from collections.abc import Mapping
from typing import Any

import jax

_TELEMETRY_TYPES: list[type] = []
# Per-element fields (SGG's cluster ids) are state, not a record to report.
_SKIP_FIELDS = frozenset({"inner_state", "cluster_ids"})


def register_telemetry_state(state_type: type) -> type:
    """Marks a NamedTuple state type whose scalar fields :func:`telemetry` reports.

    Its fields are reported by name; nested NamedTuples (signals, a policy's state) are
    flattened into the same dict; ``inner_state`` is searched for further states instead.
    Usable as a class decorator.
    """
    if state_type not in _TELEMETRY_TYPES:
        _TELEMETRY_TYPES.append(state_type)
    return state_type


def _is_telemetry_state(node: Any) -> bool:
    return isinstance(node, tuple(_TELEMETRY_TYPES))


def _fields(node: Any) -> dict[str, Any]:
    out = {}
    for name, value in zip(node._fields, node, strict=True):
        if name in _SKIP_FIELDS:
            continue
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            out.update(_fields(value))
        else:
            out[name] = _unwrap(value)
    return out


def _unwrap(value: Any) -> Any:
    # Containers that box one array (e.g. the variables of flax.nnx.Optimizer.opt_state) are
    # pytrees with a single leaf: report the array itself. A tree-valued field (one small
    # array per parameter tensor) is reported as that tree, each of its arrays unboxed.
    return jax.tree.map(lambda node: jax.tree.leaves(node)[0], value, is_leaf=_is_box)


def _is_box(node: Any) -> bool:
    return not isinstance(node, Mapping | list | tuple) and len(jax.tree.leaves(node)) == 1


def telemetry(opt_state: Any) -> dict[str, jax.Array]:
    """Collects the telemetry fields of every governance state found in ``opt_state``.

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
        chain); read those with ``optax.tree.get(state, name, filtering=...)``.
    """
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=_is_telemetry_state)
        if _is_telemetry_state(node)
    ]
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
