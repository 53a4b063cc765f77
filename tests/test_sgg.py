"""SGG (lbw_optax.sgg, lbw_optax.sgg_adamw): exactness, the documented formulas, robustness."""

import itertools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lbw_optax
from lbw_optax import testing


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((3, 4, 2)) * 3.0, jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(5), jnp.float32),
    }


def _grads(step, seed=1):
    return _tree(seed + step)


def _run(tx, n_steps, params=None):
    params = _tree() if params is None else params
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates = []
    for i in range(n_steps):
        u, state = step(_grads(i), state, params)
        updates.append(u)
        params = optax.apply_updates(params, u)
    return updates, state


def _sgg_state(state):
    return optax.tree.get(state, "SGGState")


# NumPy reference of the documented formulas -------------------------------------------------


def _np_kmeans(x, k):
    """1-D Lloyd from the (2j+1)/(2k) quantiles, run to convergence; clusters sorted by centre."""
    ordered = np.sort(x)
    centres = ordered[((2 * np.arange(k) + 1) * x.size) // (2 * k)].astype(np.float64)
    ids = None
    for _ in range(1000):
        new = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
        if ids is not None and np.array_equal(new, ids):
            break
        ids = new
        for j in range(k):
            if np.any(ids == j):
                centres[j] = x[ids == j].mean()
    order = np.argsort(centres)
    return np.argmin(np.abs(x[:, None] - centres[order][None, :]), axis=1)


def _np_sgg(mus, k, low, high):
    """(ids, sizes, per-cluster MDA, scales) per tensor and the model MDA, for beta3 = 0."""
    per_tensor, deviations = [], []
    for mu in mus:
        m = np.asarray(mu, np.float64).ravel()
        ids = _np_kmeans(np.abs(m), k)
        deviation = np.abs(m - m.mean())
        deviations.append(deviation)
        mda = np.array([np.median(deviation[ids == c]) for c in range(k)])
        sizes = np.array([np.sum(ids == c) for c in range(k)])
        per_tensor.append((ids.reshape(mu.shape), sizes, mda))
    model_mda = np.median(np.concatenate(deviations))
    out = [(i, s, d, np.clip(model_mda / (d + 1e-8), low, high)) for i, s, d in per_tensor]
    return out, model_mda


def test_reclustering_matches_numpy_reference():
    params = _tree()
    tx = lbw_optax.sgg(
        optax.scale_by_adam(), n_clusters=3, beta3=0.0, scale_bounds=(0.5, 4.0), recluster_every=1
    )
    state = tx.init(params)
    _, state = jax.jit(tx.update)(_grads(0), state, params)
    mu = optax.tree.get(state.inner_state, "mu")
    expected, model_mda = _np_sgg([mu["a"], mu["b"]], 3, 0.5, 4.0)

    np.testing.assert_allclose(state.model_mda, model_mda, rtol=1e-5)
    for name, (ids, sizes, mda, scales) in zip(["a", "b"], expected, strict=True):
        assert state.cluster_ids[name].dtype == jnp.int8
        np.testing.assert_array_equal(state.cluster_ids[name], ids)
        np.testing.assert_array_equal(state.cluster_sizes[name], sizes)
        np.testing.assert_allclose(state.cluster_mda[name], mda, rtol=1e-5)
        np.testing.assert_allclose(state.cluster_scales[name], scales, rtol=1e-5)
        assert len(set(scales.round(4))) > 1  # The example really scales clusters differently.
    assert isinstance(state.cluster_ids["bias"], optax.MaskedNode)  # 1-D: not clustered.


def test_scales_multiply_the_inner_update_from_the_next_step():
    params = _tree()
    kwargs = dict(beta3=0.0, scale_bounds=(0.5, 4.0), recluster_every=1)
    tx = lbw_optax.sgg(optax.scale_by_adam(), **kwargs)
    inner = optax.scale_by_adam()
    state, inner_state = tx.init(params), inner.init(params)
    for i in range(3):
        updates, state_next = tx.update(_grads(i), state, params)
        expected, inner_state = inner.update(_grads(i), inner_state, params)
        for name in ("a", "b"):
            factor = state.cluster_scales[name][state.cluster_ids[name].astype(jnp.int32)]
            np.testing.assert_allclose(updates[name], expected[name] * factor, rtol=1e-6)
        np.testing.assert_array_equal(updates["bias"], expected["bias"])
        state = state_next
    assert not np.allclose(state.cluster_scales["a"], 1.0)


def test_beta3_is_the_decay_of_the_scales_ema():
    params = _tree()
    make = lambda beta3: lbw_optax.sgg(
        optax.scale_by_adam(), beta3=beta3, scale_bounds=(0.5, 4.0), recluster_every=1
    )
    _, fresh = jax.jit(make(0.0).update)(_grads(0), make(0.0).init(params), params)
    _, smoothed = jax.jit(make(0.75).update)(_grads(0), make(0.75).init(params), params)
    for name in ("a", "b"):
        np.testing.assert_allclose(
            smoothed.cluster_scales[name], 0.75 + 0.25 * fresh.cluster_scales[name], rtol=1e-6
        )


# Exactness and structure ----------------------------------------------------------------------


@pytest.mark.parametrize("recluster_every", [1, 3])
def test_unit_scale_bounds_give_exactly_adamw(recluster_every):
    kwargs = dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
    tx = lbw_optax.sgg_adamw(
        3e-2, scale_bounds=(1.0, 1.0), recluster_every=recluster_every, **kwargs
    )
    got, state = _run(tx, 7)
    want, _ = _run(optax.adamw(3e-2, **kwargs), 7)
    chex.assert_trees_all_equal(got, want)
    assert int(_sgg_state(state).sgg_count) == 7


@pytest.mark.parametrize(
    "make_inner",
    [pytest.param(lambda: optax.lion(1e-3), marks=pytest.mark.slow), lambda: optax.nadam(1e-3)],
    ids=["lion", "nadam"],
)
def test_other_inner_optimizers_with_a_first_moment(make_inner):
    got, _ = _run(lbw_optax.sgg(make_inner(), scale_bounds=(1.0, 1.0), recluster_every=2), 5)
    want, _ = _run(make_inner(), 5)
    chex.assert_trees_all_equal(got, want)
    _, state = _run(lbw_optax.sgg(make_inner(), beta3=0.0, recluster_every=2), 5)
    assert not np.allclose(state.cluster_scales["a"], 1.0)
    chex.assert_tree_all_finite(state.cluster_scales)


def test_small_tensors_pass_through_and_big_ones_are_scaled():
    # scale_bounds=(2, 2): scales start at clip(1, bounds) = 2 and stay there, so every
    # element of a clustered tensor is doubled and every other element is untouched.
    got, _ = _run(lbw_optax.sgg(optax.scale_by_adam(), scale_bounds=(2.0, 2.0)), 3)
    want, _ = _run(optax.scale_by_adam(), 3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["bias"], w["bias"])
        np.testing.assert_array_equal(g["a"], 2.0 * w["a"])
    got, _ = _run(lbw_optax.sgg(optax.scale_by_adam(), scale_bounds=(2.0, 2.0), min_ndim=3), 2)
    np.testing.assert_array_equal(got[1]["a"], want[1]["a"])
    np.testing.assert_array_equal(got[1]["b"], 2.0 * want[1]["b"])


def test_clusters_are_ordered_by_magnitude_and_stable_across_reclusterings():
    params = _tree()
    tx = lbw_optax.sgg(optax.scale_by_adam(), recluster_every=1)
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = _grads(0)
    seen = []
    for _ in range(4):  # The same gradient: mu only grows uniformly, the grouping must not move.
        _, state = step(grads, state, params)
        mu = optax.tree.get(state.inner_state, "mu")
        for name in ("a", "b"):
            ids, magnitude = np.asarray(state.cluster_ids[name]), np.abs(np.asarray(mu[name]))
            present = [c for c in range(3) if np.any(ids == c)]
            assert present == [0, 1, 2]
            for lo, hi in itertools.pairwise(present):
                assert magnitude[ids == lo].max() < magnitude[ids == hi].min()
        seen.append(jax.tree.map(np.asarray, state.cluster_ids))
    for later in seen[1:]:
        chex.assert_trees_all_equal(later, seen[0])


def test_reclusters_when_t_mod_T_is_zero():
    """The paper's Algorithm 1: re-cluster at updates t = T, 2T, ... (1-based); before the
    first, SGG is its inner transformation exactly."""
    params = _tree()
    tx = lbw_optax.sgg(optax.scale_by_adam(), recluster_every=3, beta3=0.5)
    inner = optax.scale_by_adam()
    state, inner_state = tx.init(params), inner.init(params)
    step = jax.jit(tx.update)
    history = []
    for t in range(1, 8):
        updates, state = step(_grads(t - 1), state, params)
        expected, inner_state = inner.update(_grads(t - 1), inner_state, params)
        if t <= 3:  # Scales still 1 (those formed at t = 3 act from t = 4).
            chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)
        history.append(np.asarray(state.cluster_scales["a"]))
    before = [np.ones_like(history[0]), *history[:-1]]
    changed = [t for t in range(1, 8) if not np.array_equal(history[t - 1], before[t - 1])]
    assert changed == [3, 6]


