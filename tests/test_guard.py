"""Behaviour of the guard and its two policies."""

import itertools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax
from lbw_optax import Regime, testing

# The governor's statistical scale cuts (its v1 defaults; off by default since the per-tensor
# limiter does the control): the tests of those rules turn them on.
DAMPING = dict(damping=0.2, spike_factor=0.5, overshoot_cos=0.0)

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full((4,), 0.5, jnp.float32)}


def run(tx, grads_seq, losses, params=PARAMS):
    """Runs a jitted update per step; returns per-step updates, telemetry and final state."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates_seq, records = [], []
    for grads, loss in zip(grads_seq, losses, strict=True):
        value = None if loss is None else jnp.float32(loss)
        updates, state = step(grads, state, params, value=value)
        updates_seq.append(updates)
        records.append({k: np.asarray(v) for k, v in lbw_optax.telemetry(state).items()})
    return updates_seq, records, state


def scaled_grads(factor):
    return jax.tree.map(lambda p: factor * (jnp.ones_like(p) * 0.1 + 0.01 * p), PARAMS)


# --- identity properties ----------------------------------------------------------------------


def test_governor_is_identity_and_stable_under_constant_signals():
    n = 80
    grads = [scaled_grads(1.0)] * n
    # The paper's unclipped guard: the identity over plain AdamW.
    guarded, records, _ = run(lbw_optax.lbw_adamw(1e-2, clip_threshold=None), grads, [2.5] * n)
    reference_updates = _plain_adamw_updates(grads, 1e-2)
    for got, want in zip(guarded, reference_updates, strict=True):
        chex.assert_trees_all_equal(got, want)
    assert {int(r["regime"]) for r in records} == {Regime.STABLE}
    assert all(float(r["scale"]) == 1.0 for r in records)
    assert int(records[-1]["control_active_steps"]) == 0
    assert int(records[-1]["regime_switches"]) == 0
    assert float(records[-1]["control_energy"]) == 0.0


def _plain_adamw_updates(grads_seq, lr, params=PARAMS):
    tx = optax.adamw(lr)
    state = tx.init(params)
    out = []
    for g in grads_seq:
        u, state = jax.jit(tx.update)(g, state, params)
        out.append(u)
    return out


def _pinned(name):
    if name == "governor":
        return lbw_optax.governor_policy(min_scale=1.0, max_scale=1.0)
    return lbw_optax.reference_policy(min_scale=1.0)


finite_factor = st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False)

# Built once, so that each property test compiles its scan over the sequence once.
DIRECTION = scaled_grads(1.0)
ADAMW = optax.adamw(1e-2)
PINNED = {name: lbw_optax.guard(ADAMW, policy=_pinned(name)) for name in ("governor", "reference")}
GUARDED = {name: lbw_optax.guard(ADAMW, policy=name) for name in ("governor", "reference")}


def _losses(values):
    return np.asarray(values, np.float64).astype(np.float32)


@pytest.mark.parametrize("name", ["governor", "reference"])
@hypothesis.given(factors=st.lists(finite_factor, min_size=30, max_size=30))
def test_pinned_scale_bounds_make_any_policy_the_identity(name, factors):
    grads = testing.scaled(DIRECTION, factors)
    losses = _losses([2.0 * f for f in factors])
    # Equal to rounding: inside one scan XLA may fuse the two programs differently (the
    # per-step jitted updates are bit-exact, see the tests above and below).
    _, states = testing.assert_identity_when_pinned(
        PINNED[name], ADAMW, PARAMS, grads, losses, rtol=1e-6
    )
    assert np.all(np.asarray(states.scale) == 1.0) and not np.any(np.asarray(states.held))


# --- the published rule, reproduced by hand ------------------------------------------------------


def published_rule(
    grad_seq, *, stress=1.1, spike=1.5, min_scale=0.1, recovery=0.01, every=10, decay=0.85
):
    """An independent NumPy transcription of the vendor rule (REFERENCES.md §1)."""
    scale, mode, ema, prev_mean = 1.0, "calm", None, None
    scales, modes = [], []
    for step, grads in enumerate(grad_seq, start=1):
        if step == 1 or step % every == 0:
            leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
            x = max(float(np.mean(g**2)) for g in leaves)
            mean = float(np.concatenate([g.ravel() for g in leaves]).mean())
            ema = x if ema is None else decay * ema + (1 - decay) * x
            r = x / (ema + 1e-12)
            flip = prev_mean is not None and prev_mean * mean < 0
            prev_mean = mean
            if r > spike:
                mode, scale = "spike", max(min_scale, 0.7 * scale)
            elif r > stress or flip:
                mode, scale = "oscillation", max(min_scale, 0.85 * scale)
            else:
                mode, scale = "calm", min(1.0, scale + recovery)
        scales.append(scale)
        modes.append(mode)
    return scales, modes


def scripted_gradients():
    """Calm (steps 1-40), oscillation by sign flips (41-80), spike (81-100), calm (101-200)."""
    seq = []
    for step in range(1, 201):
        if step <= 40:
            factor = 1.0
        elif step <= 80:
            factor = -1.0 if (step // 10) % 2 else 1.0
        elif step <= 100:
            factor = 8.0
        else:
            factor = 1.0
        seq.append(scaled_grads(factor))
    return seq


def test_reference_policy_reproduces_the_published_rule():
    grads = scripted_gradients()
    want_scales, want_modes = published_rule(grads)
    tx = lbw_optax.lbw_adamw(1e-2, policy="reference", clip_threshold=None)  # The paper's.
    updates, records, _ = run(tx, grads, [None] * 200)
    mode_of = {"calm": Regime.STABLE, "oscillation": Regime.OSCILLATION, "spike": Regime.SPIKE}
    np.testing.assert_allclose([float(r["scale"]) for r in records], want_scales, rtol=1e-6)
    assert [int(r["regime"]) for r in records] == [mode_of[m] for m in want_modes]
    # Every phase happened, so the comparison is not vacuous.
    assert set(want_modes) == {"calm", "oscillation", "spike"}
    assert min(want_scales) < 0.6
    plain = _plain_adamw_updates(grads, 1e-2)
    for got, base, scale in zip(updates, plain, want_scales, strict=True):
        chex.assert_trees_all_close(got, jax.tree.map(lambda u, s=scale: u * s, base), rtol=1e-6)


class _NeedsTheLoss(lbw_optax.GovernorPolicy):
    needs_value = True


def test_both_policies_work_without_value_and_a_policy_that_needs_it_requires_it():
    # Without value= the governor's loss cues are off (tests/test_composition.py).
    grads = scaled_grads(1.0)
    for policy in ("reference", "governor"):
        tx = lbw_optax.lbw_adamw(1e-3, policy=policy)
        _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
        assert not bool(lbw_optax.telemetry(state)["loss_seen"])
    tx = lbw_optax.lbw_adamw(1e-3, policy=_NeedsTheLoss())
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(grads, tx.init(PARAMS), PARAMS)


# --- robustness under arbitrary sequences ---------------------------------------------------------

special = st.sampled_from([1.0, 1e6, -1e6, float("nan"), float("inf"), 1e-6, 0.0])
factor_or_special = st.one_of(st.floats(-10.0, 10.0, allow_nan=False), special)


@pytest.mark.parametrize("name", ["governor", "reference"])
@hypothesis.given(
    grad_factors=st.lists(factor_or_special, min_size=40, max_size=40),
    loss_factors=st.lists(factor_or_special, min_size=40, max_size=40),
)
def test_scale_bounded_and_state_finite_for_any_sequence(name, grad_factors, loss_factors):
    tx = GUARDED[name]
    low, high = 0.1, 1.0  # both policies' default bounds
    grads = testing.scaled(DIRECTION, grad_factors)
    losses = _losses([2.0 + lf for lf in loss_factors])
    # Updates, every state and the parameters they are applied to stay finite.
    updates, states, _ = testing.assert_finite_under(tx, PARAMS, grads, losses)
    scale = np.asarray(states.scale)
    assert np.all((low <= scale) & (scale <= high))
    inner = [tx.init(PARAMS).inner_state] + [
        jax.tree.map(lambda x, i=i: x[i], states.inner_state) for i in range(len(scale))
    ]
    for i in np.flatnonzero(np.asarray(states.held)):
        assert all(not np.any(np.asarray(u[i])) for u in jax.tree.leaves(updates))
        chex.assert_trees_all_equal(inner[i + 1], inner[i])


def test_nonfinite_step_is_held_and_the_next_finite_step_proceeds_normally():
    tx = lbw_optax.guard(optax.adamw(1e-2), policy=_pinned("governor"))
    good = [scaled_grads(1.0), scaled_grads(2.0)]
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), scaled_grads(1.0))
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    _, state = update(good[0], state, PARAMS, value=jnp.float32(1.0))
    inner = state.inner_state
    for poison, loss in [(bad, 1.0), (good[1], float("nan")), (good[1], float("inf"))]:
        u, state = update(poison, state, PARAMS, value=jnp.float32(loss))
        assert bool(state.held) and int(state.regime) == Regime.NONFINITE
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
        chex.assert_trees_all_equal(state.inner_state, inner)
        chex.assert_tree_all_finite(state)
    assert int(state.nonfinite_steps) == 3 and int(state.skipped_steps) == 3
    u2, state = update(good[1], state, PARAMS, value=jnp.float32(1.0))
    want = _plain_adamw_updates(good, 1e-2)[1]
    chex.assert_trees_all_equal(u2, want)
    assert int(state.step) == 5 and not bool(state.held)


# --- the governor's regimes ------------------------------------------------------------------


def noisy_losses(n, seed=0, level=3.0, noise=0.05):
    rng = np.random.default_rng(seed)
    return list(level + noise * rng.standard_normal(n))


def test_governor_does_not_chatter_on_stationary_noise():
    n = 300
    losses = noisy_losses(n)
    rng = np.random.default_rng(1)
    grads = [scaled_grads(1.0 + 0.05 * rng.standard_normal()) for _ in range(n)]
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2), grads, losses)
    assert int(records[-1]["regime_switches"]) == 0
    assert int(records[-1]["control_active_steps"]) == 0


def test_governor_spike_holds_then_recovers_to_stable():
    n = 200
    losses = noisy_losses(n)
    losses[60] = 50.0  # a severe loss spike
    grads = [scaled_grads(1.0)] * n
    grads[60] = scaled_grads(1e3)
    policy = lbw_optax.governor_policy(**DAMPING)
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2, policy=policy), grads, losses)
    spike = records[60]
    assert int(spike["regime"]) == Regime.SPIKE and bool(spike["held"])
    assert float(spike["scale"]) == pytest.approx(0.5)
    # Hysteresis: the damped regime persists a while, then recovery releases the scale.
    regimes = [int(r["regime"]) for r in records]
    assert Regime.RECOVERY in regimes[61:]
    assert regimes[-1] == Regime.STABLE and float(records[-1]["scale"]) == 1.0
    scales = np.array([float(r["scale"]) for r in records[61:]])
    assert np.all(np.diff(scales) <= 0.01 + 1e-6)  # release is slew limited
    assert int(records[-1]["skipped_steps"]) == 1
    # Statistics were not poisoned by the outlier.
    assert float(records[61]["loss_slow"]) < 3.5


def test_governor_damps_a_rising_loss_and_stays_in_bounds():
    n = 200
    losses = [3.0] * 40 + [3.0 * 1.02**k for k in range(160)]
    grads = [scaled_grads(1.0)] * n
    _, records, _ = run(
        lbw_optax.lbw_adamw(1e-2, policy=lbw_optax.governor_policy(min_scale=0.2, **DAMPING)),
        grads,
        losses,
    )
    regimes = {int(r["regime"]) for r in records}
    assert Regime.STRESSED in regimes
    assert float(records[-1]["scale"]) == pytest.approx(0.2)
    assert all(0.2 - 1e-6 <= float(r["scale"]) <= 1.0 for r in records)


def test_telemetry_counters_match_the_recorded_trajectory():
    grads = scripted_gradients()
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2, policy="reference"), grads, [None] * 200)
    scales = np.array([float(r["scale"]) for r in records])
    regimes = [Regime.STABLE] + [int(r["regime"]) for r in records]
    last = records[-1]
    assert int(last["control_active_steps"]) == int(np.sum(scales != 1.0))
    assert int(last["regime_switches"]) == sum(a != b for a, b in itertools.pairwise(regimes))
    np.testing.assert_allclose(float(last["control_energy"]), np.sum(np.abs(1 - scales)), rtol=1e-5)
    assert int(last["step"]) == 200


def test_telemetry_fields_are_reachable_with_tree_get():
    tx = optax.chain(optax.clip_by_global_norm(1.0), lbw_optax.lbw_adamw(1e-3))
    state = tx.init(PARAMS)
    _, state = tx.update(scaled_grads(1.0), state, PARAMS, value=jnp.float32(1.0))
    for name in [
        "step",
        "regime",
        "scale",
        "control_active_steps",
        "regime_switches",
        "control_energy",
        "skipped_steps",
        "nonfinite_steps",
        "loss",
        "grad_norm",
    ]:
        assert optax.tree.get(state, name) is not None, name
        assert name in lbw_optax.telemetry(state)


def test_telemetry_rejects_ambiguous_states_and_is_empty_without_guard():
    tx = optax.chain(lbw_optax.lbw_adamw(1e-3), lbw_optax.lbw_adamw(1e-3))
    with pytest.raises(ValueError, match="more than one field"):
        lbw_optax.telemetry(tx.init(PARAMS))
    assert lbw_optax.telemetry(optax.adamw(1e-3).init(PARAMS)) == {}


# --- validation -------------------------------------------------------------------------------

INVALID = [
    (lbw_optax.reference_policy, "min_scale", 0.0),
    (lbw_optax.reference_policy, "min_scale", 1.5),
    (lbw_optax.reference_policy, "every", 0),
    (lbw_optax.reference_policy, "every", 2.5),
    (lbw_optax.reference_policy, "ema_decay", 1.0),
    (lbw_optax.reference_policy, "spike_threshold", -1.0),
    (lbw_optax.reference_policy, "recovery", float("nan")),
    (lbw_optax.reference_policy, "use_max", 1),
    (lbw_optax.governor_policy, "max_scale", 0.0),
    (lbw_optax.governor_policy, "min_scale", 2.0),
    (lbw_optax.governor_policy, "warmup", -1),
    (lbw_optax.governor_policy, "slow_decay", 1.0),
    (lbw_optax.governor_policy, "spike_z", 0.0),
    (lbw_optax.governor_policy, "hold_z", 1.0),
    (lbw_optax.governor_policy, "dwell", 0),
    (lbw_optax.governor_policy, "damping", 1.0),
    (lbw_optax.governor_policy, "spike_factor", 0.0),
    (lbw_optax.governor_policy, "release", -0.1),
    (lbw_optax.governor_policy, "max_holds", -1),
    (lbw_optax.governor_policy, "stress_trend", float("inf")),
    (lbw_optax.governor_policy, "overshoot_cos", 1.5),
    (lbw_optax.governor_policy, "hold_ratio", 1.0),
    (lbw_optax.governor_policy, "alignment_decay", 1.0),
    (lbw_optax.governor_policy, "limit_anneal", -1.0),
    (lbw_optax.governor_policy, "max_boost", 0.5),
]


@pytest.mark.parametrize(
    ("factory", "name", "value"), INVALID, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_invalid_hyperparameters_name_the_argument_and_value(factory, name, value):
    with pytest.raises(ValueError, match=rf"{name}.*{value!r}".replace("(", r"\(")):
        factory(**{name: value})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": 1e-3, "b1": 1.0}, "b1"),
        ({"learning_rate": 1e-3, "b2": -0.1}, "b2"),
        ({"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": 1e-3, "policy": "unknown"}, "policy"),
    ],
)
def test_lbw_adamw_validates_its_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lbw_optax.lbw_adamw(**kwargs)


# --- the gradient–momentum alignment cue ----------------------------------------------------------


def test_governor_damps_when_gradients_oppose_the_momentum():
    n = 80
    grads = [scaled_grads((-1.0) ** k) for k in range(n)]  # every step reverses the last
    losses = [2.0] * n
    policy = lbw_optax.governor_policy(**DAMPING)
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2, policy=policy), grads, losses)
    assert float(records[10]["grad_momentum_cos"]) < -0.9
    regimes = [int(r["regime"]) for r in records]
    assert Regime.OSCILLATION in regimes
    assert float(records[-1]["scale"]) < 0.5
    # Without the cue the same sequence is left alone.
    policy = lbw_optax.governor_policy(**{**DAMPING, "overshoot_cos": None})
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2, policy=policy), grads, losses)
    assert {int(r["regime"]) for r in records} == {Regime.STABLE}


def test_alignment_is_not_sensed_without_a_first_moment():
    n = 40
    grads = [scaled_grads((-1.0) ** k) for k in range(n)]
    _, records, _ = run(lbw_optax.guard(optax.sgd(1e-2)), grads, [2.0] * n)
    assert all(float(r["grad_momentum_cos"]) == 0.0 for r in records)
    assert {int(r["regime"]) for r in records} == {Regime.STABLE}


def test_governor_holds_a_huge_gradient_spike_even_after_a_noisy_start():
    # Early training with wildly varying gradient norms inflates the log-norm variance, so a
    # z-score alone would let a 1000x spike through; the hold_ratio rule still holds it.
    rng = np.random.default_rng(0)
    n = 60
    factors = list(np.exp(rng.uniform(-4.0, 4.0, 40))) + [1.0] * 19 + [1e3]
    grads = [scaled_grads(f) for f in factors]
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2), grads, noisy_losses(n))
    assert float(records[-1]["grad_z"]) < 8.0  # the z-score would not have held it
    assert bool(records[-1]["held"]) and int(records[-1]["regime"]) == Regime.SPIKE
    policy = lbw_optax.governor_policy(hold_ratio=1e4)
    _, records, _ = run(lbw_optax.lbw_adamw(1e-2, policy=policy), grads, noisy_losses(n))
    assert not bool(records[-1]["held"])


# --- safety of the guard itself ---------------------------------------------------------------


@pytest.mark.parametrize("inner", [None, "adamw", optax.adamw])
def test_guard_rejects_what_is_not_a_transformation(inner):
    with pytest.raises(ValueError, match=r"inner must be an optax\.GradientTransformation"):
        lbw_optax.guard(inner)


def test_guard_over_an_empty_tree_is_the_identity():
    # e.g. a multi_transform group that holds no parameters.
    for tx in (lbw_optax.lbw_adamw(1e-3), lbw_optax.guard(optax.adamw(1e-3), policy="reference")):
        state = tx.init({})
        updates, state = jax.jit(tx.update)({}, state, {}, value=jnp.float32(1.0))
        assert updates == {} and int(state.step) == 1 and not bool(state.held)
    groups = optax.multi_transform(
        {"a": lbw_optax.lbw_adamw(1e-3), "b": optax.adamw(1e-3)}, {"w": "b", "b": "b"}
    )
    state = groups.init(PARAMS)
    updates, _ = groups.update(scaled_grads(1.0), state, PARAMS, value=jnp.float32(1.0))
    chex.assert_tree_all_finite(updates)


def _nan_above(limit):
    """A transformation whose update turns NaN, from finite gradients, when one exceeds
    ``limit`` (as an optimizer whose arithmetic overflows would)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        bad = jnp.any(jnp.stack([jnp.max(g) > limit for g in jax.tree.leaves(updates)]))
        out = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, -0.1 * g), updates)
        return out, optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def test_a_nonfinite_inner_update_is_held_and_never_reaches_the_parameters():
    for policy in ("governor", "reference"):
        tx = lbw_optax.guard(_nan_above(1.0), policy=policy, check_updates=True)
        params, state = PARAMS, tx.init(PARAMS)
        update = jax.jit(tx.update)
        for k in range(5):
            grads = scaled_grads(100.0 if k == 2 else 1.0)
            updates, state = update(grads, state, params, value=jnp.float32(2.0))
            params = optax.apply_updates(params, updates)
            chex.assert_tree_all_finite(params)
            if k == 2:
                assert bool(state.held) and int(state.regime) == Regime.NONFINITE
                # Gradients were finite: the inner state advances (see guard's docstring).
                assert int(state.inner_state.count) == 3
        assert int(state.nonfinite_steps) == 1 and int(state.skipped_steps) == 1
        chex.assert_tree_all_finite(state)


