"""``benchmarks.branches.one_branch``: a function traced with each ``lax.cond`` taking one branch
and its loops unrolled (how ``benchmarks.overhead`` measures SGG's two kinds of step)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import lbw_optax
from benchmarks.branches import one_branch


def _branchy(x):
    """A cond at the top, one inside a jitted function, and one inside a fori_loop's body."""
    top = lax.cond(x.sum() > 0, lambda x: x + 1.0, lambda x: x - 1.0, x)
    nested = jax.jit(lambda x: lax.cond(x.sum() > 0, lambda x: 2 * x, lambda x: -x, x))(x)
    loop = lax.fori_loop(0, 3, lambda i, c: lax.cond(c.sum() > 0, lambda c: c + 1, jnp.sin, c), x)
    return top, nested, loop


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_cond_takes_the_chosen_branch_whatever_its_predicate(sign):
    x = sign * jnp.arange(1.0, 4.0)
    true = (x + 1.0, 2 * x, x + 3)
    false = (x - 1.0, -x, jnp.sin(jnp.sin(jnp.sin(x))))
    chex.assert_trees_all_close(jax.jit(one_branch(_branchy, 1))(x), true)
    chex.assert_trees_all_close(jax.jit(one_branch(_branchy, 0))(x), false)
    # The original still follows its predicate.
    chex.assert_trees_all_close(_branchy(x), true if sign > 0 else false)


def test_loops_are_unrolled_and_pytrees_pass_through():
    def f(tree, scale):
        return {"y": lax.fori_loop(0, 5, lambda i, c: c * scale, tree["x"])}

    tree = {"x": jnp.ones(3)}
    jaxpr = jax.make_jaxpr(one_branch(f, 0))(tree, 2.0)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["unroll"] for e in scans] == [5]
    kept = jax.make_jaxpr(one_branch(f, 0, unroll=False))(tree, 2.0)
    assert [e.params["unroll"] for e in kept.jaxpr.eqns if e.primitive.name == "scan"] == [1]
    chex.assert_trees_all_close(one_branch(f, 0)(tree, 2.0), {"y": jnp.full(3, 32.0)})
    with pytest.raises(ValueError, match="branch"):
        one_branch(f, -1)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_sgg_steps_are_its_ordinary_or_its_reclustering_step():
    """Each real SGG update equals the one-branch update of its kind: the never-branch on the
    steps that do not re-cluster, the always-branch on those that do (both occur)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 48).reshape(8, 6), "b": jnp.linspace(0.0, 1.0, 6)}
    grads = jax.tree.map(lambda p: 0.01 * jnp.cos(3 * p), params)
    tx = lbw_optax.sgg_adamw(1e-2, recluster_every=3)
    update = lambda fn: jax.jit(lambda g, s, p: fn(g, s, p, value=jnp.float32(1.0)))
    real, never, always = (
        update(tx.update),
        update(one_branch(tx.update, 0)),
        update(one_branch(tx.update, 1)),
    )
    same = lambda got, want: all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    state, kinds = tx.init(params), []
    for _ in range(6):
        want = real(grads, state, params)
        kind = "never" if same(never(grads, state, params), want) else ""
        kind += "always" if same(always(grads, state, params), want) else ""
        kinds.append(kind)
        state = want[1]
    assert set(kinds) == {"never", "always"}, kinds
