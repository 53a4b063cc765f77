"""Defining behaviour of the peers (ZClip, skip-step, AdaGC, SPAM), checked against NumPy."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbw_optax

# A fixed unit direction split over two tensors: grads of global norm n are n * DIRECTION.
_RAW = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([[0.3, 1.0], [-1.5, 2.0]])}
_SCALE = np.sqrt(sum(np.sum(v**2) for v in _RAW.values()))
DIRECTION = {k: v / _SCALE for k, v in _RAW.items()}


def grads_of_norm(norm):
    return {k: jnp.asarray(norm * v, jnp.float32) for k, v in DIRECTION.items()}


def params_like():
    return {k: jnp.zeros(v.shape, jnp.float32) for k, v in DIRECTION.items()}


def tree_norm(tree):
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


# ---------------------------------------------------------------------------------------------
# ZClip


def zclip_reference(norms, *, alpha, z_threshold, warmup_steps, eps=1e-6, max_grad_norm=None):
    """The reference code (``zclip/zclip.py``: z-score mode, reciprocal clipping, the fixed
    ``max_grad_norm`` cap) in float64; returns the applied norms and the final statistics."""
    cap = lambda n: n if max_grad_norm is None else min(n, max_grad_norm)
    buffer, mean, var, out = [], None, None, []
    for n in norms:
        if mean is None:
            buffer.append(n)  # The raw norm, before the cap.
            if len(buffer) == warmup_steps:
                mean = float(np.mean(buffer))
                var = float(np.mean((np.array(buffer) - mean) ** 2))
            out.append(cap(n))
            continue
        std = np.sqrt(var)
        z = (n - mean) / (std + eps)
        clipped = mean + z_threshold**2 / z * std if z > z_threshold else n
        mean = alpha * mean + (1 - alpha) * clipped  # The EMA takes the z-clipped norm.
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
        out.append(cap(clipped))
    return out, mean, var


@pytest.mark.parametrize("max_grad_norm", [None, 1.0, 3.0])
def test_zclip_clips_to_reciprocal_threshold_after_warmup(max_grad_norm):
    norms = [1.0, 1.2, 0.9, 1.1, 0.95, 1.05, 4.0, 1.0, 0.98, 12.0, 1.1, 3.0, 1.0]
    kwargs = dict(alpha=0.9, z_threshold=2.0, warmup_steps=5, max_grad_norm=max_grad_norm)
    expected, mean, var = zclip_reference(norms, **kwargs)
    tx = lbw_optax.peers.zclip(**kwargs)
    state = tx.init(params_like())
    step = jax.jit(tx.update)
    got = []
    for n in norms:
        updates, state = step(grads_of_norm(n), state)
        got.append(tree_norm(updates))
        # Clipping rescales: the direction is kept.
        np.testing.assert_allclose(updates["a"] / got[-1], DIRECTION["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    uncapped, _, _ = zclip_reference(norms, **dict(kwargs, max_grad_norm=None))
    clipped = [e < n for e, n in zip(uncapped, norms, strict=True)]
    assert clipped[9] and sum(clipped) == int(state.zclip_clipped_steps) >= 2
    capped = [e < u for e, u in zip(expected, uncapped, strict=True)]
    assert sum(capped) == int(state.zclip_capped_steps)
    if max_grad_norm == 1.0:
        assert capped[1] and capped[6], "the cap acts during warm-up and after it"
    np.testing.assert_allclose(float(state.zclip_mean), mean, rtol=2e-5)
    np.testing.assert_allclose(float(state.zclip_var), var, rtol=1e-4)


def test_zclip_z_score_rule_never_clips_during_warmup():
    tx = lbw_optax.peers.zclip(warmup_steps=25, max_grad_norm=None)
    state = tx.init(params_like())
    for i in range(25):
        n = 1e4 if i == 20 else 1.0 + 0.01 * i
        updates, state = tx.update(grads_of_norm(n), state)
        np.testing.assert_allclose(tree_norm(updates), n, rtol=1e-5)
    assert int(state.zclip_clipped_steps) == 0 and int(state.zclip_observed) == 25


def test_zclip_fixed_cap_applies_in_warmup_and_statistics_see_the_raw_norms():
    norms = [0.5, 3.0, 2.0]
    tx = lbw_optax.peers.zclip(warmup_steps=3)  # max_grad_norm=1.0, the reference default.
    state = tx.init(params_like())
    got = []
    for n in norms:
        updates, state = tx.update(grads_of_norm(n), state)
        got.append(tree_norm(updates))
    np.testing.assert_allclose(got, [0.5, 1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(float(state.zclip_mean), np.mean(norms), rtol=1e-6)
    assert int(state.zclip_capped_steps) == 2 and int(state.zclip_clipped_steps) == 0


def test_zclip_constant_norms_have_zero_std_and_clip_to_the_mean():
    tx = lbw_optax.peers.zclip(warmup_steps=3, max_grad_norm=None)
    state = tx.init(params_like())
    for _ in range(3):
        _, state = tx.update(grads_of_norm(2.0), state)
    assert float(state.zclip_var) == pytest.approx(0.0, abs=1e-10)
    updates, state = tx.update(grads_of_norm(50.0), state)
    np.testing.assert_allclose(tree_norm(updates), 2.0, rtol=1e-5)
    chex.assert_tree_all_finite(state)


def test_zclip_leaves_nonfinite_gradients_and_statistics_alone():
    tx = lbw_optax.peers.zclip(warmup_steps=2, max_grad_norm=None)
    state = tx.init(params_like())
    for n in (1.0, 1.5, 1.2):
        _, state = tx.update(grads_of_norm(n), state)
    bad = {"a": jnp.array([jnp.nan, 1.0, 1.0]), "b": jnp.ones((2, 2))}
    updates, after = tx.update(bad, state)
    assert np.isnan(np.asarray(updates["a"][0])) and float(updates["a"][1]) == 1.0
    for name in ("zclip_mean", "zclip_var", "zclip_observed", "zclip_clipped_steps"):
        assert getattr(after, name) == getattr(state, name), name
    assert int(after.zclip_nonfinite_steps) == 1 and int(after.zclip_count) == 4
    updates, after = tx.update(grads_of_norm(1.1), after)
    np.testing.assert_allclose(tree_norm(updates), 1.1, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Skip-step


def run_skip_step(losses, norms, **kwargs):
    """Runs skip_step(adam) over scripted losses and gradient norms; returns each step.
    ``min_history`` is 20 unless given (short scripts; the default is tested apart)."""
    kwargs.setdefault("min_history", 20)
    tx = lbw_optax.peers.skip_step(optax.adam(1e-2), **kwargs)
    state = tx.init(params_like())
    step = jax.jit(tx.update)
    history = []
    for loss, norm in zip(losses, norms, strict=True):
        before = state
        updates, state = step(grads_of_norm(norm), state, value=jnp.float32(loss))
        history.append((before, updates, state))
    return history


def adam_state(state):
    return state.inner_state[0]


def test_skip_step_skips_a_loss_spike_keeps_moments_and_recovers():
    rng = np.random.default_rng(0)
    losses = [*(2.0 + 0.05 * rng.standard_normal(30)), 20.0, 2.0, 2.01]
    norms = [*(1.0 + 0.05 * rng.standard_normal(30)), 1.0, 1.0, 1.0]
    history = run_skip_step(losses, norms)
    before, updates, after = history[30]
    assert bool(after.skipstep_skipped) and int(after.skipstep_skipped_steps) == 1
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    chex.assert_trees_all_equal(adam_state(after), adam_state(before))
    # The spike is finite, so it is recorded in the window.
    assert int(after.skip_recorded) == 31
    for before, updates, after in history[31:]:
        assert not bool(after.skipstep_skipped)
        assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
        assert int(adam_state(after).count) == int(adam_state(before).count) + 1


def test_skip_step_skips_a_gradient_norm_spike():
    rng = np.random.default_rng(1)
    losses = [*(2.0 + 0.05 * rng.standard_normal(25)), 2.0]
    norms = [*(1.0 + 0.05 * rng.standard_normal(25)), 10.0]
    _, _, after = run_skip_step(losses, norms)[-1]
    assert bool(after.skipstep_skipped)
    np.testing.assert_allclose(float(after.skipstep_grad_norm), 10.0, rtol=1e-5)


def test_skip_step_threshold_is_mean_plus_k_sample_std_of_the_window_before_the_step():
    rng = np.random.default_rng(2)
    window_losses = 2.0 + 0.1 * rng.standard_normal(24)
    threshold = window_losses.mean() + 6.0 * window_losses.std(ddof=1)
    norms = [1.0] * 25
    for factor, skipped in ((1.001, True), (0.999, False)):
        losses = [*window_losses, threshold * factor]
        _, _, after = run_skip_step(losses, norms)[-1]
        assert bool(after.skipstep_skipped) == skipped


def test_skip_step_waits_for_min_history():
    losses = [2.0, 2.01, 1.99] * 6 + [100.0]  # 18 values recorded, spike at the 19th.
    _, _, after = run_skip_step(losses, [1.0] * len(losses))[-1]
    assert not bool(after.skipstep_skipped)
    losses = [2.0, 2.01, 1.99] * 7 + [100.0]  # 21 values recorded.
    _, _, after = run_skip_step(losses, [1.0] * len(losses))[-1]
    assert bool(after.skipstep_skipped)


def test_a_nan_loss_is_skipped_and_never_poisons_the_window():
    rng = np.random.default_rng(3)
    base = list(2.0 + 0.05 * rng.standard_normal(30))
    norms = [1.0] * 41
    with_nan = run_skip_step([*base, float("nan"), *([2.0] * 10)], norms)
    without = run_skip_step([*base, *([2.0] * 10)], norms[:40])
    _, updates, after = with_nan[30]
    assert bool(after.skipstep_skipped) and int(after.skipstep_nonfinite_steps) == 1
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    chex.assert_tree_all_finite(after)
    # Only the NaN step is skipped; the window is the one of the run without the NaN.
    assert [bool(s.skipstep_skipped) for _, _, s in with_nan[31:]] == [False] * 10
    final, reference = with_nan[-1][2], without[-1][2]
    chex.assert_trees_all_equal(final.skip_loss_window, reference.skip_loss_window)
    chex.assert_trees_all_equal(final.skip_recorded, reference.skip_recorded)


def test_skip_step_default_history_is_olmo_cores_half_window():
    # OLMo-core skips only once half a window of losses, the current one included, is stored:
    # with window 128 the first possible skip is step 64.
    losses = [2.0, 2.01, 1.99] * 21 + [100.0]  # 63 values recorded, spike at step 64.
    _, _, after = run_skip_step(losses, [1.0] * len(losses), min_history=None)[-1]
    assert bool(after.skipstep_skipped)
    losses = [*losses[:62], 100.0]  # 62 values recorded, spike at step 63.
    _, _, after = run_skip_step(losses, [1.0] * len(losses), min_history=None)[-1]
    assert not bool(after.skipstep_skipped)
    _, _, after = run_skip_step(losses, [1.0] * len(losses), min_history=None, window=8)[-1]
    assert bool(after.skipstep_skipped)  # window 8: 3 values suffice.


def _clipped_skip_step(inner, **kwargs):
    """Skip-step as OLMo-core runs it: over global-norm clipping at 1.0."""
    return lbw_optax.peers.skip_step(optax.chain(optax.clip_by_global_norm(1.0), inner), **kwargs)


def test_skip_step_over_clipping_skips_on_the_pre_clip_norm():
    """NumPy transcription: AdamW on the gradients clipped to norm 1; a step whose pre-clip
    norm is a 6σ outlier of the window is skipped (zero update) although its clipped norm is
    1 like its neighbours'."""
    rng = np.random.default_rng(7)
    norms = [*(3.0 + 0.1 * rng.standard_normal(8)), 30.0, 3.0]
    losses = [2.0] * len(norms)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    tx = _clipped_skip_step(optax.adam(lr, b1=b1, b2=b2, eps=eps), window=8)
    params = params_like()
    state = tx.init(params)
    m = {k: np.zeros(v.shape) for k, v in DIRECTION.items()}
    v = {k: np.zeros(v.shape) for k, v in DIRECTION.items()}
    window, t = [], 0
    for norm, loss in zip(norms, losses, strict=True):
        updates, state = tx.update(grads_of_norm(norm), state, params, value=jnp.float32(loss))
        ready = len(window) >= 3  # max(2, 8 // 2 - 1)
        skip = ready and norm > np.mean(window) + 6.0 * np.std(window, ddof=1)
        window = [*window, norm][-8:]
        if skip:
            chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
            continue
        t += 1
        for k, d in DIRECTION.items():
            g = d * min(norm, 1.0)  # Clipped to global norm 1 (direction kept).
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            want = -lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            np.testing.assert_allclose(updates[k], want, rtol=1e-4, atol=1e-7)
    assert t == len(norms) - 1 and int(state.skipstep_skipped_steps) == 1