def test_without_the_update_check_a_nonfinite_inner_update_goes_through():
    # What check_updates buys (and why it is on whenever the policy senses the update).
    tx = lbw_optax.guard(_nan_above(1.0), policy="reference")
    state = tx.init(PARAMS)
    updates, state = jax.jit(tx.update)(scaled_grads(100.0), state, PARAMS)
    assert not bool(state.held)
    assert not np.isfinite(np.asarray(updates["w"])).all()
    with pytest.raises(ValueError, match="check_updates=False"):
        lbw_optax.guard(optax.adamw(1e-3), policy=lbw_optax.governor_policy(), check_updates=False)


def test_bf16_moments_that_overflow_never_reach_the_parameters():
    # bf16(0.999) rounds to 1, so AdamW's bias correction divides by zero: NaN updates from
    # finite gradients. The guard holds every such step instead of applying it.
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    tx = optax.inject_hyperparams(lbw_optax.lbw_adamw)(learning_rate=1e-3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
        updates, state = update(grads, state, params, value=jnp.float32(2.0))
        params = optax.apply_updates(params, updates)
        chex.assert_tree_all_finite(params)
    assert int(lbw_optax.telemetry(state)["nonfinite_steps"]) >= 1


def test_a_parameter_called_mu_does_not_hide_the_first_moment():
    params = {"mu": jnp.ones((3,)), "w": jnp.ones((2, 2))}
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    state = optax.adamw(1e-3).init(params)
    found = lbw_optax._sense.find_first_moment(state, grads)
    assert found is not None
    chex.assert_trees_all_equal(found, state[0].mu)
    tx = lbw_optax.lbw_adamw(1e-2, policy=lbw_optax.governor_policy(overshoot_cos=0.0))
    _, records, _ = run(tx, [grads] * 3, [2.0] * 3, params=params)
    assert float(records[-1]["grad_momentum_cos"]) > 0.99


# --- the governor's per-tensor limiter, restated in NumPy --------------------------------


_R, _FLOOR = 0.05, 0.02  # The limiter tests' ratio cap and parameter-norm floor.


def _limited_sgd(limit_anneal):
    """SGD(0.1) under the governor's limiter alone: its params, state, jitted update and rng."""
    policy = lbw_optax.governor_policy(
        max_update_ratio=_R, param_floor=_FLOOR, limit_anneal=limit_anneal
    )
    tx = lbw_optax.guard(optax.sgd(0.1), policy=policy)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros((4,))}
    return params, tx.init(params), jax.jit(tx.update), np.random.default_rng(0)


