"""SGG: scale learning rates by gradient grouping (Li et al., 2025), as an Optax wrapper."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from lbw_optax import _adamw
from lbw_optax import _common as _pu
from lbw_optax._clustering import ANY, bits, kmeans_1d, medians
from lbw_optax._sense import first_moments
from lbw_optax._validate import (
    check_in_range,
    check_non_negative_int,
    check_ordered,
    check_positive,
    check_positive_int,
)

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


def _recluster(mus, ids, scales, sizes, mdas, model_mda, *, n_clusters, beta3, low, high):
    """Re-clusters every clustered tensor and advances the scales' EMA (pure, jit-able)."""
    del sizes  # Recomputed.
    ms = [m.reshape(-1).astype(jnp.float32) for m in mus]
    clusters = kmeans_1d([jnp.abs(m) for m in ms], n_clusters)
    deviation_bits, groups, sizes_list, total = [], [], [], 0
    for m, (cluster, size) in zip(ms, clusters, strict=True):
        finite = jnp.isfinite(m)
        n_finite = jnp.sum(finite, dtype=jnp.int32)
        mean = jnp.sum(jnp.where(finite, m, 0.0)) / jnp.maximum(n_finite, 1)
        deviation_bits.append(bits(jnp.abs(m - mean)))
        groups.append(jnp.where(finite, cluster, -1).astype(jnp.int8))
        sizes_list.append(size)
        total += n_finite
    # Model-wide MDA: the median deviation over every clustered element (see sgg's notes).
    local_mdas, shared_mda = medians(
        deviation_bits,
        groups,
        [tuple(range(n_clusters))] * len(ms),
        sizes_list,
        (ANY,),
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
