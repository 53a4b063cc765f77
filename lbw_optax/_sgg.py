"""SGG: scale learning rates by gradient grouping (Li et al., 2025), as an Optax wrapper."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lbw_optax._validate import (
    check_in_range,
    check_non_negative_int,
    check_ordered,
    check_positive,
    check_positive_int,
)

# Lloyd iterations of the 1-D K-means; from quantile initial centres on |m| it settles in a few.
_LLOYD_ITERATIONS = 10
# The paper's additive constant in S = D / (D[l, c] + eps).
_MDA_EPS = 1e-8


class SGGState(NamedTuple):
    """State of :func:`sgg`: cluster assignment, per-cluster scales and statistics.

    Per-tensor fields are trees matching the parameters; a tensor with ``ndim < min_ndim``
    holds an empty array there (it is never scaled).

    Attributes:
      sgg_count: int32, updates seen (1 after the first update).
      cluster_ids: int8 per element, the element's cluster (0 = smallest |m|), fixed between
        re-clusterings.
      cluster_scales: float32 ``[n_clusters]`` per tensor, the scale that multiplies the inner
        update of each cluster's elements (1 before the first re-clustering takes effect).
      cluster_sizes: int32 ``[n_clusters]`` per tensor, elements per cluster at the latest
        re-clustering (elements whose moment was not finite are in none).
      cluster_mda: float32 ``[n_clusters]`` per tensor, each cluster's MDA at the latest
        re-clustering that populated it.
      model_mda: float32, the model-wide MDA at the latest re-clustering.
      inner_state: the wrapped transformation's state.
    """

    sgg_count: jax.Array
    cluster_ids: Any
    cluster_scales: Any
    cluster_sizes: Any
    cluster_mda: Any
    model_mda: jax.Array
    inner_state: Any


def _first_moment(inner_state: Any) -> Any:
    """The inner state's first moment: the one NamedTuple field named ``mu``."""
    is_field = lambda path, _: isinstance(path[-1], optax.tree_utils.NamedTupleKey)
    try:
        mu = optax.tree.get(inner_state, "mu", filtering=is_field)
    except KeyError as error:
        raise ValueError(
            "sgg reads the first moment of the inner transformation from its state field "
            "'mu', but the inner state holds more than one (e.g. two Adam-like "
            "transformations chained); wrap the single Adam-like transformation instead"
        ) from error
    if mu is None:
        raise ValueError(
            "sgg needs an inner transformation whose state holds a first moment in a field "
            "named 'mu' (e.g. optax.scale_by_adam, optax.adamw, optax.lion, optax.nadam); the "
            f"given one's state ({type(inner_state).__name__}) has none"
        )
    return mu


# Order statistics by bisection on the float's bits (no sort: sorts are slow on CPU). For
# non-negative float32 the int32 bit patterns are ordered like the values; 31 halvings of
# [0, bits(+inf)] pin down the exact value.
_INF_BITS = 0x7F800000
_BISECTIONS = 31


def _order_statistics(values, groups, query_groups, ranks, unroll=False):
    """The ``ranks[j]``-th smallest (0-based) of the values whose group is ``query_groups[j]``.

    Args:
      values: list of float32 arrays, non-negative or ``+inf`` (anything else reads as +inf).
      groups: list of int32 arrays shaped like ``values``; an element belongs to group g.
      query_groups: static tuple of group ids, one per query (counted over every array).
      ranks: int32 ``[len(query_groups)]``.

    Returns:
      float32 ``[len(query_groups)]``; ``+inf`` where the group has too few members.
    """
    bits = [
        lax.bitcast_convert_type(jnp.where(v >= 0, v, jnp.inf).astype(jnp.float32), jnp.int32)
        for v in values
    ]

    def count(mid):
        return sum(
            jnp.stack(
                [
                    jnp.sum((g == q) & (b <= mid[j]), dtype=jnp.int32)
                    for j, q in enumerate(query_groups)
                ]
            )
            for b, g in zip(bits, groups, strict=True)
        )

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = count(mid) >= ranks + 1
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    n = len(query_groups)
    start = (jnp.zeros([n], jnp.int32), jnp.full([n], _INF_BITS, jnp.int32))
    _, hi = lax.fori_loop(0, _BISECTIONS, halve, start, unroll=unroll)
    return lax.bitcast_convert_type(hi, jnp.float32)


