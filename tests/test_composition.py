"""The guard composed with optax's and Flax's wrappers: what it senses in each."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax
from lbw_optax import Regime

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full((4,), 0.5, jnp.float32)}


def run(tx, grads_seq, losses, params=PARAMS):
    """Runs a jitted update per step; returns the per-step updates and telemetry."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates_seq, records = [], []
    for grads, loss in zip(grads_seq, losses, strict=True):
        updates, state = step(grads, state, params, value=jnp.float32(loss))
        updates_seq.append(updates)
        records.append({k: np.asarray(v) for k, v in lbw_optax.telemetry(state).items()})
    return updates_seq, records


def spiky_gradients(n=70, spike_at=60, factor=1e4):
    """Gaussian gradients of global norm ~4 (above a clip at 1), one ``factor``× spike."""
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), PARAMS)
        for _ in range(n)
    ]
    grads[spike_at] = jax.tree.map(lambda g: factor * g, grads[spike_at])
    return grads


def calm_losses(n=70):
    return list(3.0 + 0.05 * np.random.default_rng(1).standard_normal(n))


# --- clipping: which order the guard sees a spike in ------------------------------------------


def test_clipping_before_the_guard_hides_a_spike_from_it():
    grads = spiky_gradients()
    clip_first = optax.chain(optax.clip_by_global_norm(1.0), lbw_optax.lbw_adamw(1e-2))
    _, records = run(clip_first, grads, calm_losses())
    spike = records[60]
    # The guard sensed the clipped norm: nothing to see.
    assert float(spike["grad_norm"]) == pytest.approx(1.0)
    assert int(spike["regime"]) == Regime.STABLE and not bool(spike["held"])


@pytest.mark.parametrize(
    "tx",
    [
        lbw_optax.guard(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))),
        lbw_optax.guard(optax.adamw(1e-2), clip_threshold=1.0),
        lbw_optax.lbw_adamw(1e-2, clip_threshold=1.0),
    ],
    ids=["guard-of-chain", "guard-clip_threshold", "lbw_adamw-clip_threshold"],
)
def test_a_guard_that_clips_senses_the_raw_gradients_and_holds_the_spike(tx):
    grads = spiky_gradients()
    _, records = run(tx, grads, calm_losses())
    spike = records[60]
    assert float(spike["grad_norm"]) > 1e4
    assert int(spike["regime"]) == Regime.SPIKE and bool(spike["held"])


def test_clip_threshold_gives_the_updates_of_clipping_inside_the_guard():
    grads = spiky_gradients()
    inside, _ = run(
        lbw_optax.guard(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))),
        grads,
        calm_losses(),
    )
    threshold, _ = run(lbw_optax.lbw_adamw(1e-2, clip_threshold=1.0), grads, calm_losses())
    for got, want in zip(threshold, inside, strict=True):
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


def test_clip_threshold_leaves_the_state_structure_of_the_inner_optimizer():
    # Turning clipping on does not change what a checkpoint holds.
    plain = lbw_optax.lbw_adamw(1e-2).init(PARAMS)
    clipped = lbw_optax.lbw_adamw(1e-2, clip_threshold=1.0).init(PARAMS)
    assert jax.tree.structure(plain) == jax.tree.structure(clipped)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "1"])
def test_clip_threshold_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=rf"clip_threshold must be .*got {value!r}"):
        lbw_optax.guard(optax.adamw(1e-2), clip_threshold=value)