def test_state_dtypes_and_extra_bytes():
    params = {"w": jnp.zeros((64, 32), jnp.bfloat16), "b": jnp.zeros(32, jnp.bfloat16)}
    state = lbw_optax.sgg(optax.scale_by_adam()).init(params)
    assert state.cluster_ids["w"].dtype == jnp.int8
    assert state.cluster_scales["w"].dtype == jnp.float32
    assert state.cluster_sizes["w"].dtype == jnp.int32
    own = state._replace(inner_state=None)
    extra = sum(x.nbytes for x in jax.tree.leaves(own))
    assert extra <= 64 * 32 + 200  # One byte per clustered element plus a few scalars.


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_works_inside_inject_hyperparams_with_every_numeric_argument_injected():
    tx = optax.inject_hyperparams(lbw_optax.sgg_adamw)(learning_rate=1e-2, recluster_every=2)
    got, state = _run(tx, 4)
    want, _ = _run(lbw_optax.sgg_adamw(1e-2, recluster_every=2), 4)
    # Injected hyperparameters are float32 arrays instead of Python floats: rounding differs.
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-9)
    assert int(_sgg_state(state).sgg_count) == 4
    assert not np.allclose(_sgg_state(state).cluster_scales["a"], 1.0)


# Robustness -------------------------------------------------------------------------------------