def _numpy_limit(u, p, limit):
    """The per-tensor limit restated: ``u`` scaled so that ``‖u‖ / max(‖p‖, floor·√n)`` is at
    most ``limit``; also whether it was scaled."""
    ratio = np.linalg.norm(u) / max(np.linalg.norm(np.asarray(p)), _FLOOR * np.sqrt(u.size))
    return (limit / ratio if ratio > limit else 1.0) * u, ratio > limit


def test_per_tensor_limiter_matches_its_numpy_restatement():
    params, state, update, rng = _limited_sgd(limit_anneal=0.0)
    for _ in range(6):
        grads = {k: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for k, p in params.items()}
        updates, state = update(grads, state, params, value=jnp.float32(2.0))
        limited = 0
        for k in params:
            want, was_limited = _numpy_limit(-0.1 * np.asarray(grads[k]), params[k], _R)
            limited += was_limited
            np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=1e-5, atol=1e-7)
        assert int(state.policy_state.limited_tensors) == limited
        params = optax.apply_updates(params, updates)
    applied = np.sqrt(sum(np.sum(np.square(np.asarray(updates[k]))) for k in params))
    inner = 0.1 * np.sqrt(sum(np.sum(np.square(np.asarray(grads[k]))) for k in params))
    np.testing.assert_allclose(float(state.effective_scale), applied / inner, rtol=1e-5)


