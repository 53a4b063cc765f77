"""Sense: the per-step telemetry a policy reads, computed on device in one pass."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Signals(NamedTuple):
    """What the guard sensed at a step: float32 scalars, and two small per-tensor vectors.

    Attributes:
      loss: the loss passed as ``value=`` (0 when no loss is given: see ``loss_seen``).
      grad_norm: global L2 norm of the gradients (pre-clip, as the optimizer received them).
      grad_ms_max: the largest per-tensor mean of g² (the published rule's sensor).
      grad_ms_mean: the mean over tensors of the per-tensor mean of g².
      grad_mean: the mean of all gradient elements (its sign is the published rule's
        oscillation cue).
      grad_momentum_cos: cosine between the gradients and the inner optimizer's first moment
        *before* this step (``mu``), when the policy asks for it and the inner state has one
        (0 otherwise). Negative values mean the new gradient opposes the direction the
        optimizer has been moving in: the steps overshoot.
      update_norm: global L2 norm of the inner optimizer's update, before the guard scales it.
      tensor_update_norms: float32 ``[n]``, the L2 norm of each non-empty tensor of the inner
        update (leaf order), when the policy asks for per-tensor signals;
        :class:`optax.MaskedNode` (no leaves) otherwise.
      tensor_param_norms: float32 ``[n]``, the L2 norm of each matching parameter tensor
        before the step; :class:`optax.MaskedNode` when not sensed.
      tensor_sizes: float32 ``[n]``, the element count of each sensed tensor (a constant), so
        that a policy can turn norms into root-mean-squares; :class:`optax.MaskedNode` when
        not sensed.
      tensor_grad_update_dots: float32 ``[n]``, each tensor's ``g·u`` (gradient times inner
        update), when the policy asks for it: summed with the applied factors, the first-order
        change of the loss the step predicts; :class:`optax.MaskedNode` when not sensed.
      loss_seen: bool, whether the step was given its loss (``value=``). A wrapper that does
        not forward extra arguments (``flax.training.train_state.TrainState``,
        ``optax.lookahead``) gives none; a policy then reads no loss cue from ``loss``.
    """

    loss: jax.Array
    grad_norm: jax.Array
    grad_ms_max: jax.Array
    grad_ms_mean: jax.Array
    grad_mean: jax.Array
    grad_momentum_cos: jax.Array
    update_norm: jax.Array
    tensor_update_norms: jax.Array | optax.MaskedNode
    tensor_param_norms: jax.Array | optax.MaskedNode
    tensor_sizes: jax.Array | optax.MaskedNode
    tensor_grad_update_dots: jax.Array | optax.MaskedNode = optax.MaskedNode()
    loss_seen: jax.Array | bool = True


def empty_signals(num_tensors: int | None = None, *, dots: bool = False) -> Signals:
    """Zero signals: per-tensor vectors of ``num_tensors`` zeros (at least one, so that no
    zero-size array enters a state, which Orbax cannot save, and the state's structure does not
    depend on the parameters' count), or :class:`optax.MaskedNode` when ``None`` (not sensed);
    the ``g·u`` vector too when ``dots``."""
    zero = jnp.zeros([], jnp.float32)
    if num_tensors is None:
        vector = optax.MaskedNode()
    else:
        vector = jnp.zeros([max(num_tensors, 1)], jnp.float32)
    dot_vector = vector if dots else optax.MaskedNode()
    signals = Signals(zero, zero, zero, zero, zero, zero, zero, vector, vector, vector, dot_vector)
    return signals._replace(loss_seen=jnp.array(False))


def sensed_tensors(tree: Any) -> list[tuple[jax.tree_util.KeyPath, jax.Array]]:
    """The tensors of ``tree`` that are sensed, with their key paths, in the order of the
    per-tensor signals (``Signals.tensor_update_norms``, ...): the non-empty arrays, in leaf
    order. This is the one definition of that order (:func:`tensor_names` reports it)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(path, x) for path, x in leaves if x.size > 0]


def num_sensed_tensors(tree: Any) -> int:
    """How many tensors of ``tree`` are sensed (the non-empty arrays)."""
    return len(sensed_tensors(tree))