# Built once, so that the property test compiles its scan once.
_ROBUST_SGG = lbw_optax.sgg(optax.scale_by_adam(), recluster_every=1, beta3=0.0)


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        (6, 5),
        elements=st.one_of(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            st.sampled_from([np.nan, np.inf, -np.inf, 0.0]),
        ),
    )
)
def test_nonfinite_or_extreme_moments_never_make_nonfinite_statistics(grad):
    params = {"w": jnp.zeros((6, 5)), "v": jnp.ones((2, 3))}
    grads = {"w": jnp.stack([jnp.asarray(grad)] * 2), "v": jnp.full((2, 2, 3), 0.5)}
    _, states, _ = testing.run_sequence(_ROBUST_SGG, params, grads)  # Two steps, one compile.
    for i in range(2):
        state = jax.tree.map(lambda x, i=i: x[i], states)
        own = state._replace(inner_state=None)
        chex.assert_tree_all_finite((own.cluster_scales, own.cluster_mda, own.model_mda))
        assert np.all(np.asarray(state.cluster_ids["w"]) >= 0)
        assert np.all(np.asarray(state.cluster_ids["w"]) < 3)
        finite = np.isfinite(np.asarray(optax.tree.get(state.inner_state, "mu")["w"]))
        assert int(state.cluster_sizes["w"].sum()) == int(finite.sum())
        for s in jax.tree.leaves(own.cluster_scales):
            assert np.all((np.asarray(s) >= 0.1) & (np.asarray(s) <= 10.0))