def test_skip_step_window_is_a_ring_of_the_latest_values():
    losses = [2.0 + 0.01 * i for i in range(13)]
    _, _, after = run_skip_step(losses, [1.0] * 13, window=5, min_history=5)[-1]
    expected = np.array(losses[-5:])
    slots = np.arange(13 - 5, 13) % 5
    np.testing.assert_allclose(np.asarray(after.skip_loss_window)[slots], expected, rtol=1e-6)


def test_skip_step_requires_the_loss():
    tx = _clipped_skip_step(optax.adamw(1e-3))
    state = tx.init(params_like())
    with pytest.raises(ValueError, match="value=loss"):
        tx.update(grads_of_norm(1.0), state, params_like())


# ---------------------------------------------------------------------------------------------
# AdaGC


def adagc_reference(steps, *, beta, lambda_rel, warmup_steps, warmup_clip):
    """AdaGC's Algorithm 1 in float64; ``steps`` is a list of dicts of per-tensor arrays."""
    gamma, coefs = {}, []
    for t, grads in enumerate(steps, start=1):
        norms = {k: np.linalg.norm(v) for k, v in grads.items()}
        total = np.sqrt(sum(n**2 for n in norms.values()))
        coef = {}
        for k, n in norms.items():
            if t <= warmup_steps:
                coef[k] = min(warmup_clip / total, 1.0)
                clipped = coef[k] * n
                gamma[k] = clipped if t == 1 else min(gamma[k], clipped)
            else:
                coef[k] = min(lambda_rel * gamma[k] / n, 1.0)
                gamma[k] = beta * gamma[k] + (1 - beta) * coef[k] * n
        coefs.append(coef)
    return coefs, gamma


