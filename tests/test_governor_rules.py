"""The governor's pure stages (lbw_optax._governor_rules), each against its NumPy restatement.

The stages are elementwise in their scalar arguments, so each test feeds a few hundred random
cases at once (vectors), drawn so that every branch is taken, and compares with a plain NumPy
version written from the documented rule.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from lbw_optax import Regime, governor_policy
from lbw_optax import _governor_rules as rules

N = 400
DAMPING = [int(Regime.STRESSED), int(Regime.OSCILLATION), int(Regime.SPIKE)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _stats(rng):
    slow = rng.uniform(0.5, 4.0, N).astype(np.float32)
    fast = (slow * rng.uniform(0.8, 1.3, N)).astype(np.float32)
    var = rng.choice([0.0, 1e-8, 0.01, 0.5], N).astype(np.float32)
    return rules.Stats(fast, slow, var)


def np_spreads(loss, norm):
    loss_sd = np.maximum(np.sqrt(loss.var), 1e-3 * np.abs(loss.slow) + 1e-12)
    norm_sd = np.maximum(np.sqrt(norm.var), 1e-2)
    return loss_sd, norm_sd


def np_update_stats(stats, x, first, seen, warm, sd, spike_z, fast_decay, slow_decay):
    """Seed with the first value, EMAs of the winsorised input, the variance about the old
    slow mean; nothing moves on an unseen step."""
    x_in = np.where(warm, np.minimum(x, stats.slow + spike_z * sd), x)
    fast = np.where(first, x_in, stats.fast + (1 - fast_decay) * (x_in - stats.fast))
    slow = np.where(first, x_in, stats.slow + (1 - slow_decay) * (x_in - stats.slow))
    var = slow_decay * (stats.var + (1 - slow_decay) * (x_in - stats.slow) ** 2)
    var = np.where(first, 0.0, var)
    return (
        np.where(seen, fast, stats.fast),
        np.where(seen, slow, stats.slow),
        np.where(seen, var, stats.var),
    )


def test_update_stats_matches_numpy(rng):
    stats = _stats(rng)
    x = (stats.slow * rng.choice([0.9, 1.0, 1.1, 5.0], N)).astype(np.float32)
    first, seen, warm = (rng.random(N) < p for p in (0.2, 0.8, 0.5))
    sd = np_spreads(stats, stats)[0].astype(np.float32)
    knobs = dict(spike_z=4.0, fast_decay=0.9, slow_decay=0.99)
    policy = governor_policy(**knobs)
    got = rules.update_stats(stats, x, first=first, seen=seen, warm=warm, sd=sd, knobs=policy)
    want = np_update_stats(stats, x, first, seen, warm, sd, **knobs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-9)
    # Once warm, a 5x outlier moves the slow mean by at most (1 - 0.99)·spike_z·sd.
    outlier = warm & seen & ~first & (x > 2 * stats.slow)
    assert outlier.any()
    moved = np.asarray(got.slow)[outlier] - stats.slow[outlier]
    assert np.all(moved <= 0.01 * 4.0 * sd[outlier] + 1e-6)


def np_classify(loss, log_norm, ls, ns, first, loss_first, seen, warm, loss_warm, knobs):
    loss_sd, norm_sd = np_spreads(ls, ns)
    loss_z = np.where(loss_first | ~seen, 0.0, (loss - ls.slow) / loss_sd)
    grad_z = np.where(first, 0.0, (log_norm - ns.slow) / norm_sd)
    rise = np.where(loss_first, 0.0, loss / (np.abs(ls.slow) + 1e-12) - 1.0)
    jump = np.where(first, 0.0, log_norm - ns.slow)
    huge = jump > np.log(knobs["hold_ratio"])
    loss_over = lambda z: loss_warm & (loss_z > z) & (rise > knobs["min_spike_rise"])
    spike = loss_over(knobs["spike_z"]) | (warm & ((grad_z > knobs["spike_z"]) | huge))
    severe = loss_over(knobs["hold_z"]) | (warm & ((grad_z > knobs["hold_z"]) | huge))
    return loss_z, grad_z, spike, severe


def test_classify_matches_numpy_and_takes_every_branch(rng):
    ls, ns = _stats(rng), _stats(rng)
    loss = (ls.slow * rng.choice([1.0, 1.02, 1.2, 3.0], N)).astype(np.float32)
    log_norm = (ns.slow + rng.choice([0.0, 0.05, 0.5, 3.0], N)).astype(np.float32)
    first, loss_first = rng.random(N) < 0.1, rng.random(N) < 0.1
    seen, warm = rng.random(N) < 0.8, rng.random(N) < 0.7
    loss_warm = seen & (rng.random(N) < 0.7)
    knobs = dict(spike_z=4.0, hold_z=8.0, hold_ratio=10.0, min_spike_rise=0.05)
    progress = rules.Progress(first, warm, seen, loss_first, loss_warm)
    got = rules.classify(loss, log_norm, ls, ns, progress, governor_policy(**knobs))
    flags = (first, loss_first, seen, warm, loss_warm)
    want = np_classify(loss, log_norm, ls, ns, *flags, knobs)
    np.testing.assert_allclose(np.asarray(got.loss_z), want[0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.grad_z), want[1], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.spike), want[2])
    np.testing.assert_array_equal(np.asarray(got.severe), want[3])
    spike, severe = want[2], want[3]
    assert (spike & severe).any() and (spike & ~severe).any() and (~spike).any()


def np_next_regime(regime, scale, spike, stressed, pressure, pressure_steps, calm, knobs):
    pressure_steps = np.where(pressure, pressure_steps + 1, 0)
    calm = np.where(pressure | spike, 0, calm + 1)
    engaged = pressure_steps >= knobs["dwell"]
    damping = np.isin(regime, DAMPING)
    unsettled = damping & (calm < knobs["calm_steps"])
    out = []
    for k in range(len(regime)):
        if spike[k]:
            out.append(Regime.SPIKE)
        elif engaged[k]:
            out.append(Regime.STRESSED if stressed[k] else Regime.OSCILLATION)
        elif unsettled[k]:
            out.append(regime[k])
        else:
            out.append(Regime.RECOVERY if scale[k] < knobs["max_scale"] else Regime.STABLE)
    sticky = unsettled & ~(spike | engaged)
    return np.array(out), pressure_steps, calm, engaged, sticky


def test_next_regime_matches_numpy(rng):
    regime = rng.integers(0, 5, N).astype(np.int32)
    scale = rng.choice([0.5, 1.0], N).astype(np.float32)
    spike, stressed = rng.random(N) < 0.2, rng.random(N) < 0.5
    pressure = stressed | (rng.random(N) < 0.3)
    pressure_steps, calm = rng.integers(0, 7, N), rng.integers(0, 25, N)
    knobs = dict(dwell=5, calm_steps=20, max_scale=1.0)
    got = rules.next_regime(
        regime,
        scale,
        spike=spike,
        stressed=stressed,
        pressure=pressure,
        pressure_steps=jnp.asarray(pressure_steps, jnp.int32),
        calm_streak=jnp.asarray(calm, jnp.int32),
        knobs=governor_policy(**knobs),
    )
    want = np_next_regime(regime, scale, spike, stressed, pressure, pressure_steps, calm, knobs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    assert set(np.asarray(got.regime).tolist()) == set(range(5))


def test_control_scale_matches_numpy(rng):
    scale = rng.uniform(0.05, 1.0, N).astype(np.float32)
    spike, stressed = rng.random(N) < 0.2, rng.random(N) < 0.5
    engaged, sticky = rng.random(N) < 0.3, rng.random(N) < 0.3
    knobs = dict(spike_factor=0.5, damping=0.2, release=0.01, min_scale=0.1, max_scale=1.0)
    step = rules.RegimeStep(None, None, None, engaged=engaged, sticky=sticky)
    got = rules.control_scale(scale, spike, stressed, step, governor_policy(**knobs))
    cut = np.where(spike, 0.5, np.where(engaged & stressed, 0.8, np.where(engaged, 0.9, 1.0)))
    new = np.where(spike | engaged, scale * cut, np.where(sticky, scale, scale + 0.01))
    np.testing.assert_allclose(np.asarray(got), np.clip(new, 0.1, 1.0), rtol=1e-6)


def test_limit_tensors_and_annealed_limit_match_numpy(rng):
    for case in range(20):
        n = 1 + case % 5
        updates = rng.uniform(0.0, 0.2, n).astype(np.float32)
        params = rng.choice([0.0, 0.5, 2.0], n).astype(np.float32)
        sizes = rng.choice([4.0, 64.0], n).astype(np.float32)
        scale = np.float32(rng.choice([0.5, 1.0]))
        norm, peak = np.float32(rng.uniform(0.1, 1.0)), np.float32(rng.choice([0.0, 0.5]))
        spike = bool(case % 3 == 0)
        limit, new_peak = rules.annealed_limit(0.05, norm, peak, spike=spike, limit_anneal=0.5)
        want_peak = peak if spike else max(peak, norm)
        want_limit = 0.05 * min(max(norm / (want_peak if want_peak > 0 else 1.0), 0.0), 1.0) ** 0.5
        np.testing.assert_allclose(float(new_peak), want_peak, rtol=1e-6)
        np.testing.assert_allclose(float(limit), want_limit, rtol=1e-6)
        got = rules.limit_tensors(scale, updates, params, sizes, limit=limit, param_floor=0.02)
        ratio = scale * updates / np.maximum(params, 0.02 * np.sqrt(sizes))
        factor = np.where(ratio > want_limit, want_limit / np.where(ratio > 0, ratio, 1.0), 1.0)
        np.testing.assert_allclose(np.asarray(got.tensor_scale), factor, rtol=1e-5)
        np.testing.assert_allclose(float(got.update_ratio), ratio.max(), rtol=1e-6)
        assert int(got.limited) == int(np.sum(ratio > float(limit)))


def test_next_boost_matches_numpy_and_takes_every_branch(rng):
    """Up by at most ``release`` towards ``target / peak`` (clipped to [1, max_boost]) on a calm
    step, at once down to that want when the peak grew, and to 1 on any other step."""
    boost = rng.uniform(1.0, 3.0, N).astype(np.float32)
    peak = rng.choice([0.0, 0.005, 0.02, 0.035, 0.1], N).astype(np.float32)
    calm = rng.random(N) < 0.7
    got = np.asarray(
        rules.next_boost(boost, peak, calm=calm, target_ratio=0.035, max_boost=2.0, release=0.01)
    )
    want = np.clip(np.where(peak > 0, 0.035 / np.where(peak > 0, peak, 1.0), 1.0), 1.0, 2.0)
    np.testing.assert_allclose(got, np.where(calm, np.minimum(boost + 0.01, want), 1.0), rtol=1e-6)
    assert got.dtype == np.float32
    rose, fell = calm & (got > boost), calm & (got < boost)
    assert rose.any() and fell.any() and (got[~calm] == 1.0).all()
    assert (got[rose] - boost[rose] <= 0.01 + 1e-6).all()


def test_settle_peak_matches_numpy(rng):
    """The peak keeps the largest ratio (spikes left out); its age restarts when the ratio
    beats it by more than 1 %, and counts up otherwise."""
    peak = rng.choice([0.0, 0.01, 0.02], N).astype(np.float32)
    age = rng.integers(0, 30, N).astype(np.int32)
    ratio = (peak * rng.choice([0.5, 1.0, 1.005, 1.02, 2.0], N) + (peak == 0) * 0.01).astype(
        np.float32
    )
    spike = rng.random(N) < 0.2
    got_peak, got_age = rules.settle_peak(peak, age, ratio, spike=spike)
    grew = ~spike & (ratio > peak * 1.01)
    np.testing.assert_allclose(np.asarray(got_peak), np.where(spike, peak, np.maximum(peak, ratio)))
    np.testing.assert_array_equal(np.asarray(got_age), np.where(grew, 0, age + 1))
    assert grew.any() and (~grew & ~spike & (ratio > peak)).any()  # Grew by less than 1 %.
