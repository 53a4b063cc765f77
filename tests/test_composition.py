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
    """Runs a jitted update per step; returns the per-step updates and telemetry (and keeps the
    final state in ``run.state``)."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates_seq, records = [], []
    for grads, loss in zip(grads_seq, losses, strict=True):
        updates, state = step(grads, state, params, value=jnp.float32(loss))
        updates_seq.append(updates)
        records.append({k: np.asarray(v) for k, v in lbw_optax.telemetry(state).items()})
    run.state = state
    return updates_seq, records


def spiky_gradients(n=30, spike_at=25, factor=1e4):
    """Gaussian gradients of global norm ~4 (above a clip at 1), one ``factor``× spike."""
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), PARAMS)
        for _ in range(n)
    ]
    grads[spike_at] = jax.tree.map(lambda g: factor * g, grads[spike_at])
    return grads


def calm_losses(n=30):
    return list(3.0 + 0.05 * np.random.default_rng(1).standard_normal(n))


# --- clipping: which order the guard sees a spike in ------------------------------------------


def test_clipping_before_the_guard_hides_a_spike_from_it():
    grads = spiky_gradients()
    clip_first = optax.chain(optax.clip_by_global_norm(1.0), lbw_optax.lbw_adamw(1e-2))
    _, records = run(clip_first, grads, calm_losses())
    spike = records[25]
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
    spike = records[25]
    assert float(spike["grad_norm"]) > 1e4
    assert int(spike["regime"]) == Regime.SPIKE and bool(spike["held"])


def test_clip_threshold_gives_the_updates_of_clipping_inside_the_guard():
    grads = spiky_gradients()
    # By name over a clip it can see, the governor has the clipped limit; inside a chain the
    # guard cannot see the clip, so the same policy is given as an instance.
    clipped = lbw_optax.governor_policy(max_update_ratio=lbw_optax.CLIPPED_MAX_UPDATE_RATIO)
    inside, _ = run(
        lbw_optax.guard(
            optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), policy=clipped
        ),
        grads,
        calm_losses(),
    )
    threshold, _ = run(lbw_optax.lbw_adamw(1e-2, clip_threshold=1.0), grads, calm_losses())
    # The same arithmetic; XLA may fuse the two programs differently (float rounding).
    for got, want in zip(threshold, inside, strict=True):
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


def test_clip_threshold_leaves_the_state_structure_of_the_inner_optimizer():
    # Turning clipping on does not change what a checkpoint holds.
    plain = lbw_optax.lbw_adamw(1e-2, clip_threshold=None).init(PARAMS)
    clipped = lbw_optax.lbw_adamw(1e-2).init(PARAMS)
    assert jax.tree.structure(plain) == jax.tree.structure(clipped)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "1"])
def test_clip_threshold_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=rf"clip_threshold must be .*got {value!r}"):
        lbw_optax.guard(optax.adamw(1e-2), clip_threshold=value)


# --- wrappers that forward value= ----------------------------------------------------------------

FORWARDING = {
    "inject_hyperparams": lambda: optax.inject_hyperparams(lbw_optax.lbw_adamw)(learning_rate=1e-2),
    "multi_transform": lambda: optax.multi_transform(
        {"governed": lbw_optax.lbw_adamw(1e-2), "plain": optax.adamw(1e-2)},
        {"w": "governed", "b": "plain"},
    ),
    "apply_if_finite": lambda: optax.apply_if_finite(lbw_optax.lbw_adamw(1e-2), 3),
    "MultiSteps": lambda: optax.MultiSteps(lbw_optax.lbw_adamw(1e-2), every_k_schedule=2),
}


@pytest.mark.parametrize("name", FORWARDING)
def test_wrappers_that_forward_value_give_the_guard_the_loss_and_the_spike(name):
    grads = spiky_gradients()
    _, records = run(FORWARDING[name](), grads, calm_losses())
    assert bool(records[-1]["loss_seen"])
    assert int(records[25]["regime"]) == Regime.SPIKE and bool(records[25]["held"])
    norm = lambda tree: float(optax.tree.norm(tree))
    if name == "multi_transform":  # Its group's gradients only.
        assert float(records[0]["grad_norm"]) == pytest.approx(norm(grads[0]["w"]), rel=1e-5)
    elif name == "MultiSteps":  # The mean gradient of each k mini-steps, once per k.
        mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[0], grads[1])
        assert int(records[-1]["step"]) == 15
        assert float(records[1]["grad_norm"]) == pytest.approx(norm(mean), rel=1e-5)
    else:
        assert float(records[0]["grad_norm"]) == pytest.approx(norm(grads[0]), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "guard_holds"),
    [
        ("inject_hyperparams", 1),
        ("multi_transform", 1),
        # apply_if_finite rejects the NaN gradients before the guard sees them.
        ("apply_if_finite", 0),
        # MultiSteps accumulates the NaN, and its accumulator stays NaN (it resets by
        # multiplying with 0): the guard holds that step and every later one (10 of 15)...
        ("MultiSteps", 10),
        # ... unless MultiSteps skips non-finite mini-steps itself.
        ("MultiSteps-skip_not_finite", 0),
    ],
)
def test_who_holds_a_nan_gradient_in_each_wrapper(name, guard_holds):
    grads = spiky_gradients(factor=1.0)
    # In "w" (multi_transform's governed group; its plain AdamW group would take a NaN in "b").
    grads[10] = {**grads[10], "w": grads[10]["w"].at[0, 0].set(jnp.nan)}
    if name == "MultiSteps-skip_not_finite":
        tx = optax.MultiSteps(
            lbw_optax.lbw_adamw(1e-2), 2, should_skip_update_fn=optax.skip_not_finite
        )
    else:
        tx = FORWARDING[name]()
    updates, records = run(tx, grads, calm_losses())
    assert int(records[-1]["nonfinite_steps"]) == guard_holds
    chex.assert_tree_all_finite(updates)
    if name == "apply_if_finite":
        assert int(run.state.total_notfinite) == 1


# --- without value=: wrappers that do not forward the loss -------------------------------------


def _forwarding_no_extra_args(inner):
    """A wrapper written against the plain optax.GradientTransformation interface."""

    def update_fn(updates, state, params=None):
        return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update_fn)


def _records_through(wrapper, tx, grads_seq):
    """The guard's telemetry after each step, driven through ``wrapper`` (no ``value=``)."""
    records = []
    if wrapper == "train_state":
        train_state = pytest.importorskip("flax.training.train_state")

        state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
        apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
        for grads in grads_seq:
            state = apply(state, grads)
            records.append(lbw_optax.telemetry(state.opt_state))
        chex.assert_tree_all_finite(state.params)
        return records
    if wrapper == "lookahead":
        tx = optax.lookahead(tx, sync_period=5, slow_step_size=0.5)
        params = optax.LookaheadParams.init_synced(PARAMS)
    else:
        tx, params = _forwarding_no_extra_args(tx), PARAMS
    state, update = tx.init(params), jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        records.append(lbw_optax.telemetry(state))
    chex.assert_tree_all_finite(params)
    return records