def test_adagc_per_tensor_clip_coefficients_match_numpy():
    rng = np.random.default_rng(4)
    steps = []
    for t in range(12):
        a = rng.standard_normal(3) * (1.0 + 0.1 * t)
        b = rng.standard_normal((2, 2)) * 0.2
        if t == 8:
            a = a * 30.0  # A spike in one tensor only.
        steps.append({"a": a, "b": b})
    kwargs = dict(beta=0.9, lambda_rel=1.05, warmup_steps=4, warmup_clip=1.5)
    expected, gamma = adagc_reference(steps, **kwargs)
    tx = lbw_optax.peers.adagc(**kwargs)
    state = tx.init(params_like())
    step = jax.jit(tx.update)
    for grads, coef in zip(steps, expected, strict=True):
        g32 = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
        updates, state = step(g32, state)
        for k in grads:
            np.testing.assert_allclose(float(state.adagc_clip_coef[k]), coef[k], rtol=2e-5)
            np.testing.assert_allclose(updates[k], coef[k] * grads[k], rtol=2e-5, atol=1e-7)
    # Per tensor: the spike in "a" is clipped hard and leaves the coefficient of "b" as it is.
    calm = [dict(g, a=g["a"] / 30.0) if t == 8 else g for t, g in enumerate(steps)]
    calm_coefs, _ = adagc_reference(calm, **kwargs)
    assert expected[8]["a"] < 0.05 < calm_coefs[8]["a"]
    assert expected[8]["b"] == calm_coefs[8]["b"]
    for k in gamma:
        np.testing.assert_allclose(float(state.adagc_gamma[k]), gamma[k], rtol=2e-5)