def tensor_names(params: Any) -> list[str]:
    """The name of each entry of the guard's per-tensor telemetry, in order.

    The per-tensor signals (``tensor_update_norms``, ``tensor_param_norms``, ``tensor_sizes``,
    ``tensor_grad_update_dots``) and the governor's per-tensor limits carry one entry per
    sensed tensor, unnamed; entry ``i`` belongs to the parameter ``tensor_names(params)[i]``.

    Args:
      params: the parameters as the guard sees them (for a guard in an
        ``optax.multi_transform`` group, that group's parameters; for ``flax.nnx``, e.g.
        ``nnx.state(model, nnx.Param)``).

    Returns:
      The key path of each sensed (non-empty) tensor, its keys joined by ``/``.

    Example:
      >>> import jax.numpy as jnp, lbw_optax
      >>> lbw_optax.tensor_names({"b": jnp.zeros(3), "w": {"kernel": jnp.ones((2, 3))}})
      ['b', 'w/kernel']
    """
    return [
        jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in sensed_tensors(params)
    ]


def first_moments(inner_state: Any) -> list[Any]:
    """Every first moment in ``inner_state``: the NamedTuple fields named ``mu``.

    Only state fields count, never dictionary keys, so a model with a parameter called ``mu``
    does not add candidates (``optax.tree.get`` alone would match its key in every moment).
    """
    is_field = lambda path, _: isinstance(path[-1], optax.tree_utils.NamedTupleKey)
    return [v for _, v in optax.tree.get_all_with_path(inner_state, "mu", filtering=is_field)]


def find_first_moment(inner_state: Any, grads: Any) -> Any | None:
    """The inner optimizer's first moment (a ``mu`` state field shaped like the gradients), or
    ``None`` when there is none or more than one."""
    found = first_moments(inner_state)
    if len(found) != 1:
        return None
    mu = found[0]
    if jax.tree.structure(mu) != jax.tree.structure(grads):
        return None
    shapes_match = all(
        m.shape == g.shape for m, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads), strict=True)
    )
    return mu if shapes_match else None


def _fused_sums(*terms: jax.Array) -> tuple[jax.Array, ...]:
    # The sums of several same-shaped float32 terms in one variadic reduction, so that each
    # array they read is read once. (Separate jnp.sum calls read it once per sum, and XLA shares
    # g*g with Adam's second moment, materialising it.)
    zero = jnp.zeros([], jnp.float32)
    add = lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True))
    return jax.lax.reduce(terms, (zero,) * len(terms), add, tuple(range(terms[0].ndim)))


def _f32(arrays: Any) -> list[jax.Array]:
    """Each array accumulated in float32 whatever its dtype (bf16 included)."""
    return [x.astype(jnp.float32) for x in arrays]


