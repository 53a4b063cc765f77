"""Sense: the per-step telemetry a policy reads, computed on device in one pass."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Signals(NamedTuple):
    """What the guard sensed at a step: float32 scalars, and small per-tensor vectors.

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
    loss_seen: jax.Array | bool = True


def empty_signals(num_tensors: int | None = None) -> Signals:
    """Zero signals: per-tensor vectors of ``num_tensors`` zeros (at least one, so that no
    zero-size array enters a state, which Orbax cannot save, and the state's structure does not
    depend on the parameters' count), or :class:`optax.MaskedNode` when ``None`` (not sensed)."""
    zero = jnp.zeros([], jnp.float32)
    if num_tensors is None:
        vector = optax.MaskedNode()
    else:
        vector = jnp.zeros([max(num_tensors, 1)], jnp.float32)
    return Signals(*[zero] * 7, vector, vector, vector, loss_seen=jnp.array(False))


def stack_flags(tree: Any, stacked: Any = None) -> list[bool]:
    """For each leaf of ``tree``, whether its leading axis stacks layers.

    Args:
      tree: the parameters (or a tree of the same structure).
      stacked: ``None`` (no leaf is stacked), or, as optax's ``mask``, a tree of bools with the
        structure of ``tree`` or a prefix of it, or a callable ``tree -> such a tree``.
    """
    leaves = jax.tree.leaves(tree)
    if stacked is None:
        return [False] * len(leaves)
    flags = stacked(tree) if callable(stacked) else stacked
    try:
        full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), flags, tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "stacked must be a tree of bools with the parameters' structure (or a prefix of "
            f"it), or a callable returning one: {error}"
        ) from None
    return jax.tree.leaves(full)


def _slices(x: Any, is_stacked: bool) -> int:
    """How many sensed tensors a leaf holds: one per layer when stacked, none when empty."""
    if x.size == 0:
        return 0
    if is_stacked:
        if x.ndim == 0:
            raise ValueError("a stacked leaf needs a leading layer axis, got a scalar")
        return x.shape[0]
    return 1


def num_sensed_tensors(tree: Any, stacked: Any = None) -> int:
    """How many tensors of ``tree`` are sensed: one per non-empty array, or per layer of a
    stacked one (see :func:`stack_flags`)."""
    flags = stack_flags(tree, stacked)
    return sum(_slices(x, f) for x, f in zip(jax.tree.leaves(tree), flags, strict=True))


def tensor_sizes(tree: Any, stacked: Any = None) -> list[int]:
    """The element count of each sensed tensor, in the order of the per-tensor vectors."""
    sizes = []
    for x, flag in zip(jax.tree.leaves(tree), stack_flags(tree, stacked), strict=True):
        n = _slices(x, flag)
        sizes += [x.size // n] * n if n else []
    return sizes


def tensor_names(params: Any, stacked: Any = None) -> list[str]:
    """The name of each entry of the guard's per-tensor telemetry, in order.

    The per-tensor signals (``tensor_update_norms``, ``tensor_param_norms``, ``tensor_sizes``)
    and the governor's per-tensor limits carry one entry per
    sensed tensor, unnamed; entry ``i`` belongs to ``tensor_names(params)[i]``: the non-empty
    leaves in leaf order, and each layer of a stacked leaf in a row (``path/0``, ``path/1``,
    ...), the order every per-tensor vector uses.

    Args:
      params: the parameters as the guard sees them (for a guard in an
        ``optax.multi_transform`` group, that group's parameters; for ``flax.nnx``, e.g.
        ``nnx.state(model, nnx.Param)``).
      stacked: the guard's ``stacked`` argument, if any.

    Returns:
      The key path of each sensed tensor, its keys joined by ``/``.

    Example:
      >>> import jax.numpy as jnp, lbw_optax
      >>> lbw_optax.tensor_names({"b": jnp.zeros(3), "w": {"kernel": jnp.ones((2, 3))}})
      ['b', 'w/kernel']
    """
    names = []
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, x), flag in zip(leaves, stack_flags(params, stacked), strict=True):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        n = _slices(x, flag)
        names += [f"{name}/{i}" for i in range(n)] if flag else [name] * n
    return names


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


def _fused_sums(terms: list[jax.Array], stacked: bool) -> tuple[jax.Array, ...]:
    # The sums of several same-shaped float32 terms in one variadic reduction, so that each
    # array they read is read once (separate jnp.sum calls read it once per sum), over every
    # axis, or every axis but the leading one of a stacked leaf: [1] or [L] per term.
    zero = jnp.zeros([], jnp.float32)
    add = lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True))
    axes = tuple(range(1 if stacked else 0, terms[0].ndim))
    sums = jax.lax.reduce(tuple(terms), (zero,) * len(terms), add, axes)
    return tuple(jnp.reshape(x, (-1,)) for x in sums)


class _Sums(NamedTuple):
    """Per-tensor sums, each a float32 vector with one entry per sensed tensor."""

    g: jax.Array
    g_sq: jax.Array
    g_m: jax.Array | None
    m_sq: jax.Array | None
    u_sq: jax.Array | None
    p_sq: jax.Array | None


def _leaf_sums(terms: list[jax.Array], update_terms: list[jax.Array], stacked: bool):
    """The sums of one leaf's gradient terms and update terms, in the pass that costs least
    where the program runs: one variadic reduction on a GPU (where a kernel launch costs more
    than the bytes it saves: XLA then computes the inner update inside the reduction), two on
    a CPU (where XLA fuses the update into the parameter write instead, and moves fewer
    bytes). The choice is made when the step is lowered, per platform, at no run-time cost."""
    if not update_terms:
        return _fused_sums(terms, stacked)
    one_pass = lambda t, u: _fused_sums(t + u, stacked)
    two_passes = lambda t, u: _fused_sums(t, stacked) + _fused_sums(u, stacked)
    return jax.lax.platform_dependent(terms, update_terms, cpu=two_passes, default=one_pass)