def test_adagc_defaults_are_the_authors_code():
    """beta 0.99 and lambda_rel 1.04 (the authors' Megatron patch), against the NumPy
    transcription of the algorithm."""
    rng = np.random.default_rng(8)
    steps = [
        {"a": rng.standard_normal(3) * (1 + 0.5 * t), "b": rng.standard_normal((2, 2))}
        for t in range(6)
    ]
    expected, gamma = adagc_reference(
        steps, beta=0.99, lambda_rel=1.04, warmup_steps=2, warmup_clip=1.0
    )
    tx = lbw_optax.peers.adagc(warmup_steps=2)
    state = tx.init(params_like())
    for grads, coef in zip(steps, expected, strict=True):
        _, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, state)
        for k in grads:
            np.testing.assert_allclose(float(state.adagc_clip_coef[k]), coef[k], rtol=2e-5)
    assert min(c["a"] for c in expected[2:]) < 1.0  # The relative clip acted.
    for k in gamma:
        np.testing.assert_allclose(float(state.adagc_gamma[k]), gamma[k], rtol=2e-5)


def test_adagc_tensor_with_zero_gradient_in_warmup_is_not_frozen():
    tx = lbw_optax.peers.adagc(warmup_steps=1)
    state = tx.init(params_like())
    zero_b = {"a": jnp.ones(3), "b": jnp.zeros((2, 2))}
    _, state = tx.update(zero_b, state)
    assert float(state.adagc_gamma["b"]) == 0.0
    updates, state = tx.update({"a": jnp.ones(3), "b": jnp.ones((2, 2))}, state)
    np.testing.assert_allclose(updates["b"], np.ones((2, 2)))
    assert float(state.adagc_gamma["b"]) == pytest.approx(2.0)


