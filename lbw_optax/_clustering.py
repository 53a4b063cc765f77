"""SGG's clustering: exact per-group medians by bisection and a 1-D K-means, on device."""

import jax
import jax.numpy as jnp
from jax import lax

# Lloyd iterations of the 1-D K-means; from quantile initial centres on |m| it settles in a few.
_LLOYD_ITERATIONS = 10

# Order statistics by bisection on the float's bits (no sort: sorts are slow on CPU). For
# non-negative float32 the int32 bit patterns are ordered like the values; 31 halvings of
# [0, bits(+inf)] pin down the exact value. Each halving is one fused pass per tensor that
# counts, for every query at once, the members at or below the query's midpoint.
_INF_BITS = 0x7F800000
_BISECTIONS = 31


def bits(values: jax.Array) -> jax.Array:
    """int32 bit patterns, ordered like the values; anything not >= 0 (NaN) reads as +inf."""
    return lax.bitcast_convert_type(jnp.where(values >= 0, values, jnp.inf), jnp.int32)


ANY = -2  # A query group: every element in some group (id >= 0).


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
      local: per tensor, ``(query_groups, ranks)``: a static tuple of group ids (or ``ANY``)
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
    return [(groups >= 0) if q == ANY else (groups == q) for q in query_groups]


def medians(bits, groups, local_groups, local_sizes, shared_groups, shared_size):
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


def kmeans_1d(xs, n_clusters):
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
    quantiles, _ = _order_statistics([bits(x) for x in xs], [None] * len(xs), local, None)
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