def test_annealed_limit_follows_the_update_norm_relative_to_its_peak():
    params, state, update, rng = _limited_sgd(limit_anneal=1.0)
    peak, limits = 0.0, []
    for size in (1.0, 2.0, 3.0, 1.5, 0.5, 0.2):  # The update grows, then decays.
        grads = {
            k: jnp.asarray(size * rng.normal(size=p.shape), jnp.float32) for k, p in params.items()
        }
        updates, state = update(grads, state, params, value=jnp.float32(2.0))
        inner = {k: -0.1 * np.asarray(g) for k, g in grads.items()}
        norm = np.sqrt(sum(np.sum(np.square(u)) for u in inner.values()))
        peak = max(peak, norm)
        limit = _R * norm / peak
        limits.append(limit)
        for k in params:
            want, _ = _numpy_limit(inner[k], params[k], limit)
            np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=1e-5)
        np.testing.assert_allclose(float(state.policy_state.peak_update_norm), peak, rtol=1e-6)
        params = optax.apply_updates(params, updates)
    assert limits[2] == _R and limits[-1] < _R / 10  # Full at the peak, a tenth after it.


# --- the trust-ratio floor (max_boost) ----------------------------------------------------


def _boosted_sgd(lr, **knobs):
    policy = lbw_optax.governor_policy(max_update_ratio=_R, param_floor=_FLOOR, **knobs)
    tx = lbw_optax.guard(optax.sgd(lr), policy=policy)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones((4,))}
    return params, tx.init(params), jax.jit(tx.update)