def test_adagc_leaves_nonfinite_gradients_and_gamma_alone():
    tx = lbw_optax.peers.adagc(warmup_steps=1)
    state = tx.init(params_like())
    _, state = tx.update(grads_of_norm(1.0), state)
    bad = {"a": jnp.array([jnp.inf, 1.0, 1.0]), "b": jnp.ones((2, 2))}
    updates, after = tx.update(bad, state)
    np.testing.assert_array_equal(updates["b"], np.ones((2, 2)))
    chex.assert_trees_all_equal(after.adagc_gamma, state.adagc_gamma)
    assert int(after.adagc_nonfinite_steps) == 1 and int(after.adagc_observed) == 1


# ---------------------------------------------------------------------------------------------
# SPAM


def spam_reference(grads, *, b1, b2, eps, theta, reset_interval, warmup_steps, clip_delay):
    """SPAM (paper's Algorithm 1 and ``galore_torch/SPAM.py``) in float64 on one array;
    returns updates, clips."""
    m = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    since_reset = warmup_steps
    out, clips = [], []
    for t, g in enumerate(grads, start=1):
        g = g.copy()
        if t % reset_interval == 0:
            m, v, since_reset = np.zeros_like(m), np.zeros_like(v), 0
        else:
            since_reset += 1
        # The reference's window: from step clip_delay on, and not in the clip_delay steps
        # that start at each reset (its ``grad_accu_steps``).
        window = t >= clip_delay and t % reset_interval >= clip_delay
        spike = window & (v > 0) & (g**2 > theta * v)
        g[spike] = np.sign(g[spike]) * np.sqrt(theta * v[spike])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        if since_reset < warmup_steps:
            scale = 1 - 0.99 * 0.5 * (1 + np.cos(np.pi * since_reset / (warmup_steps + 1)))
        else:
            scale = 1.0
        out.append(scale * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
        clips.append(int(spike.sum()))
    return out, clips


def test_spam_clips_spiked_elements_and_resets_moments_like_numpy():
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(6) * 0.1 for _ in range(16)]
    grads[5][2] = 40.0  # g² far above θ·v: clipped.
    grads[11][0] = -30.0
    kwargs = dict(
        b1=0.9, b2=0.99, eps=1e-8, theta=50.0, reset_interval=8, warmup_steps=3, clip_delay=2
    )
    expected, clips = spam_reference(grads, **kwargs)
    tx = lbw_optax.peers.scale_by_spam(**kwargs)
    state = tx.init({"w": jnp.zeros(6)})
    step = jax.jit(tx.update)
    for t, (g, want, n_clipped) in enumerate(zip(grads, expected, clips, strict=True), start=1):
        updates, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
        np.testing.assert_allclose(updates["w"], want, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
        assert int(state.record.spam_clipped) == n_clipped, t
    assert clips[5] >= 1 and clips[11] >= 1
    assert int(state.record.spam_resets) == 2 and int(state.record.spam_count) == 16


def test_spam_clips_nothing_in_the_first_steps_nor_after_a_reset():
    # Noise of constant magnitude (g²/v stays <= 10 with b2 = 0.9), and a spike in a fresh
    # element at each of the 1-based steps below.
    rng = np.random.default_rng(6)
    grads = [0.1 * np.sign(rng.standard_normal(6)) for _ in range(16)]
    for i, t in enumerate((2, 5, 10, 11, 12, 13)):
        grads[t - 1][i] = 50.0
    kwargs = dict(
        b1=0.9, b2=0.9, eps=1e-8, theta=50.0, reset_interval=10, warmup_steps=2, clip_delay=3
    )
    expected, clips = spam_reference(grads, **kwargs)
    assert [t for t, c in enumerate(clips, start=1) if c] == [5, 13]
    tx = lbw_optax.peers.scale_by_spam(**kwargs)
    state = tx.init({"w": jnp.zeros(6)})
    step = jax.jit(tx.update)
    for t, (g, want, n_clipped) in enumerate(zip(grads, expected, clips, strict=True), start=1):
        updates, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
        np.testing.assert_allclose(updates["w"], want, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
        assert int(state.record.spam_clipped) == n_clipped, t


def test_spam_default_window_is_the_references_20_steps():
    # A constant gradient: g²/v = 1/(1 - 0.999^k) > θ = 2 at every step, so every step where
    # clipping is allowed clips.
    tx = lbw_optax.peers.scale_by_spam(theta=2.0, reset_interval=30)
    state = tx.init({"w": jnp.zeros(2)})
    clipped = []
    for t in range(1, 45):
        _, state = tx.update({"w": jnp.ones(2)}, state)
        if int(state.record.spam_clipped):
            clipped.append(t)
    assert clipped == list(range(20, 30))  # Not 1-19, not the reset step 30 nor 31-44 (< 50).


def test_spam_reset_step_zeroes_moments_keeps_bias_step_and_starts_the_warmup():
    tx = lbw_optax.peers.scale_by_spam(reset_interval=10, warmup_steps=4)
    state = tx.init({"w": jnp.zeros(3)})
    g = {"w": jnp.array([0.5, -1.0, 2.0])}
    scales = []
    for _ in range(15):
        _, state = tx.update(g, state)
        scales.append(float(state.record.spam_warmup_scale))
        if int(state.record.spam_count) == 10:
            # Moments restart from zero at the reset step; the step count is not reset.
            np.testing.assert_allclose(state.mu["w"], 0.1 * g["w"], rtol=1e-6)
            np.testing.assert_allclose(state.nu["w"], 0.001 * g["w"] ** 2, rtol=1e-5)
            assert int(state.record.spam_resets) == 1
    assert scales[:9] == [1.0] * 9  # No warm-up at the start of training.
    ramp = [1 - 0.99 * 0.5 * (1 + np.cos(np.pi * k / 5)) for k in range(4)]
    np.testing.assert_allclose(scales[9:13], ramp, rtol=1e-6)
    assert scales[9] == pytest.approx(0.01) and scales[13:] == [1.0, 1.0]


def test_spam_adamw_warmup_scales_the_adam_step_not_the_weight_decay():
    tx = lbw_optax.peers.spam_adamw(1.0, weight_decay=0.5, reset_interval=2, warmup_steps=5)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    zero = {"w": jnp.zeros(2)}
    _, state = tx.update(zero, state, params)
    updates, state = tx.update(zero, state, params)  # Reset step, zero gradient: decay only.
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones(2), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# StableAdamW


def stable_adamw_reference(grads, params, *, lr, b1, b2, eps, weight_decay):
    """Algorithm 2 of Wortsman et al. 2023 in float64, with the paper's corrected decays
    β̂ = β(1 − β^(t−1))/(1 − β^t) in place of a bias correction; one array; returns the
    parameters after each step and the per-step factors 1/max(1, RMS)."""
    theta = np.asarray(params, np.float64).copy()
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    out, factors = [], []
    for t, g in enumerate(grads, start=1):
        hat = lambda b, t=t: b * (1 - b ** (t - 1)) / (1 - b**t)
        m = hat(b1) * m + (1 - hat(b1)) * g
        v = hat(b2) * v + (1 - hat(b2)) * g**2
        rms = np.sqrt(np.mean(g**2 / np.maximum(v, eps**2)))
        eta = lr / max(1.0, rms)
        theta = theta - eta * weight_decay * theta - eta * m / (np.sqrt(v) + eps)
        out.append(theta.copy())
        factors.append(1.0 / max(1.0, rms))
    return out, factors


def test_stable_adamw_matches_the_papers_algorithm():
    rng = np.random.default_rng(9)
    grads = [rng.standard_normal(8) * 0.1 for _ in range(12)]
    grads[6] = grads[6] * 40.0  # A sudden rise of g² over a lagging v: clipped.
    kwargs = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1)
    params0 = rng.standard_normal(8)
    expected, factors = stable_adamw_reference(grads, params0, **kwargs)
    tx = lbw_optax.peers.stable_adamw(
        kwargs["lr"], kwargs["b1"], kwargs["b2"], kwargs["eps"], kwargs["weight_decay"]
    )
    params = {"w": jnp.asarray(params0, jnp.float32)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t, (g, want, factor) in enumerate(zip(grads, expected, factors, strict=True), start=1):
        updates, state = step({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(float(state[0].record.stable_min_factor), factor, rtol=1e-5)
        assert int(state[0].record.stable_clipped_tensors) == int(factor < 1.0)
    assert factors[6] < 0.5 and factors[3] == 1.0


# ---------------------------------------------------------------------------------------------
# Validation and telemetry


@pytest.mark.parametrize(
    ("factory", "name", "value"),
    [
        (lbw_optax.peers.zclip, "alpha", 1.0),
        (lbw_optax.peers.zclip, "z_threshold", 0.0),
        (lbw_optax.peers.zclip, "warmup_steps", 0),
        (lbw_optax.peers.zclip, "eps", -1e-6),
        (lbw_optax.peers.zclip, "max_grad_norm", 0.0),
        (lambda **kw: lbw_optax.peers.skip_step(optax.sgd(0.1), **kw), "window", 1),
        (lambda **kw: lbw_optax.peers.skip_step(optax.sgd(0.1), **kw), "sigma_factor", -6.0),
        (lambda **kw: lbw_optax.peers.skip_step(optax.sgd(0.1), **kw), "min_history", 1),
        (lambda **kw: lbw_optax.peers.skip_step(optax.sgd(0.1), **kw), "min_history", 200),
        (lbw_optax.peers.adagc, "beta", 1.0),
        (lbw_optax.peers.adagc, "lambda_rel", 0.0),
        (lbw_optax.peers.adagc, "warmup_steps", -1),
        (lbw_optax.peers.adagc, "warmup_clip", float("nan")),
        (lbw_optax.peers.scale_by_spam, "theta", 0.0),
        (lbw_optax.peers.scale_by_spam, "reset_interval", 0),
        (lbw_optax.peers.scale_by_spam, "warmup_steps", 1.5),
        (lbw_optax.peers.scale_by_spam, "b2", 1.0),
        (lbw_optax.peers.scale_by_spam, "clip_delay", -1),
        (lambda **kw: lbw_optax.peers.spam_adamw(1e-3, **kw), "weight_decay", -0.1),
        (lbw_optax.peers.scale_by_stable_adam, "b2", 1.0),
        (lbw_optax.peers.scale_by_stable_adam, "eps", -1.0),
        (lambda **kw: lbw_optax.peers.stable_adamw(1e-3, **kw), "weight_decay", -0.1),
    ],
)
def test_invalid_hyperparameters_raise_naming_argument_and_value(factory, name, value):
    with pytest.raises(ValueError) as error:
        factory(**{name: value})
    assert name in str(error.value) and repr(value) in str(error.value)


PEERS = {
    "zclip": (
        lambda: optax.chain(lbw_optax.peers.zclip(warmup_steps=2), optax.adamw(1e-3)),
        "zclip_count",
    ),
    "skip_step": (lambda: _clipped_skip_step(optax.adamw(1e-3)), "skipstep_count"),
    "adagc": (
        lambda: optax.chain(lbw_optax.peers.adagc(warmup_steps=2), optax.adamw(1e-3)),
        "adagc_count",
    ),
    "spam_adamw": (lambda: lbw_optax.peers.spam_adamw(1e-3), "spam_count"),
    "stable_adamw": (lambda: lbw_optax.peers.stable_adamw(1e-3), "stable_count"),
}


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("with_guard", [False, True], ids=["alone", "guarded"])
def test_telemetry_reads_a_peer_alone_and_under_the_guard(name, with_guard):
    make, counter = PEERS[name]
    tx = lbw_optax.guard(make(), policy="reference") if with_guard else make()
    params = params_like()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(4):
        _, state = step(grads_of_norm(1.0 + 0.1 * i), state, params, value=jnp.float32(2.0))
    record = lbw_optax.telemetry(state)
    assert int(record[counter]) == 4
    assert ("step" in record) == with_guard
    if with_guard:
        assert int(record["step"]) == 4
    # Only the record is reported, never a moment tree.
    assert not {"mu", "nu", "inner_state"} & set(record)


def test_peers_compose_in_one_chain_with_distinct_fields():
    tx = optax.chain(
        lbw_optax.peers.zclip(warmup_steps=2),
        lbw_optax.peers.adagc(warmup_steps=2),
        lbw_optax.peers.skip_step(lbw_optax.peers.spam_adamw(1e-3)),
    )
    params = params_like()
    state = tx.init(params)
    for i in range(3):
        _, state = tx.update(grads_of_norm(1.0 + 0.1 * i), state, params, value=jnp.float32(2.0))
    record = lbw_optax.telemetry(state)
    for counter in ("zclip_count", "adagc_count", "skipstep_count", "spam_count"):
        assert int(record[counter]) == 3


# --- the *_adamw wrappers forward every optax.adamw argument ------------------------------------


@pytest.mark.parametrize(
    "wrapper",
    [
        lbw_optax.lbw_adamw,
        lbw_optax.sgg_adamw,
    ],
    ids=lambda w: w.__name__,
)
def test_adamw_wrappers_forward_mu_dtype_eps_root_and_nesterov(wrapper):
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.full(3, 0.5)}

    def first_update(**options):
        tx = wrapper(1e-2, 0.9, 0.999, 1e-8, 0.0, mu_dtype=jnp.bfloat16, eps_root=1e-8, **options)
        state = tx.init(params)
        moments = [x for x in jax.tree.leaves(state) if x.dtype == jnp.bfloat16]
        assert len(moments) == 2  # the first moments, one per parameter
        return tx.update(grads, state, params, value=jnp.float32(1.0))[0]

    assert not np.allclose(first_update(nesterov=True)["w"], first_update()["w"])


@pytest.mark.parametrize("name", ["eps_root", "weight_decay", "eps"])
def test_adamw_wrappers_reject_negative_adamw_arguments(name):
    with pytest.raises(ValueError, match=name):
        lbw_optax.sgg_adamw(1e-3, **{name: -1.0})


def test_a_state_takes_part_in_telemetry_by_declaring_its_fields():
    class MyState(NamedTuple):
        my_count: jax.Array
        my_window: jax.Array
        telemetry_fields = ("my_count",)

    state = (optax.EmptyState(), MyState(jnp.int32(3), jnp.zeros(4)))
    assert lbw_optax.telemetry(state) == {"my_count": 3}
