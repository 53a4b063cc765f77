"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections.

``add_lora`` wraps chosen ``nnx.Linear`` projections in :class:`ScaledLoRA`, an ``nnx.LoRA`` whose
two factors are ``nnx.LoRAParam`` variables and whose output is scaled by ``alpha / rank``::

    y = x @ W + b + (alpha / rank) · (x @ A) @ B        A: [in, r] (He uniform), B: [r, out] (zeros)

Because ``B`` starts at zero a freshly adapted model computes exactly what the base model does.

Choosing what trains. ``nnx.LoRAParam`` is a subclass of ``nnx.Param``, so the filter
``nnx.Param`` selects the base weights *and* the adapters:

* adapters only (LoRA fine-tuning): ``LORA_PARAMS`` (``nnx.LoRAParam``);
* base weights only (full training of a model that carries adapters): ``BASE_PARAMS``
  (``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))``);
* everything: ``nnx.Param``.

Use the same filter in ``nnx.Optimizer(model, tx, wrt=...)`` and in
``nnx.grad(loss_fn, argnums=nnx.DiffState(0, ...))``.

``merge_lora`` folds the adapters into the base kernels (``W ← W + (alpha / rank) · A @ B``) and
removes them, leaving a plain model to export.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lbw.models.decoder import Decoder

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS

LORA_PARAMS = nnx.LoRAParam
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


class ScaledLoRA(nnx.LoRA):
    """``nnx.LoRA`` around a base ``nnx.Linear``, with the ``alpha / rank`` output scaling."""

    def __init__(
        self,
        base: nnx.Linear,
        *,
        rank: int,
        alpha: float,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            base.in_features,
            rank,
            base.out_features,
            base_module=base,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        x_lora, lora_a, lora_b = self.promote_dtype(
            (x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        delta = (x_lora @ lora_a) @ lora_b  # [..., in] @ [in, r] @ [r, out] → [..., out]
        return self.base_module(x) + delta * self.scaling

    def merged_kernel(self) -> jax.Array:
        """The base kernel with the adapter folded in, in the base kernel's dtype: [in, out]."""
        kernel = self.base_module.kernel[...]
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)
        return (kernel.astype(jnp.float32) + self.scaling * delta).astype(kernel.dtype)


def _projections(model: Decoder, targets: Sequence[str]) -> Iterator[tuple[nnx.Module, str]]:
    """Yields ``(owner, attribute)`` for each targeted projection of each block."""
    for block in model.layers:
        for name in targets:
            owner = block.self_attn if name in ATTENTION_TARGETS else block.mlp
            yield owner, name


def add_lora(
    model: Decoder,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ATTENTION_TARGETS,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> Decoder:
    """Wraps the ``targets`` projections of every block in adapters, in place.

    Args:
      model: the decoder to adapt; its base weights are left untouched.
      rank: adapter rank ``r``.
      alpha: adapter scale numerator; the adapter output is multiplied by ``alpha / rank``.
      targets: projection names among ``ALL_TARGETS`` (default ``ATTENTION_TARGETS``,
        i.e. q, k, v and o; add ``MLP_TARGETS`` to adapt the MLP too).
      param_dtype: storage dtype of the adapter factors (float32 by default, also under
        bfloat16 base weights).
      rngs: randomness for the ``A`` factors.

    Returns:
      ``model`` itself, now carrying ``nnx.LoRAParam`` adapters.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from lbw import models
      >>> model = models.Decoder(models.tiny_qwen2_5_3b(), rngs=nnx.Rngs(0))
      >>> model = models.add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
      >>> sum(x.size for x in jax.tree.leaves(nnx.state(model, models.LORA_PARAMS)))
      12800
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    if model.config.scan_layers:
        raise ValueError(
            "LoRA adapters need the unrolled layout: build the model with scan_layers=False "
            "(or models.unscan_layers(model)) before add_lora."
        )
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}.")
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {ALL_TARGETS}, got {targets}.")
    for owner, name in _projections(model, targets):
        base = getattr(owner, name)
        if isinstance(base, ScaledLoRA):
            raise ValueError(f"{name} already carries a LoRA adapter; call merge_lora first.")
        adapter = ScaledLoRA(
            base,
            rank=rank,
            alpha=alpha,
            dtype=model.config.dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        setattr(owner, name, adapter)
    return model


def has_lora(model: Decoder) -> bool:
    """Whether any projection of ``model`` carries an adapter."""
    if model.config.scan_layers:  # add_lora refuses the scanned layout.
        return False
    return any(
        isinstance(getattr(owner, name), ScaledLoRA)
        for owner, name in _projections(model, ALL_TARGETS)
    )


def merge_lora(model: Decoder) -> Decoder:
    """Folds every adapter into its base kernel and removes it, in place.

    The merged model computes the same function as the adapted one (up to rounding in the
    parameter dtype) and has exactly the parameters of a plain ``Decoder``.

    Returns:
      ``model`` itself, without ``nnx.LoRAParam`` variables.
    """
    for owner, name in _projections(model, ALL_TARGETS):
        adapter = getattr(owner, name)
        if isinstance(adapter, ScaledLoRA):
            base = adapter.base_module
            base.kernel[...] = adapter.merged_kernel()
            setattr(owner, name, base)
    return model
