"""A function traced with every ``lax.cond`` taking one chosen branch and its loops unrolled.

XLA's cost analysis cannot tell the two branches of a ``lax.cond`` apart and counts a loop body
once. To measure each kind of step of a transformation whose work depends on its state (SGG
re-clusters on some steps only), :func:`one_branch` re-traces it with each ``cond`` replaced by
one of its branches and each static-length loop (``lax.scan``, and ``lax.fori_loop`` with static
bounds, which is a scan) fully unrolled, without touching the library: it rewrites the function's
jaxpr.

>>> f = lambda x: jax.lax.cond(x > 0, lambda x: x + 1, lambda x: x - 1, x)
>>> float(one_branch(f, 1)(-5.0)), float(one_branch(f, 0)(5.0))
(-4.0, 4.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core


def one_branch(fn: Callable[..., Any], branch: int, *, unroll: bool = True) -> Callable[..., Any]:
    """``fn`` with every ``lax.cond``/``lax.switch`` inside it (nested calls, loop bodies and
    jitted functions included) taking branch ``branch`` whatever its predicate, and with every
    ``lax.scan`` unrolled when ``unroll``.

    Args:
      fn: a function of arrays (pytrees of them), as ``jax.jit`` takes.
      branch: the branch index: for ``lax.cond(pred, true_fun, false_fun)``, 1 is ``true_fun``
        and 0 ``false_fun``; for ``lax.switch``, the index into its branches (clamped).
      unroll: whether to unroll every scan (static-length loop) fully.

    Returns:
      A function with ``fn``'s signature and outputs; it may be jitted.

    Raises:
      ValueError: if ``branch`` is negative.
    """
    if branch < 0:
        raise ValueError(f"branch must be >= 0, got {branch}.")

    def fixed(*args, **kwargs):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args, **kwargs)
        flat = jax.tree.leaves((args, kwargs))
        outs = _evaluate(closed.jaxpr, closed.consts, flat, branch, unroll)
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    return fixed


def _rewrite(closed: core.ClosedJaxpr, branch: int, unroll: bool) -> core.ClosedJaxpr:
    """The closed jaxpr ``closed`` with its conds and scans rewritten (see :func:`one_branch`)."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    body = lambda *xs: _evaluate(closed.jaxpr, closed.consts, xs, branch, unroll)
    return jax.make_jaxpr(body)(*avals)


def _evaluate(
    jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], branch: int, unroll: bool
) -> list[Any]:
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        name, params = eqn.primitive.name, dict(eqn.params)
        if name == "cond":
            taken = params["branches"][min(branch, len(params["branches"]) - 1)]
            outs = _evaluate(taken.jaxpr, taken.consts, values[1:], branch, unroll)
        elif name in ("pjit", "jit", "closed_call", "core_call"):  # Inlined, conds and all.
            inner = params.get("jaxpr") or params["call_jaxpr"]
            inner = inner if isinstance(inner, core.ClosedJaxpr) else core.ClosedJaxpr(inner, ())
            outs = _evaluate(inner.jaxpr, inner.consts, values, branch, unroll)
        else:
            if name == "scan":
                params["jaxpr"] = _rewrite(params["jaxpr"], branch, unroll)
                if unroll:
                    params["unroll"] = max(1, params["length"])
            elif name == "while":
                params["body_jaxpr"] = _rewrite(params["body_jaxpr"], branch, unroll)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, out in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, core.DropVar):
                env[var] = out
    return [read(v) for v in jaxpr.outvars]
