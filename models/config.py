"""Decoder configuration and named presets.

One frozen dataclass describes both layouts this package supports:

* ``arch="qwen2"``: Qwen2 / Qwen2.5 (q/k/v bias, RoPE θ = 1e6, tied embeddings up to 3B).
* ``arch="llama"``: LLaMA-2 / TinyLlama (no bias, RoPE θ = 1e4, untied embeddings).

The public presets reproduce the Hugging Face ``config.json`` of each checkpoint, so their
parameter counts match the published models exactly. The ``tiny_*`` presets keep each family's
layout (bias, GQA ratio, tying) at a size that trains on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = ("qwen2", "llama")

# The byte-level tokenizer uses 256 byte ids and 3 special ids (259 in all); the tiny presets pad
# that vocabulary to a multiple of 64.
TINY_VOCAB_SIZE = 320


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Field names follow the Hugging Face configs (``hidden_size``, ``intermediate_size`` …) so a
    ``config.json`` maps onto them one to one.

    Attributes:
      name: a label for logs and reports.
      arch: ``"qwen2"`` or ``"llama"``; chooses the Hugging Face architecture on export.
      vocab_size: number of token ids (rows of the embedding table).
      hidden_size: width of the residual stream, ``D``.
      intermediate_size: width of the SwiGLU MLP, ``F``.
      num_layers: number of decoder blocks, ``L``.
      num_heads: number of query heads, ``N``.
      num_kv_heads: number of key/value heads, ``K``; ``N`` must be a multiple of ``K`` (GQA).
      head_dim: width of one head, ``H``.
      qkv_bias: whether the q, k and v projections carry a bias (Qwen2: yes, LLaMA: no).
      tie_embeddings: whether the output head reuses the input embedding table.
      rope_theta: base θ of the rotary position embedding.
      rms_norm_eps: ε of every RMSNorm.
      max_position_embeddings: longest context the checkpoint was trained for (metadata).
      dtype: compute dtype of activations and matmuls.
      param_dtype: storage dtype of the parameters.
      scan_layers: hold the blocks as one stacked block (every parameter with a leading layer
        axis ``L``) and run them with ``nnx.scan``, as MaxText and Levanter do: compilation
        then does not grow with depth. The logits are those of the unrolled model.
      remat: recompute each block's activations in the backward pass (``nnx.remat``) instead
        of keeping them: less memory, about one more forward pass of compute.
    """

    name: str = "custom"
    arch: str = "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = True
    tie_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32_768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}.")
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}.")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head, ``G = N // K``."""
        return self.num_heads // self.num_kv_heads


def _qwen2_5(**kwargs) -> ModelConfig:
    defaults = dict(
        arch="qwen2",
        vocab_size=151_936,
        head_dim=128,
        qkv_bias=True,
        tie_embeddings=True,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32_768,
    )
    return ModelConfig(**{**defaults, **kwargs})


def qwen2_5_0_5b() -> ModelConfig:
    """Qwen2.5-0.5B: 494,032,768 parameters."""
    return _qwen2_5(
        name="qwen2_5_0_5b",
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
    )


def qwen2_5_1_5b() -> ModelConfig:
    """Qwen2.5-1.5B: 1,543,714,304 parameters."""
    return _qwen2_5(
        name="qwen2_5_1_5b",
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
    )


def qwen2_5_3b() -> ModelConfig:
    """Qwen2.5-3B: 3,085,938,688 parameters."""
    return _qwen2_5(
        name="qwen2_5_3b",
        hidden_size=2048,
        intermediate_size=11_008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
    )


def qwen2_5_7b() -> ModelConfig:
    """Qwen2.5-7B: 7,615,616,512 parameters (untied embeddings)."""
    return _qwen2_5(
        name="qwen2_5_7b",
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18_944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        tie_embeddings=False,
    )


def qwen2_5_14b() -> ModelConfig:
    """Qwen2.5-14B: 14,770,033,664 parameters (untied embeddings)."""
    return _qwen2_5(
        name="qwen2_5_14b",
        vocab_size=152_064,
        hidden_size=5120,
        intermediate_size=13_824,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
        tie_embeddings=False,
        rms_norm_eps=1e-5,
    )


def tinyllama_1_1b() -> ModelConfig:
    """TinyLlama-1.1B (LLaMA-2 layout): 1,100,048,384 parameters."""
    return ModelConfig(
        name="tinyllama_1_1b",
        arch="llama",
        vocab_size=32_000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        head_dim=64,
        qkv_bias=False,
        tie_embeddings=False,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    )


def small_125m() -> ModelConfig:
    """GPT-2-small scale in the Qwen2.5 layout: 12 layers, 768 wide, 12 heads (no GQA), SwiGLU
    2048 (GPT-2's MLP parameters), GPT-2's vocabulary padded to 50,304, tied embeddings;
    123,614,976 parameters. A model a GPU trains for 1,000 steps in about a minute."""
    return _qwen2_5(
        name="small_125m",
        vocab_size=50_304,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        max_position_embeddings=1024,
    )


def tiny_qwen2_5_3b() -> ModelConfig:
    """CPU stand-in for Qwen2.5-3B: tied, q/k/v bias, GQA 8:1; 976,640 parameters."""
    return _qwen2_5(
        name="tiny_qwen2_5_3b",
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
    )


def tiny_qwen2_5_7b() -> ModelConfig:
    """CPU stand-in for Qwen2.5-7B: untied, q/k/v bias, GQA 7:1; 1,981,536 parameters."""
    return _qwen2_5(
        name="tiny_qwen2_5_7b",
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=224,
        intermediate_size=512,
        num_layers=4,
        num_heads=7,
        num_kv_heads=1,
        head_dim=32,
        tie_embeddings=False,
        max_position_embeddings=2048,
    )


def tiny_qwen2_5_14b() -> ModelConfig:
    """CPU stand-in for Qwen2.5-14B: untied, q/k/v bias, GQA 5:1; 4,141,632 parameters."""
    return _qwen2_5(
        name="tiny_qwen2_5_14b",
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=320,
        intermediate_size=768,
        num_layers=4,
        num_heads=10,
        num_kv_heads=2,
        head_dim=32,
        tie_embeddings=False,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    )


def tiny_tinyllama_1_1b() -> ModelConfig:
    """CPU stand-in for TinyLlama-1.1B: untied, no bias, GQA 8:1; 1,115,776 parameters."""
    return ModelConfig(
        name="tiny_tinyllama_1_1b",
        arch="llama",
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_layers=6,
        num_heads=8,
        num_kv_heads=1,
        head_dim=16,
        qkv_bias=False,
        tie_embeddings=False,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    fn.__name__: fn
    for fn in (
        qwen2_5_0_5b,
        qwen2_5_1_5b,
        qwen2_5_3b,
        qwen2_5_7b,
        qwen2_5_14b,
        tinyllama_1_1b,
        small_125m,
        tiny_qwen2_5_3b,
        tiny_qwen2_5_7b,
        tiny_qwen2_5_14b,
        tiny_tinyllama_1_1b,
    )
}

TINY_PRESETS = tuple(name for name in PRESETS if name.startswith("tiny_"))


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Returns the preset called ``name``, with any field replaced by ``overrides``.

    Example: ``get_config("tiny_qwen2_5_3b", dtype=jnp.bfloat16)``.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known: {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name](), **overrides)