def test_nonfinite_moments_keep_previous_ids_and_scales():
    params = {"w": jnp.zeros((4, 4))}
    tx = lbw_optax.sgg(optax.scale_by_adam(), recluster_every=1, beta3=0.0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step({"w": jnp.arange(16.0).reshape(4, 4)}, state, params)
    before = state
    _, state = step({"w": jnp.full((4, 4), jnp.nan)}, state, params)
    chex.assert_trees_all_equal(state.cluster_ids, before.cluster_ids)
    chex.assert_trees_all_equal(state.cluster_scales, before.cluster_scales)
    np.testing.assert_array_equal(state.cluster_sizes["w"], [0, 0, 0])


# Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inner", [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9)], ids=["sgd", "momentum"]
)
def test_inner_without_first_moment_is_a_clear_error(inner):
    with pytest.raises(ValueError, match="first moment in a field named 'mu'"):
        lbw_optax.sgg(inner).init(_tree())


def test_inner_with_two_first_moments_is_a_clear_error():
    inner = optax.chain(optax.scale_by_adam(), optax.scale_by_adam())
    with pytest.raises(ValueError, match="more than one"):
        lbw_optax.sgg(inner).init(_tree())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_clusters=0), "n_clusters must be an integer >= 1, got 0"),
        (dict(n_clusters=128), "n_clusters must be <= 127"),
        (dict(recluster_every=0), "recluster_every must be an integer >= 1, got 0"),
        (dict(beta3=1.0), r"beta3 must be in \[0.0, 1.0\), got 1.0"),
        (dict(scale_bounds=(0.0, 1.0)), "scale_bounds\\[0\\] must be a finite number > 0"),
        (dict(scale_bounds=(2.0, 1.0)), "scale_bounds\\[0\\] must be <= scale_bounds\\[1\\]"),
        (dict(scale_bounds=3.0), "scale_bounds must be a pair"),
        (dict(min_ndim=-1), "min_ndim must be an integer >= 0, got -1"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lbw_optax.sgg(optax.scale_by_adam(), **kwargs)


# Composition and telemetry on a real Flax model ---------------------------------------------


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(8, 6, rngs=rngs)
        self.norm = nnx.RMSNorm(6, rngs=rngs)  # A parameter called "scale".

    def __call__(self, x):
        return self.norm(self.linear(x))


def test_guard_of_sgg_adamw_on_a_flax_model_reports_both_records():
    model = _Model(nnx.Rngs(0))
    tx = lbw_optax.guard(lbw_optax.sgg_adamw(1e-2, recluster_every=2), policy="reference")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1, 1, 16).reshape(2, 8)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        optimizer.update(model, grads, value=loss)
        return loss

    for _ in range(3):
        train_step(model, optimizer)
    record = lbw_optax.telemetry(optimizer.opt_state)
    assert int(record["step"]) == 3 and int(record["sgg_count"]) == 3
    assert "cluster_ids" not in record
    scales = record["cluster_scales"]
    assert scales["linear"]["kernel"].shape == (3,)
    assert isinstance(scales["linear"]["bias"], optax.MaskedNode)
    assert isinstance(scales["norm"]["scale"], optax.MaskedNode)
    assert int(record["cluster_sizes"]["linear"]["kernel"].sum()) == 8 * 6
    assert isinstance(record["model_mda"], jax.Array) and float(record["model_mda"]) > 0
    sizes = optax.tree.get(nnx.as_pure(optimizer.opt_state), "cluster_sizes")
    assert int(sizes["linear"]["kernel"].sum()) == 8 * 6
