"""SGG: scale learning rates by gradient grouping (Li et al., 2025), as an Optax wrapper."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from lbw_optax import _adamw
from lbw_optax import _common as _pu
from lbw_optax._sense import first_moments
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
    holds :class:`optax.MaskedNode` there (it is never scaled), as :func:`optax.masked` does.

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
    # What lbw_optax.telemetry reports (the per-element cluster ids are state, not a record).
    telemetry_fields = ("sgg_count", "cluster_scales", "cluster_sizes", "cluster_mda", "model_mda")


def _first_moment(inner_state: Any) -> Any:
    """The inner state's first moment: the one NamedTuple field named ``mu``."""
    found = first_moments(inner_state)
    if len(found) > 1:
        raise ValueError(
            "sgg reads the first moment of the inner transformation from its state field "
            "'mu', but the inner state holds more than one (e.g. two Adam-like "
            "transformations chained); wrap the single Adam-like transformation instead"
        )
    if not found:
        raise ValueError(
            "sgg needs an inner transformation whose state holds a first moment in a field "
            "named 'mu' (e.g. optax.scale_by_adam, optax.adamw, optax.lion, optax.nadam); the "
            f"given one's state ({type(inner_state).__name__}) has none"
        )
    return found[0]


# Order statistics by bisection on the float's bits (no sort: sorts are slow on CPU). For
# non-negative float32 the int32 bit patterns are ordered like the values; 31 halvings of
# [0, bits(+inf)] pin down the exact value. Each halving is one fused pass per tensor that
# counts, for every query at once, the members at or below the query's midpoint.
_INF_BITS = 0x7F800000
_BISECTIONS = 31


def _bits(values: jax.Array) -> jax.Array:
    """int32 bit patterns, ordered like the values; anything not >= 0 (NaN) reads as +inf."""
    return lax.bitcast_convert_type(jnp.where(values >= 0, values, jnp.inf), jnp.int32)


_ANY = -2  # A query group: every element in some group (id >= 0).


def _count_at_or_below(bits, groups, query_groups, mid):
    below = bits[:, None] <= mid[None, :]
    if groups is not None:
        below &= jnp.stack(_member_columns(groups, query_groups), axis=1)
    return jnp.sum(below, axis=0, dtype=jnp.int32)


def _order_statistics(bits, groups, local, shared=None):
    """k-th smallest values (0-based ranks) by group, within each tensor and over all tensors.

    Args:
      bits: list of int32 ``[n_l]`` from :func:`_bits`.
      groups: list of int8 ``[n_l]`` group ids (-1: in no group), or of None (every element
        in group 0).
      local: per tensor, ``(query_groups, ranks)``: a static tuple of group ids (or ``_ANY``)
        and int32 ranks, one per query, answered within that tensor.
      shared: ``(query_groups, ranks)`` answered over the union of all tensors, or None.

    Returns:
      (a float32 array of answers per tensor, the shared answers); ``+inf`` where a group has
      too few members.
    """
    shared = shared or ((), jnp.zeros([0], jnp.int32))
    n_shared = len(shared[0])

    def halve(_, bounds):
        local_bounds, (shared_lo, shared_hi) = bounds
        shared_mid = shared_lo + (shared_hi - shared_lo) // 2
        shared_count = jnp.zeros([n_shared], jnp.int32)
        new_local = []
        for b, g, (queries, ranks), (lo, hi) in zip(bits, groups, local, local_bounds, strict=True):
            mid = lo + (hi - lo) // 2
            counts = _count_at_or_below(
                b, g, queries + shared[0], jnp.concatenate([mid, shared_mid])
            )
            enough = counts[: len(queries)] >= ranks + 1
            new_local.append((jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)))
            shared_count += counts[len(queries) :]
        enough = shared_count >= shared[1] + 1
        shared_bounds = (
            jnp.where(enough, shared_lo, shared_mid + 1),
            jnp.where(enough, shared_mid, shared_hi),
        )
        return new_local, shared_bounds

    start = lambda n: (jnp.zeros([n], jnp.int32), jnp.full([n], _INF_BITS, jnp.int32))
    bounds = ([start(len(q)) for q, _ in local], start(n_shared))
    local_bounds, (_, shared_hi) = lax.fori_loop(0, _BISECTIONS, halve, bounds)
    as_float = lambda b: lax.bitcast_convert_type(b, jnp.float32)
    return [as_float(hi) for _, hi in local_bounds], as_float(shared_hi)


def _member_columns(groups, query_groups):
    return [(groups >= 0) if q == _ANY else (groups == q) for q in query_groups]