def _per_tensor_sums(grads, momentum, updates, params, flags) -> _Sums:
    """One variadic reduction per leaf reads the gradients (and the momentum, the update and
    the parameters when given) once; the per-leaf results are concatenated into vectors, so
    everything after is a handful of vector operations, whatever the number of tensors."""
    leaves = jax.tree.leaves(grads)
    others = [
        None if tree is None else jax.tree.leaves(tree) for tree in (momentum, updates, params)
    ]
    for other, what in zip(others, ("momentum", "updates", "parameters"), strict=True):
        if other is not None and len(other) != len(leaves):
            raise ValueError(f"the {what} and the gradients must have the same tensors")
    columns: list[list[jax.Array]] = []
    for i, (g, flag) in enumerate(zip(leaves, flags, strict=True)):
        if g.size == 0:
            continue
        g = g.astype(jnp.float32)
        m, u, p = (None if o is None else o[i].astype(jnp.float32) for o in others)
        terms = [g, g * g]
        if m is not None:
            terms += [g * m, m * m]
        update_terms = []
        if u is not None:
            update_terms += [u * u]
            if p is not None:
                update_terms += [p * p]
        columns.append(list(_leaf_sums(terms, update_terms, flag)))
    if not columns:
        raise ValueError("the gradient tree has no non-empty arrays to sense")
    vectors = [jnp.concatenate(column) for column in zip(*columns, strict=True)]
    names = ["g", "g_sq"]
    names += ["g_m", "m_sq"] if momentum is not None else []
    if updates is not None:
        names += ["u_sq"] + (["p_sq"] if params is not None else [])
    found = dict(zip(names, vectors, strict=True))
    return _Sums(**{name: found.get(name) for name in _Sums._fields})


def sense(
    grads: Any,
    value: jax.Array | None,
    momentum: Any | None = None,
    *,
    updates: Any | None = None,
    params: Any | None = None,
    stacked: Any = None,
) -> tuple[Signals, jax.Array, jax.Array]:
    """Reduces the gradients, the loss and (when given) the inner update to a few signals.

    One variadic reduction per tensor computes every sum the step needs (Σg, Σg², and with
    the update Σu², with the parameters Σθ², ...), so sensing reads each array once, and XLA
    can fuse the inner update's arithmetic into that same pass. A NaN or Inf anywhere makes a
    sum of squares non-finite, so the same reduction also tells whether the step is finite (a
    sum of squares that overflows float32 counts as non-finite too, deliberately: such a step
    is not safe).

    Args:
      grads: the gradients.
      value: the scalar loss, or ``None``.
      momentum: the inner optimizer's first moment before this step, to sense the
        gradient–momentum alignment (costs one read of it), or ``None``.
      updates: the inner optimizer's update, to sense its norm (and check it is finite), or
        ``None``.
      params: the parameters before the step, to sense the per-tensor norms a trust-ratio
        limiter needs (with ``updates``), or ``None``.
      stacked: which leaves stack layers on their leading axis (see :func:`stack_flags`);
        each layer is then a tensor of its own in the per-tensor vectors.

    Returns:
      ``(signals, grads_finite, updates_finite)``: bool scalars; ``grads_finite`` covers the
      loss and the gradients, ``updates_finite`` the update (true when not sensed).
    """
    flags = stack_flags(grads, stacked)
    sums = _per_tensor_sums(grads, momentum, updates, params, flags)
    size_list = tensor_sizes(grads, stacked)
    sizes = jnp.asarray(size_list, jnp.float32)
    total, total_sq = jnp.sum(sums.g), jnp.sum(sums.g_sq)
    loss = jnp.zeros([], jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    if loss.shape != ():
        raise ValueError(f"value must be the scalar loss of the step, got shape {loss.shape}")
    grads_finite = jnp.isfinite(total_sq) & jnp.isfinite(total) & jnp.isfinite(loss)
    cos = jnp.zeros([], jnp.float32)
    if sums.g_m is not None:
        cos = jnp.sum(sums.g_m) / (jnp.sqrt(total_sq * jnp.sum(sums.m_sq)) + 1e-30)
        cos = jnp.where(jnp.isfinite(cos), cos, 0.0)
    mean_squares = sums.g_sq / sizes
    signals = Signals(
        loss=loss,
        grad_norm=jnp.sqrt(total_sq),
        grad_ms_max=jnp.max(mean_squares),
        grad_ms_mean=jnp.mean(mean_squares),
        grad_mean=total / sum(size_list),
        grad_momentum_cos=cos,
        update_norm=jnp.zeros([], jnp.float32),
        tensor_update_norms=optax.MaskedNode(),
        tensor_param_norms=optax.MaskedNode(),
        tensor_sizes=optax.MaskedNode(),
        loss_seen=jnp.asarray(value is not None),
    )
    updates_finite = jnp.array(True)
    if sums.u_sq is not None:
        update_sq = jnp.sum(sums.u_sq)
        updates_finite = jnp.isfinite(update_sq)
        signals = signals._replace(update_norm=jnp.sqrt(update_sq))
    if sums.p_sq is not None:
        signals = signals._replace(
            tensor_update_norms=jnp.sqrt(sums.u_sq),
            tensor_param_norms=jnp.sqrt(sums.p_sq),
            tensor_sizes=sizes,
        )
    return signals, grads_finite, updates_finite
