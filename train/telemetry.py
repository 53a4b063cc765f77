"""Device values as JSON: the optimizer's telemetry (``lbw_optax.telemetry``) and the loss's
perplexity, as the telemetry lines and the summary hold them."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

import lbw_optax


def _scalar(x: Any) -> Any:
    x = np.asarray(x)
    if x.dtype == bool:
        return bool(x)
    if np.issubdtype(x.dtype, np.integer):
        return int(x)
    return float(x)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``, or None for a missing loss or an overflow."""
    return None if loss is None else _json_float(math.exp(min(loss, 700.0)))


def _numbers(x: Any) -> list[Any]:
    x = np.asarray(x)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return x.ravel().tolist()
    return [_json_float(v) for v in x.ravel().tolist()]


def _telemetry_value(value: Any) -> Any:
    """A telemetry field as JSON: a scalar as a number, an array as a list, and a per-tensor
    field (a tree of small arrays matching the parameters, e.g. SGG's ``cluster_scales``) as
    ``{"layers/0/mlp/down_proj/kernel": [...], ...}`` (the tensors SGG skips hold
    ``optax.MaskedNode``, which has no leaves, so they do not appear)."""
    if isinstance(value, np.ndarray | np.generic | int | float | bool):
        return _scalar(value) if np.ndim(value) == 0 else _numbers(value)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): _numbers(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(value)
    }


def read_telemetry(optimizer: nnx.Optimizer) -> dict[str, Any]:
    """``lbw_optax.telemetry`` of the optimizer as plain Python values (``{}`` without a guard):
    scalars as numbers, per-tensor fields (SGG's ``cluster_scales``, ...) by parameter path
    (see :func:`_telemetry_value`), with ``regime_name`` added when a regime is reported."""
    fields = jax.device_get(lbw_optax.telemetry(optimizer.opt_state))
    out = {k: _telemetry_value(v) for k, v in fields.items()}
    if "regime" in out:
        out["regime_name"] = lbw_optax.Regime(out["regime"]).name
    return out