def test_boost_raises_a_too_low_step_slowly_and_drops_to_one_on_a_spike():
    """A calm run whose steps stay far below the limit: once warm and the peak ratio settled
    (``calm_steps``), the applied scale rises by ``release`` per step, up to ``max_boost``; a
    spike drops it to 1 at once, and the limiter still bounds every boosted step."""
    knobs = dict(max_boost=2.0, release=0.05, warmup=5, calm_steps=8)
    params, state, update = _boosted_sgd(1e-3, **knobs)
    grads = {k: jnp.full(p.shape, 0.1, jnp.float32) for k, p in params.items()}
    scales = []
    for _ in range(40):
        updates, state = update(grads, state, params, value=jnp.float32(2.0))
        scales.append(float(state.scale))
    # Warm after 5 steps; the peak set at step 1 has not grown for 8 steps from step 10 on.
    assert scales[:9] == [1.0] * 9 and scales[9] == pytest.approx(1.05)
    assert np.all(np.diff(scales) <= 0.05 + 1e-6) and scales[-1] == pytest.approx(2.0)
    np.testing.assert_allclose(np.asarray(updates["w"]), -2e-3 * 0.1, rtol=1e-5)
    spike = {k: 1e3 * g for k, g in grads.items()}
    _, state = update(spike, state, params, value=jnp.float32(2.0))
    assert float(state.policy_state.boost) == 1.0 and float(state.scale) <= 1.0
    assert lbw_optax.governor_policy(max_boost=2.0).scale_bounds == (0.1, 2.0)


def test_no_boost_where_the_steps_reached_the_limit_and_none_by_default():
    params, state, update = _boosted_sgd(1.0, max_boost=3.0, release=0.05, warmup=2)
    grads = {k: jnp.full(p.shape, 0.1, jnp.float32) for k, p in params.items()}
    for _ in range(20):
        _, state = update(grads, state, params, value=jnp.float32(2.0))
        assert float(state.policy_state.boost) == 1.0
    assert float(state.policy_state.peak_update_ratio) > _R
    default = lbw_optax.governor_policy()
    assert isinstance(default.init().boost, optax.MaskedNode)
    assert isinstance(default.init().peak_update_ratio, optax.MaskedNode)
    with pytest.raises(ValueError, match="max_boost > 1 needs the limiter"):
        lbw_optax.governor_policy(max_boost=2.0, max_update_ratio=None)