def _medians(bits, groups, local_groups, local_sizes, shared_groups, shared_size):
    """Median of each queried group (mean of the two middle values if the count is even).

    The lower middle comes from :func:`_order_statistics`; the upper one is the lower one if
    enough members equal it, else the smallest member above it (one more pass).
    """
    lower = lambda size: (size - 1) // 2
    local = [(q, lower(size)) for q, size in zip(local_groups, local_sizes, strict=True)]
    local_low, shared_low = _order_statistics(
        bits, groups, local, (shared_groups, lower(shared_size))
    )
    as_bits = lambda v: lax.bitcast_convert_type(v, jnp.int32)
    shared_count = jnp.zeros(shared_size.shape, jnp.int32)
    shared_next = jnp.full(shared_size.shape, _INF_BITS, jnp.int32)
    out = []
    for b, g, q, size, low in zip(bits, groups, local_groups, local_sizes, local_low, strict=True):
        columns = _member_columns(g, q + shared_groups)
        thresholds = jnp.concatenate([as_bits(low), as_bits(shared_low)])
        counts = jnp.stack(
            [jnp.sum(c & (b <= thresholds[j]), dtype=jnp.int32) for j, c in enumerate(columns)]
        )
        nexts = jnp.stack(
            [
                jnp.min(jnp.where(c & (b > thresholds[j]), b, _INF_BITS))
                for j, c in enumerate(columns)
            ]
        )
        n = len(q)
        shared_count += counts[n:]
        shared_next = jnp.minimum(shared_next, nexts[n:])
        high = jnp.where(counts[:n] >= size // 2 + 1, as_bits(low), nexts[:n])
        out.append(0.5 * (low + lax.bitcast_convert_type(high, jnp.float32)))
    high = jnp.where(shared_count >= shared_size // 2 + 1, as_bits(shared_low), shared_next)
    return out, 0.5 * (shared_low + lax.bitcast_convert_type(high, jnp.float32))


def _assign(x: jax.Array, centres: jax.Array) -> jax.Array:
    """Nearest of the sorted ``centres`` (ties to the lower one): how many midpoints x exceeds."""
    midpoints = 0.5 * (centres[:-1] + centres[1:])
    ids = jnp.zeros(x.shape, jnp.int32)
    for k in range(midpoints.shape[0]):
        ids = ids + (x > midpoints[k]).astype(jnp.int32)
    return ids


def _member_sums(x, centres):
    """Sum and count of the finite ``x`` nearest each centre, one fused pass over x."""
    one_hot = (_assign(x, centres)[:, None] == jnp.arange(centres.shape[0])[None, :]) & (
        jnp.isfinite(x)[:, None]
    )
    sums = jnp.sum(jnp.where(one_hot, x[:, None], 0.0), axis=0)
    return sums, jnp.sum(one_hot, axis=0, dtype=jnp.int32)


def _kmeans_1d(xs, n_clusters):
    """Deterministic 1-D K-means of each array's finite values: (ids, sizes) per array.

    Cluster 0 holds the smallest values; non-finite values get id 0 and are in no cluster.
    """
    # Initial centres at the quantiles (2k + 1) / (2K) of the finite values, in integers
    # without overflow: the floor((2k + 1) n / (2K))-th smallest.
    n_finite = [jnp.sum(jnp.isfinite(x), dtype=jnp.int32) for x in xs]
    odd = 2 * jnp.arange(n_clusters, dtype=jnp.int32) + 1
    two_k = 2 * n_clusters
    ranks = [(n // two_k) * odd + ((n % two_k) * odd) // two_k for n in n_finite]
    local = [((0,) * n_clusters, r) for r in ranks]
    quantiles, _ = _order_statistics([_bits(x) for x in xs], [None] * len(xs), local, None)
    result = []
    for x, n, q in zip(xs, n_finite, quantiles, strict=True):

        def lloyd(_, centres, x=x):
            sums, counts = _member_sums(x, centres)
            return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centres)

        centres = jnp.where(n > 0, q, 0.0)
        centres = jnp.sort(lax.fori_loop(0, _LLOYD_ITERATIONS, lloyd, centres))
        _, sizes = _member_sums(x, centres)
        result.append((_assign(x, centres), sizes))
    return result


def _recluster(mus, ids, scales, sizes, mdas, model_mda, *, n_clusters, beta3, low, high):
    """Re-clusters every clustered tensor and advances the scales' EMA (pure, jit-able)."""
    del sizes  # Recomputed.
    ms = [m.reshape(-1).astype(jnp.float32) for m in mus]
    clusters = _kmeans_1d([jnp.abs(m) for m in ms], n_clusters)
    deviation_bits, groups, sizes_list, total = [], [], [], 0
    for m, (cluster, size) in zip(ms, clusters, strict=True):
        finite = jnp.isfinite(m)
        n_finite = jnp.sum(finite, dtype=jnp.int32)
        mean = jnp.sum(jnp.where(finite, m, 0.0)) / jnp.maximum(n_finite, 1)
        deviation_bits.append(_bits(jnp.abs(m - mean)))
        groups.append(jnp.where(finite, cluster, -1).astype(jnp.int8))
        sizes_list.append(size)
        total += n_finite
    # Model-wide MDA: the median deviation over every clustered element (see sgg's notes).
    local_mdas, shared_mda = _medians(
        deviation_bits,
        groups,
        [tuple(range(n_clusters))] * len(ms),
        sizes_list,
        (_ANY,),
        total[None],
    )
    new_model_mda = shared_mda[0]
    model_ok = (total > 0) & jnp.isfinite(new_model_mda)

    new_ids, new_scales, new_sizes, new_mdas = [], [], [], []
    for m, old, (cluster, size), mda, scale, old_mda in zip(
        ms, ids, clusters, local_mdas, scales, mdas, strict=True
    ):
        ok = model_ok & (size > 0) & jnp.isfinite(mda)
        target = jnp.clip(new_model_mda / (mda + _MDA_EPS), low, high)
        ema = jnp.clip(beta3 * scale + (1.0 - beta3) * target, low, high).astype(scale.dtype)
        kept = jnp.where(jnp.isfinite(m), cluster, old.reshape(-1).astype(jnp.int32))
        new_ids.append(kept.astype(jnp.int8).reshape(old.shape))
        new_scales.append(jnp.where(ok, ema, scale))
        new_sizes.append(size)
        new_mdas.append(jnp.where(ok, mda, old_mda))
    model_mda = jnp.where(model_ok, new_model_mda, model_mda)
    return new_ids, new_scales, new_sizes, new_mdas, model_mda


def _check_scale_bounds(scale_bounds: Any) -> tuple[float, float]:
    if not (isinstance(scale_bounds, tuple | list) and len(scale_bounds) == 2):
        raise ValueError(f"scale_bounds must be a pair (low, high), got {scale_bounds!r}")
    low, high = scale_bounds
    check_positive("scale_bounds[0]", low)
    check_positive("scale_bounds[1]", high)
    check_ordered("scale_bounds[0]", low, "scale_bounds[1]", high)
    return float(low), float(high)


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

    * at updates :math:`t = T, 2T, \dots` (:math:`t \bmod T = 0`, 1-based, as in the paper's
      Algorithm 1; :math:`T` = ``recluster_every``), the elements are clustered by
      :math:`|m_i|` with a 1-D K-means that runs inside jit (centres initialised at the
      :math:`(2k+1)/(2K)` quantiles, a fixed number of Lloyd iterations, nearest centre
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

    Before the first re-clustering (updates 1 to :math:`T - 1`) every scale is 1: the inner
    transformation runs unchanged. The paper sets :math:`T` to 1-5 % of training (Appendix
    A); its default 500 suits runs of 10k-50k steps, so scale it to shorter runs.

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
      >>> tx = lbw_optax.sgg(optax.scale_by_adam(), recluster_every=1)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
      >>> updates, state = tx.update(grads, state, params)
      >>> [int(n) for n in state.cluster_sizes["w"]]
      [5, 4, 3]

    References:
      Li et al., `Taming LLMs by Scaling Learning Rates with Gradient Grouping
      <https://arxiv.org/abs/2506.01049>`_, ACL 2025.
    """
    # optax.inject_hyperparams passes every numeric argument as an array, traced inside
    # update: check concrete values; the cluster count is read from the state's shapes.
    n_clusters, recluster_every, beta3 = map(_pu.concrete, (n_clusters, recluster_every, beta3))
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
        # optax.MaskedNode (no leaves) where a tensor is never scaled, as in optax.masked.
        return jax.tree.map(lambda p: make(p) if clustered(p) else optax.MaskedNode(), params)

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
            # The paper's t mod T = 0, with t the 1-based number of this update.
            due = (optax.safe_increment(state.sgg_count) % recluster_every) == 0
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


def sgg_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = False,
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
      b1, b2, eps, weight_decay, mask, eps_root, mu_dtype, nesterov: as in :func:`optax.adamw`.
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
    _adamw.check_adamw_args(learning_rate, b1, b2, eps, weight_decay, eps_root)
    adam = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov)
    return _adamw.decoupled(
        sgg(
            adam,
            n_clusters=n_clusters,
            recluster_every=recluster_every,
            beta3=beta3,
            scale_bounds=scale_bounds,
        ),
        learning_rate,
        weight_decay,
        mask,
    )
