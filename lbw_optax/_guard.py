"""The guard: wires sense → interpret/decide → actuate → record around any optax transformation."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbw_optax import _adamw, _common, _validate
from lbw_optax._governor import governor_policy
from lbw_optax._policy import Policy
from lbw_optax._reference import reference_policy
from lbw_optax._regime import Regime
from lbw_optax._schedule_free import find_schedule_free_state
from lbw_optax._sense import (
    Signals,
    empty_signals,
    find_first_moment,
    num_sensed_tensors,
    sense,
    stack_flags,
)

_POLICIES = {"governor": governor_policy, "reference": reference_policy}

# The per-tensor limit of the governor named by string over clipped gradients (the default of
# lbw_adamw): over clipping a tighter limit than governor_policy's 0.035 holds stressed learning
# rates far better and costs at most 1.5 % at the base one (results/governor-probe/v6.md).
CLIPPED_MAX_UPDATE_RATIO = 0.025


class GuardState(NamedTuple):
    """State of :func:`guard`: the governance record plus the inner optimizer's state.

    Attributes:
      step: int32, updates seen (1 after the first update).
      regime: int32, the :class:`~lbw_optax.Regime` of the latest step.
      scale: float32, the policy's scale in force at the latest step.
      held: bool, whether the latest step was held (zero update, inner state kept).
      effective_scale: float32, what the latest update really got: ``scale`` times the
        norm-weighted per-tensor factors of the decision (``‖applied update‖ / ‖inner
        update‖``), 0 on a held step.
      control_active_steps: int32, steps with ``scale != 1`` or a held update.
      regime_switches: int32, steps whose regime differs from the previous step's (the
        regime before the first step is ``STABLE``).
      control_energy: float32, Σ |1 − effective_scale| over steps.
      skipped_steps: int32, held steps (non-finite ones included).
      nonfinite_steps: int32, steps whose loss, gradients or inner update were NaN/Inf.
      signals: :class:`~lbw_optax.Signals`, the latest *finite* sensed signals.
      policy_state: the policy's own state (NamedTuple of scalars).
      inner_state: the wrapped transformation's state.
    """

    step: jax.Array
    regime: jax.Array
    scale: jax.Array
    held: jax.Array
    effective_scale: jax.Array
    control_active_steps: jax.Array
    regime_switches: jax.Array
    control_energy: jax.Array
    skipped_steps: jax.Array
    nonfinite_steps: jax.Array
    signals: Signals
    policy_state: Any
    inner_state: Any
    # What lbw_optax.telemetry reports (the nested signals and policy state flattened).
    telemetry_fields = (
        "step",
        "regime",
        "scale",
        "held",
        "effective_scale",
        "control_active_steps",
        "regime_switches",
        "control_energy",
        "skipped_steps",
        "nonfinite_steps",
        "signals",
        "policy_state",
    )

    # The inner schedule-free state's fields that optax.contrib.schedule_free_eval_params reads
    # (None without one, which it reports), so that it works on a guard's state.
    @property
    def b1(self) -> Any:
        found = find_schedule_free_state(self.inner_state)
        return None if found is None else found.b1

    @property
    def z(self) -> Any:
        found = find_schedule_free_state(self.inner_state)
        return None if found is None else found.z


def resolve_policy(policy: str | Policy, *, clipped: bool = False) -> Policy:
    """Returns a policy instance for a name (``"governor"``, ``"reference"``) or an instance.

    The governor by name over clipped gradients (``clipped``: the guard's ``clip_threshold``)
    gets :data:`CLIPPED_MAX_UPDATE_RATIO` as its limit; everything else its factory's defaults.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy in _POLICIES:
        if clipped and policy == "governor":
            return governor_policy(max_update_ratio=CLIPPED_MAX_UPDATE_RATIO)
        return _POLICIES[policy]()
    raise ValueError(
        f"policy must be one of {sorted(_POLICIES)} or a lbw_optax.Policy instance, got {policy!r}"
    )


def _per_tensor(tensor_scale: Any) -> bool:
    return not isinstance(tensor_scale, int | float) and jnp.ndim(tensor_scale) == 1


def actuate(
    updates: Any, scale: jax.Array, hold: jax.Array, tensor_scale: Any = 1.0, stacked: Any = None
) -> Any:
    """Multiplies the inner updates by the scale (times each sensed tensor's factor in
    ``tensor_scale``: one per non-empty leaf, or per layer of a stacked leaf), or zeroes them on
    a held step; keeps dtypes."""
    leaves, treedef = jax.tree.flatten(updates)
    if _per_tensor(tensor_scale):
        factors, k = [], 0
        for u, flag in zip(leaves, stack_flags(updates, stacked), strict=True):
            if u.size == 0:
                factors.append(scale)
            elif flag:
                n = u.shape[0]
                factors.append(scale * tensor_scale[k : k + n].reshape((n,) + (1,) * (u.ndim - 1)))
                k += n
            else:
                factors.append(scale * tensor_scale[k])
                k += 1
    else:
        factors = [scale * tensor_scale] * len(leaves)
    out = [
        jnp.where(hold, jnp.zeros_like(u), (u * f).astype(u.dtype))
        for u, f in zip(leaves, factors, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def effective_scale(scale: jax.Array, tensor_scale: Any, signals: Signals) -> jax.Array:
    """``‖applied update‖ / ‖inner update‖`` before a hold: the scale times the norm-weighted
    per-tensor factors (1 when the inner update is zero)."""
    if not _per_tensor(tensor_scale):
        return scale * tensor_scale
    norms = signals.tensor_update_norms
    total = jnp.sum(jnp.square(norms))
    kept = jnp.sum(jnp.square(tensor_scale * norms))
    return scale * jnp.where(total > 0, jnp.sqrt(kept / jnp.where(total > 0, total, 1.0)), 1.0)


def record(
    state: GuardState, regime, scale, applied, hold, finite, signals, policy_state, inner_state
):
    """Advances the governance record by one step; ``applied`` is the effective scale."""
    return GuardState(
        step=optax.safe_increment(state.step),
        regime=regime,
        scale=scale,
        held=hold,
        effective_scale=applied,
        control_active_steps=_common.count_if(state.control_active_steps, hold | (applied != 1.0)),
        regime_switches=_common.count_if(state.regime_switches, regime != state.regime),
        control_energy=state.control_energy + jnp.abs(1.0 - applied),
        skipped_steps=_common.count_if(state.skipped_steps, hold),
        nonfinite_steps=_common.count_if(state.nonfinite_steps, ~finite),
        signals=signals,
        policy_state=policy_state,
        inner_state=inner_state,
    )


def guard(
    inner: optax.GradientTransformation,
    *,
    policy: str | Policy = "governor",
    check_updates: bool | None = None,
    stacked: Any = None,
    clip_threshold: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Governs any optax transformation with a bounded, recorded control loop.

    Every step: **sense** the gradients (and the loss, ``value=``, when given:
    ``Signals.loss_seen``) into a few scalars in one fused pass; let the **policy** interpret
    them into a :class:`~lbw_optax.Regime` and decide a scale in its bounds (and whether to
    hold); run the inner transformation; **actuate** (``update = scale · inner_update``, or
    zero on a held step with the inner state kept); **record** the counters and signals in
    the state. No host synchronisation happens.

    Non-finite loss or gradients always hold the step: zero update, inner state and policy
    state unchanged, ``nonfinite_steps`` and ``skipped_steps`` counted, no NaN/Inf written to
    any statistic. The next finite step proceeds normally.

    When the inner update is sensed (``check_updates``), a NaN/Inf that the inner optimizer
    makes from finite gradients (e.g. bf16 moments that overflow) is held the same way and
    never reaches the parameters; the inner state then advances (the moments that made the
    NaN would make it again, and keeping them would cost another pass over the state).

    Args:
      inner: the transformation to govern (e.g. ``optax.adamw(1e-3)``). It receives the
        gradients, ``params`` and every extra argument, ``value`` included.
      policy: ``"governor"`` (:func:`~lbw_optax.governor_policy` defaults; with
        ``clip_threshold``, ``max_update_ratio=0.025``: a tighter per-tensor limit over clipped
        gradients, chosen in ``results/governor-probe/v6.md``), ``"reference"``
        (:func:`~lbw_optax.reference_policy` defaults) or a policy instance.
      check_updates: sense the inner update (one more pass over it; ``benchmarks/overhead.py``
        measures what it costs) so that a non-finite one is held. ``None``: when
        the policy senses the update anyway (a per-tensor limiter, as the governor's), where
        the check is free.
      stacked: which parameters stack layers on their leading axis (the scanned layout of
        MaxText, Levanter or ``models.ModelConfig(scan_layers=True)``), as optax's ``mask``: a
        tree of bools with the parameters' structure (or a prefix of it), or a callable
        ``params -> such a tree``. Each layer of a stacked leaf is then sensed, limited and
        reported as a tensor of its own, exactly as in the unrolled layout, with one reduction
        per stacked array. ``None``: every leaf is one tensor.
      clip_threshold: clip the gradients to this global norm (> 0) for the inner
        transformation with ``optax.clip_by_global_norm``, and sense them unclipped: a spike
        stays visible to the policy, as in ``guard(optax.chain(clip, inner))``, and the
        state is the inner transformation's own. ``None``: no clipping.
        ``optax.chain(optax.clip_by_global_norm(c), guard(inner))`` instead hides spikes from
        the guard: it senses gradients whose norm is at most ``c``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
      ``(updates, state, params=None, *, value=None, **extra_args)``.

    Example:
      >>> import jax.numpy as jnp, optax, lbw_optax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = lbw_optax.guard(optax.adamw(1e-2))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.full(3, 0.5)}
      >>> updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
      >>> int(lbw_optax.telemetry(state)["step"])
      1
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(
            f"inner must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)), got {inner!r}"
        )
    policy = resolve_policy(policy, clipped=clip_threshold is not None)
    if check_updates is None:
        check_updates = policy.needs_tensor_norms
    elif policy.needs_tensor_norms and not check_updates:
        raise ValueError(
            f"check_updates=False: the {type(policy).__name__} senses the update anyway "
            "(its per-tensor limiter), so the check costs nothing; leave it at None"
        )
    clip = None
    if clip_threshold is not None:
        # Checked where its value is known (optax.inject_hyperparams traces it in update).
        clip_threshold = _common.check(_validate.check_positive, "clip_threshold", clip_threshold)
        clip = optax.clip_by_global_norm(clip_threshold)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        tensors = num_sensed_tensors(params, stacked) if policy.needs_tensor_norms else None
        state = GuardState(
            step=jnp.zeros([], jnp.int32),
            regime=jnp.asarray(Regime.STABLE, jnp.int32),
            scale=jnp.ones([], jnp.float32),
            held=jnp.array(False),
            effective_scale=jnp.ones([], jnp.float32),
            control_active_steps=jnp.zeros([], jnp.int32),
            regime_switches=jnp.zeros([], jnp.int32),
            control_energy=jnp.zeros([], jnp.float32),
            skipped_steps=jnp.zeros([], jnp.int32),
            nonfinite_steps=jnp.zeros([], jnp.int32),
            signals=empty_signals(tensors),
            policy_state=policy.init(),
            inner_state=inner.init(params),
        )
        return _common.distinct_buffers(state)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        if value is None and policy.needs_value:
            raise ValueError(
                f"the {type(policy).__name__} senses the loss: pass it as "
                "tx.update(grads, state, params, value=loss)"
            )
        if params is None and policy.needs_tensor_norms:
            raise ValueError(
                f"the {type(policy).__name__} limits each tensor's update relative to the "
                "tensor: pass the parameters, tx.update(grads, state, params, value=loss)"
            )
        if value is not None:
            extra_args["value"] = value
        # The inner optimizer gets the clipped gradients; the guard senses the raw ones.
        clipped = updates if clip is None else clip.update(updates, clip.init(updates))[0]
        inner_updates, inner_state = inner.update(clipped, state.inner_state, params, **extra_args)
        if num_sensed_tensors(updates) == 0:
            # Nothing to govern (e.g. a multi_transform group with no parameters): identity.
            step = optax.safe_increment(state.step)
            return inner_updates, state._replace(step=step, inner_state=inner_state)

        step = optax.safe_increment(state.step)
        momentum = find_first_moment(state.inner_state, updates) if policy.needs_momentum else None
        # One pass senses the gradients and, when checked, the inner update (a NaN that the
        # inner optimizer makes from finite gradients, e.g. bf16 moments, is held like a NaN
        # gradient, never applied).
        signals, grads_finite, updates_finite = sense(
            updates,
            value,
            momentum,
            updates=inner_updates if check_updates else None,
            params=params if policy.needs_tensor_norms else None,
            stacked=stacked,
        )
        finite = grads_finite & updates_finite
        decision, policy_state = policy.decide(
            signals, state.policy_state, step=step, scale=state.scale, regime=state.regime
        )

        hold = ~finite | decision.hold
        new_updates = actuate(inner_updates, decision.scale, hold, decision.tensor_scale, stacked)
        applied = effective_scale(decision.scale, decision.tensor_scale, signals)
        new_state = record(
            state,
            regime=jnp.where(finite, decision.regime, Regime.NONFINITE).astype(jnp.int32),
            scale=jnp.where(finite, decision.scale, state.scale),
            applied=jnp.where(hold, 0.0, applied).astype(jnp.float32),
            hold=hold,
            finite=finite,
            signals=_common.keep_if(finite, signals, state.signals),
            policy_state=_common.keep_if(finite, policy_state, state.policy_state),
            # The inner state is kept on non-finite gradients and on a policy's hold. A NaN that
            # the inner optimizer makes itself from finite gradients is never applied, but its
            # state advances: keeping it would cost another pass over the moments, and the
            # moments that made the NaN would make it again.
            inner_state=_common.keep_if(
                grads_finite & ~decision.hold, inner_state, state.inner_state
            ),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lbw_adamw(
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
    policy: str | Policy = "governor",
    stacked: Any = None,
    clip_threshold: float | None = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """AdamW governed by :func:`guard`, over gradients clipped to a global norm of 1.0:
    ``guard(optax.adamw(...), policy=policy, clip_threshold=clip_threshold)``.

    The default is the governor over clipped AdamW, what practitioners run (AdamW with
    clipping at 1.0) with governance above it: the guard senses the raw gradients, then the
    inner AdamW gets them clipped, and the governor's per-tensor limit is 2.5 % of a tensor's
    norm per step (``governor_policy(max_update_ratio=0.025)``; 3.5 % without clipping).
    ``clip_threshold=None`` gives the published, unclipped guard.

    The scale multiplies AdamW's whole update, so it acts as ``learning_rate × scale`` on both
    the adaptive step and the decoupled weight decay, as in the published LBW-Guard.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, weight_decay, mask, eps_root, mu_dtype, nesterov: as in :func:`optax.adamw`.
      policy: ``"governor"``, ``"reference"`` or a policy instance (see :func:`guard`).
      stacked: the parameters whose leading axis stacks layers (see :func:`guard`).
      clip_threshold: clip the gradients to this global norm after the guard has sensed them
        (see :func:`guard`); ``None``: no clipping (the paper's guard).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import lbw_optax
      >>> tx = lbw_optax.lbw_adamw(1e-3, policy="reference")
    """
    adamw = _adamw.adamw(
        learning_rate, b1, b2, eps, weight_decay, mask, eps_root, mu_dtype, nesterov
    )
    return guard(adamw, policy=policy, stacked=stacked, clip_threshold=clip_threshold)