def _medians(values, groups, n_groups, sizes, unroll=False):
    """Median of each group 0..n_groups-1 (mean of the two middle values if even)."""
    queries = tuple(g for g in range(n_groups) for _ in range(2))
    ranks = jnp.stack([(sizes - 1) // 2, sizes // 2], axis=1).reshape(-1)
    both = _order_statistics(values, groups, queries, ranks, unroll).reshape(n_groups, 2)
    return 0.5 * (both[:, 0] + both[:, 1])


def _assign(x: jax.Array, centres: jax.Array) -> jax.Array:
    """Nearest of the sorted ``centres`` (ties to the lower one): how many midpoints x exceeds."""
    midpoints = 0.5 * (centres[:-1] + centres[1:])
    ids = jnp.zeros(x.shape, jnp.int32)
    for k in range(midpoints.shape[0]):
        ids = ids + (x > midpoints[k]).astype(jnp.int32)
    return ids


def _member_sums(x, finite, ids, n_clusters):
    sums = jnp.stack([jnp.sum(jnp.where(finite & (ids == k), x, 0.0)) for k in range(n_clusters)])
    counts = jnp.stack([jnp.sum(finite & (ids == k), dtype=jnp.int32) for k in range(n_clusters)])
    return sums, counts


def _kmeans_1d(x, finite, n_clusters, unroll=False):
    """Deterministic 1-D K-means of the finite ``x``: (cluster ids, sizes), 0 = smallest."""
    n_finite = jnp.sum(finite, dtype=jnp.int32)
    # Initial centres at the quantiles (2k + 1) / (2K) of the finite values, in integers
    # without overflow: the floor((2k + 1) n / (2K))-th smallest.
    odd = 2 * jnp.arange(n_clusters, dtype=jnp.int32) + 1
    two_k = 2 * n_clusters
    rank = (n_finite // two_k) * odd + ((n_finite % two_k) * odd) // two_k
    member = jnp.where(finite, 0, -1)
    quantiles = _order_statistics([x], [member], (0,) * n_clusters, rank, unroll)
    centres = jnp.where(n_finite > 0, quantiles, 0.0)

    def lloyd(_, centres):
        sums, counts = _member_sums(x, finite, _assign(x, centres), n_clusters)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centres)

    centres = jnp.sort(lax.fori_loop(0, _LLOYD_ITERATIONS, lloyd, centres, unroll=unroll))
    ids = _assign(x, centres)
    _, sizes = _member_sums(x, finite, ids, n_clusters)
    return ids, sizes


def _cluster_tensor(mu, old_ids, n_clusters, unroll=False):
    """Clusters one tensor by |m|: (int8 ids, sizes, per-cluster MDA, deviations, finite).

    Deviations are ``|m_i − mean(m)|`` over the tensor's finite moments.
    """
    m = mu.reshape(-1).astype(jnp.float32)
    finite = jnp.isfinite(m)
    n_finite = jnp.sum(finite, dtype=jnp.int32)
    ids, sizes = _kmeans_1d(jnp.abs(m), finite, n_clusters, unroll)
    mean = jnp.sum(jnp.where(finite, m, 0.0)) / jnp.maximum(n_finite, 1)
    deviation = jnp.abs(m - mean)
    mda = _medians([deviation], [jnp.where(finite, ids, -1)], n_clusters, sizes, unroll)
    new_ids = jnp.where(finite, ids, old_ids.reshape(-1).astype(jnp.int32))
    return new_ids.astype(jnp.int8).reshape(mu.shape), sizes, mda, deviation, finite


def _recluster(mus, ids, scales, sizes, mdas, model_mda, *, n_clusters, beta3, low, high, unroll):
    """Re-clusters every clustered tensor and advances the scales' EMA (pure, jit-able)."""
    del sizes  # Recomputed.
    results = [_cluster_tensor(m, i, n_clusters, unroll) for m, i in zip(mus, ids, strict=True)]
    total = sum(jnp.sum(r[4], dtype=jnp.int32) for r in results)
    new_model_mda = _medians(
        [r[3] for r in results], [jnp.where(r[4], 0, -1) for r in results], 1, total[None], unroll
    )[0]
    model_ok = (total > 0) & jnp.isfinite(new_model_mda)

    new_ids, new_scales, new_sizes, new_mdas = [], [], [], []
    for (cluster_ids, sizes, mda, _, _), scale, old_mda in zip(results, scales, mdas, strict=True):
        ok = model_ok & (sizes > 0) & jnp.isfinite(mda)
        target = jnp.clip(new_model_mda / (mda + _MDA_EPS), low, high)
        ema = jnp.clip(beta3 * scale + (1.0 - beta3) * target, low, high).astype(scale.dtype)
        new_ids.append(cluster_ids)
        new_scales.append(jnp.where(ok, ema, scale))
        new_sizes.append(sizes)
        new_mdas.append(jnp.where(ok, mda, old_mda))
    model_mda = jnp.where(model_ok, new_model_mda, model_mda)
    return new_ids, new_scales, new_sizes, new_mdas, model_mda


def _concrete(value: Any) -> Any:
    """A Python number for a number or a concrete scalar array; the tracer itself otherwise."""
    if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array | np.ndarray):
        return value
    return value.item() if value.ndim == 0 else value


def _check_scale_bounds(scale_bounds: Any) -> tuple[float, float]:
    if not (isinstance(scale_bounds, tuple | list) and len(scale_bounds) == 2):
        raise ValueError(f"scale_bounds must be a pair (low, high), got {scale_bounds!r}")
    low, high = scale_bounds
    check_positive("scale_bounds[0]", low)
    check_positive("scale_bounds[1]", high)
    check_ordered("scale_bounds[0]", low, "scale_bounds[1]", high)
    return float(low), float(high)


def _sgg_transform(
    inner, *, n_clusters, recluster_every, beta3, scale_bounds, min_ndim, when, unroll=False
):
    """Builds :func:`sgg`; ``when`` is ``"interval"`` (the public behaviour), or ``"never"`` /
    ``"always"`` to compile one of the two kinds of step alone, and ``unroll`` unrolls the
    clustering's loops (XLA's cost analysis counts a loop body once), for cost measurements."""
    # optax.inject_hyperparams passes every numeric argument as an array, traced inside
    # update: check concrete values; the cluster count is read from the state's shapes.
    n_clusters, recluster_every, beta3 = map(_concrete, (n_clusters, recluster_every, beta3))
    if not isinstance(n_clusters, jax.core.Tracer):
        check_positive_int("n_clusters", n_clusters)
        if n_clusters > 127:
            raise ValueError(f"n_clusters must be <= 127 (ids are int8), got {n_clusters!r}")
    if not isinstance(recluster_every, jax.core.Tracer):
        check_positive_int("recluster_every", recluster_every)
    if not isinstance(beta3, jax.core.Tracer):
        check_in_range("beta3", beta3, 0.0, 1.0, closed="left")
    low, high = _check_scale_bounds(scale_bounds)
    check_non_negative_int("min_ndim", min_ndim)
    inner = optax.with_extra_args_support(inner)
    clustered = lambda x: x.ndim >= min_ndim

    def per_tensor(params, make):
        return jax.tree.map(lambda p: make(p) if clustered(p) else jnp.zeros([0], jnp.int8), params)

    def init_fn(params):
        inner_state = inner.init(params)
        _first_moment(inner_state)
        scale0 = min(max(1.0, low), high)
        return SGGState(
            sgg_count=jnp.zeros([], jnp.int32),
            cluster_ids=per_tensor(params, lambda p: jnp.zeros(p.shape, jnp.int8)),
            cluster_scales=per_tensor(
                params, lambda _: jnp.full([n_clusters], scale0, jnp.float32)
            ),
            cluster_sizes=per_tensor(params, lambda _: jnp.zeros([n_clusters], jnp.int32)),
            cluster_mda=per_tensor(params, lambda _: jnp.zeros([n_clusters], jnp.float32)),
            model_mda=jnp.zeros([], jnp.float32),
            inner_state=inner_state,
        )

    def update_fn(updates, state, params=None, **extra_args):
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        treedef = jax.tree.structure(inner_updates)
        leaves = treedef.flatten_up_to(inner_updates)
        ids = treedef.flatten_up_to(state.cluster_ids)
        scales = treedef.flatten_up_to(state.cluster_scales)
        sizes = treedef.flatten_up_to(state.cluster_sizes)
        mdas = treedef.flatten_up_to(state.cluster_mda)
        chosen = [i for i, u in enumerate(leaves) if clustered(u)]

        # Every step: one gather of the tensor's few scales by the stored ids, one multiply.
        # The scales are the ones in force before this step's re-clustering (see sgg's notes).
        scaled = list(leaves)
        for i in chosen:
            u = leaves[i]
            scaled[i] = (u * scales[i][ids[i].astype(jnp.int32)]).astype(u.dtype)

        model_mda = state.model_mda
        if chosen:
            mu_leaves = treedef.flatten_up_to(_first_moment(inner_state))
            recluster = functools.partial(
                _recluster,
                n_clusters=scales[chosen[0]].shape[0],
                beta3=beta3,
                low=low,
                high=high,
                unroll=unroll,
            )
            operands = (
                [mu_leaves[i] for i in chosen],
                [ids[i] for i in chosen],
                [scales[i] for i in chosen],
                [sizes[i] for i in chosen],
                [mdas[i] for i in chosen],
                state.model_mda,
            )
            keep = lambda mus, ids, scales, sizes, mdas, model_mda: (
                ids,
                scales,
                sizes,
                mdas,
                model_mda,
            )
            if when == "always":
                out = recluster(*operands)
            elif when == "never":
                out = keep(*operands)
            else:
                due = (state.sgg_count % recluster_every) == 0
                out = lax.cond(due, recluster, keep, *operands)
            new_ids, new_scales, new_sizes, new_mdas, model_mda = out
            for j, i in enumerate(chosen):
                ids[i], scales[i] = new_ids[j], new_scales[j]
                sizes[i], mdas[i] = new_sizes[j], new_mdas[j]

        new_state = SGGState(
            sgg_count=optax.safe_increment(state.sgg_count),
            cluster_ids=treedef.unflatten(ids),
            cluster_scales=treedef.unflatten(scales),
            cluster_sizes=treedef.unflatten(sizes),
            cluster_mda=treedef.unflatten(mdas),
            model_mda=model_mda,
            inner_state=inner_state,
        )
        return treedef.unflatten(scaled), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgg(
    inner: optax.GradientTransformation,
    *,
    n_clusters: int = 3,
    recluster_every: int = 500,
    beta3: float = 0.99,
    scale_bounds: tuple[float, float] = (0.1, 10.0),
    min_ndim: int = 2,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales an Adam-like transformation's step per cluster of its first moment (SGG).

    Keeps no copy of the moment: it reads ``mu`` from the inner state. For every parameter
    tensor :math:`l` with ``ndim >= min_ndim`` (biases and norm scales pass through):

    * on the first update and then every ``recluster_every`` updates, the elements are
      clustered by :math:`|m_i|` with a 1-D K-means that runs inside jit (centres initialised
      at the :math:`(2k+1)/(2K)` quantiles, a fixed number of Lloyd iterations, nearest centre
      with ties to the lower one; cluster 0 holds the smallest :math:`|m|`), and

      .. math::
        D_{l,c} = \operatorname{median}_{i \in c} |m_i - \bar m_l|, \qquad
        D = \operatorname{median}_{i \in \text{all clustered tensors}} |m_i - \bar m_{l(i)}|,

        S_{l,c} \leftarrow \operatorname{clip}\Big(\beta_3 S_{l,c} + (1 - \beta_3)
        \operatorname{clip}\big(\tfrac{D}{D_{l,c} + 10^{-8}}, s_{lo}, s_{hi}\big),
        s_{lo}, s_{hi}\Big),

      with :math:`\bar m_l` the mean of the tensor's moment (medians of an even count average
      the two middle values);
    * on every update, each element's inner update is multiplied by its cluster's scale.

    The model-wide MDA :math:`D` (the paper describes it only as the typical parameter-wise
    deviation throughout the model) is the MDA statistic itself pooled over every element of
    every clustered tensor: the same quantity as :math:`D_{l,c}`, over the union of all
    clusters. A cluster whose deviations are typical of the model keeps scale 1; each
    parameter counts once, so large tensors weigh as much as their size and a small tensor
    cannot set the model's reference.

    Moments that are NaN/Inf are left out of every statistic and keep their previous cluster
    id; a statistic that cannot be formed (an empty cluster, no finite moment) leaves the
    scale as it was, so no NaN/Inf ever enters the state.

    The scales formed at a re-clustering multiply the updates from the next update on (one
    update later than a literal reading of the paper): the ordinary update then needs
    nothing from the clustering and stays one fused elementwise pass, with the clustering in
    a ``lax.cond`` branch that ordinary updates skip.

    Args:
      inner: an Adam-like transformation whose state has a field ``mu`` (e.g.
        :func:`optax.scale_by_adam`, :func:`optax.lion`, :func:`optax.nadam`).
      n_clusters: clusters per tensor, K (1 to 127; ids are int8).
      recluster_every: updates between re-clusterings, T.
      beta3: decay of the scales' EMA, in [0, 1).
      scale_bounds: ``(low, high)``, positive; bounds of the target scale and of the EMA.
      min_ndim: tensors with fewer dimensions are not scaled.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is an :class:`SGGState`.

    Raises:
      ValueError: for an invalid hyperparameter, or (at ``init``) if the inner state has no
        field ``mu`` or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
      >>> tx = lbw_optax.sgg(optax.scale_by_adam(), recluster_every=100)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
      >>> updates, state = tx.update(grads, state, params)
      >>> [int(n) for n in state.cluster_sizes["w"]]
      [5, 4, 3]

    References:
      Li et al., `Taming LLMs by Scaling Learning Rates with Gradient Grouping
      <https://arxiv.org/abs/2506.01049>`_, ACL 2025.
    """
    return _sgg_transform(
        inner,
        n_clusters=n_clusters,
        recluster_every=recluster_every,
        beta3=beta3,
        scale_bounds=scale_bounds,
        min_ndim=min_ndim,
        when="interval",
    )


def sgg_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    n_clusters: int = 3,
    recluster_every: int = 500,
    beta3: float = 0.99,
    scale_bounds: tuple[float, float] = (0.1, 10.0),
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW whose adaptive step is scaled by :func:`sgg`, as in the paper.

    .. math::
      u_t = -\eta_t \big(S_{c(i)} \, \hat m_t / (\sqrt{\hat v_t} + \epsilon)
      + \lambda \theta_{t-1}\big),

    i.e. ``chain(sgg(scale_by_adam(b1, b2, eps)), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``: the cluster scale multiplies Adam's normalised
    step only, not the decoupled weight decay, and the learning rate multiplies both (so
    ``optax.inject_hyperparams`` can drive it). Tensors with ``ndim >= 2`` are scaled.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, weight_decay, mask: as in :func:`optax.adamw`.
      n_clusters, recluster_every, beta3, scale_bounds: as in :func:`sgg`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import lbw_optax
      >>> tx = lbw_optax.sgg_adamw(1e-3, recluster_every=200)

    References:
      Li et al., `Taming LLMs by Scaling Learning Rates with Gradient Grouping
      <https://arxiv.org/abs/2506.01049>`_, ACL 2025.
    """
    return optax.chain(
        sgg(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            n_clusters=n_clusters,
            recluster_every=recluster_every,
            beta3=beta3,
            scale_bounds=scale_bounds,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