WRAPPERS = ["train_state", "lookahead", "plain_wrapper"]


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_governor_runs_on_its_gradient_cues_where_value_is_not_forwarded(wrapper):
    grads = spiky_gradients()
    records = _records_through(wrapper, lbw_optax.lbw_adamw(1.0), grads)
    last, spike = records[-1], records[25]
    assert int(last["step"]) == 30 and not bool(last["loss_seen"])
    # The limiter needs no loss: a learning rate of 1 is held to 3.5 % of each tensor.
    assert int(records[0]["limited_tensors"]) == 2 and float(records[0]["effective_scale"]) < 0.1
    # The gradient cues need no loss either: the spike is held.
    assert int(spike["regime"]) == Regime.SPIKE and bool(spike["held"])
    # No loss statistic was fed a missing loss.
    for name in ("loss", "loss_fast", "loss_slow", "loss_var", "loss_z", "loss_trend"):
        assert float(last[name]) == 0.0, name
    assert int(last["steps_without_loss"]) == int(last["observed"])


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_reference_rule_runs_where_value_is_not_forwarded(wrapper):
    # It never reads the loss: the same decisions with or without it. (It decides on step 1
    # and every 10th: the spike is on step 30.)
    grads = spiky_gradients(n=30, spike_at=29)
    tx = lbw_optax.lbw_adamw(1e-2, policy="reference")
    records = _records_through(wrapper, tx, grads)
    _, with_loss = run(tx, grads, calm_losses())
    assert not bool(records[-1]["loss_seen"]) and bool(with_loss[-1]["loss_seen"])
    assert [float(r["scale"]) for r in records] == [float(r["scale"]) for r in with_loss]
    assert int(records[29]["regime"]) == Regime.SPIKE


def test_steps_without_a_loss_leave_the_loss_statistics_as_they_were():
    # A loss on every other step only, starting without one: the loss statistics are those of
    # the steps that had one, as if the others had not happened.
    n = 40
    grads, losses = spiky_gradients(n=n, spike_at=n - 1, factor=1.0), calm_losses(n)
    tx = lbw_optax.lbw_adamw(1e-2)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    for k in range(n):
        value = jnp.float32(losses[k]) if k % 2 else None
        _, state = update(grads[k], state, PARAMS, value=value)
    _, only_losses = run(tx, grads[1::2], losses[1::2])
    mixed = lbw_optax.telemetry(state)
    for name in ("loss_fast", "loss_slow", "loss_var"):
        np.testing.assert_allclose(mixed[name], only_losses[-1][name], rtol=1e-6, err_msg=name)
    assert int(mixed["observed"]) == n and int(mixed["steps_without_loss"]) == n // 2
    assert int(only_losses[-1]["steps_without_loss"]) == 0
    # The last step had a loss.
    assert bool(mixed["loss_seen"])


def test_lbw_adamw_is_the_governor_over_adamw_clipped_at_one_by_default():
    # The product default: the guard senses the raw gradients, AdamW gets them clipped at 1.0.
    grads, losses = spiky_gradients(), calm_losses()
    default, _ = run(lbw_optax.lbw_adamw(1e-2), grads, losses)
    explicit, _ = run(lbw_optax.guard(optax.adamw(1e-2), clip_threshold=1.0), grads, losses)
    unclipped, _ = run(lbw_optax.lbw_adamw(1e-2, clip_threshold=None), grads, losses)
    chex.assert_trees_all_equal(default, explicit)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(unclipped), strict=True)
    )