def sense(
    grads: Any, value: jax.Array | None, momentum: Any | None = None
) -> tuple[Signals, jax.Array]:
    """Reduces the gradients (and the loss) to a few scalars.

    Each tensor contributes two sums, Σg and Σg², computed by one variadic reduction, so
    sensing costs one read of the gradients. A NaN or Inf anywhere makes Σg² non-finite, so
    the same reduction also tells whether the step is finite (a sum of squares that
    overflows float32 counts as non-finite too, deliberately: such a step is not safe).

    Args:
      grads: the gradients.
      value: the scalar loss, or ``None``.
      momentum: the inner optimizer's first moment before this step, to sense the
        gradient–momentum alignment (costs one read of it), or ``None``.

    Returns:
      ``(signals, finite)`` where ``finite`` is a bool scalar: loss and gradients finite.
    """
    pairs = [
        (g, m)
        for g, m in zip(
            jax.tree.leaves(grads),
            jax.tree.leaves(grads) if momentum is None else jax.tree.leaves(momentum),
            strict=True,
        )
        if g.size > 0
    ]
    if not pairs:
        raise ValueError("the gradient tree has no non-empty arrays to sense")
    leaves = [g for g, _ in pairs]
    if momentum is None:
        sums, sq_sums = zip(*(_fused_sums(g, g * g) for g in _f32(leaves)), strict=True)
        dot, m_sq = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
    else:
        sums, sq_sums, dots, m_sqs = zip(
            *(_fused_sums(g, g * g, g * m, m * m) for g, m in map(_f32, pairs)),
            strict=True,
        )
        dot, m_sq = sum(dots), sum(m_sqs)
    mean_squares = jnp.stack([s / g.size for s, g in zip(sq_sums, leaves, strict=True)])
    total, total_sq = sum(sums), sum(sq_sums)
    count = sum(g.size for g in leaves)
    loss = jnp.zeros([], jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    if loss.shape != ():
        raise ValueError(f"value must be the scalar loss of the step, got shape {loss.shape}")
    finite = jnp.isfinite(total_sq) & jnp.isfinite(total) & jnp.isfinite(loss)
    cos = dot / (jnp.sqrt(total_sq * m_sq) + 1e-30)
    cos = jnp.where(jnp.isfinite(cos), cos, 0.0)
    signals = Signals(
        loss=loss,
        grad_norm=jnp.sqrt(total_sq),
        grad_ms_max=jnp.max(mean_squares),
        grad_ms_mean=jnp.mean(mean_squares),
        grad_mean=total / count,
        grad_momentum_cos=cos,
        update_norm=jnp.zeros([], jnp.float32),
        tensor_update_norms=optax.MaskedNode(),
        tensor_param_norms=optax.MaskedNode(),
        tensor_sizes=optax.MaskedNode(),
        loss_seen=jnp.asarray(value is not None),
    )
    return signals, finite


def sense_updates(
    signals: Signals, updates: Any, params: Any | None = None, grads: Any | None = None
) -> tuple[Signals, jax.Array]:
    """Adds the inner update's norms to ``signals``; tells whether the update is finite.

    One reduction per update tensor (fused with a read of the matching parameter when
    ``params`` is given, for the per-tensor norms a trust-ratio limiter needs). A NaN or Inf in
    the update makes its sum of squares non-finite.

    Args:
      signals: the gradient signals of the step.
      updates: the inner optimizer's update.
      params: the parameters before the step, to sense per-tensor norms; ``None`` senses only
        the global update norm.
      grads: the gradients, to sense each tensor's ``g·u`` as well (needs ``params``; one more
        read of the gradients); ``None``: not sensed.

    Returns:
      ``(signals, finite)``: the signals with ``update_norm`` (and, with ``params``, the
      per-tensor vectors) filled in, and whether every update element is finite.
    """
    leaves = [u for u in jax.tree.leaves(updates) if u.size > 0]
    if params is None:
        sq = [_fused_sums(u * u)[0] for u in _f32(leaves)]
        vectors = {}
    else:
        param_leaves = [p for p in jax.tree.leaves(params) if p.size > 0]
        if len(param_leaves) != len(leaves):
            raise ValueError("the updates and the parameters must have the same tensors")
        if grads is None:
            pairs = zip(leaves, param_leaves, strict=True)
            sq, p_sq = zip(*(_fused_sums(u * u, p * p) for u, p in map(_f32, pairs)), strict=True)
        else:
            grad_leaves = [g for g in jax.tree.leaves(grads) if g.size > 0]
            triples = zip(leaves, param_leaves, grad_leaves, strict=True)
            sums = (_fused_sums(u * u, p * p, g * u) for u, p, g in map(_f32, triples))
            sq, p_sq, dots = zip(*sums, strict=True)
        vectors = dict(
            tensor_update_norms=jnp.sqrt(jnp.stack(sq)),
            tensor_param_norms=jnp.sqrt(jnp.stack(p_sq)),
            tensor_sizes=jnp.asarray([u.size for u in leaves], jnp.float32),
        )
        if grads is not None:
            vectors["tensor_grad_update_dots"] = jnp.stack(dots)
    total_sq = sum(sq, jnp.zeros([], jnp.float32))
    finite = jnp.isfinite(total_sq)
    return signals._replace(update_norm=jnp.sqrt(total_sq), **vectors), finite
