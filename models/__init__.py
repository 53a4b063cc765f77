"""Qwen2.5- and TinyLlama-style decoders in Flax NNX, with LoRA and Hugging Face weights.

>>> from flax import nnx
>>> from lbw import models
>>> model = models.Decoder(models.tiny_qwen2_5_3b(), rngs=nnx.Rngs(0))
>>> models.count_params(models.qwen2_5_7b())
7615616512
"""

from lbw.models.config import (
    PRESETS,
    TINY_PRESETS,
    ModelConfig,
    get_config,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen2_5_14b,
    small_125m,
    tiny_qwen2_5_3b,
    tiny_qwen2_5_7b,
    tiny_qwen2_5_14b,
    tiny_tinyllama_1_1b,
    tinyllama_1_1b,
)
from lbw.models.decoder import MLP, Attention, Block, Decoder, RMSNorm, apply_rope, count_params
from lbw.models.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained
from lbw.models.layout import scan_layers, stacked_layers, unscan_layers
from lbw.models.lora import (
    ALL_TARGETS,
    ATTENTION_TARGETS,
    BASE_PARAMS,
    LORA_PARAMS,
    MLP_TARGETS,
    ScaledLoRA,
    add_lora,
    has_lora,
    merge_lora,
)
from lbw.models.loss import cross_entropy_loss
from lbw.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ALL_TARGETS",
    "ATTENTION_TARGETS",
    "BASE_PARAMS",
    "LORA_PARAMS",
    "MLP",
    "MLP_TARGETS",
    "PRESETS",
    "TINY_PRESETS",
    "Attention",
    "Block",
    "ByteTokenizer",
    "Decoder",
    "HFTokenizer",
    "ModelConfig",
    "RMSNorm",
    "ScaledLoRA",
    "Tokenizer",
    "add_lora",
    "apply_rope",
    "config_from_hf",
    "config_to_hf",
    "count_params",
    "cross_entropy_loss",
    "get_config",
    "has_lora",
    "load_pretrained",
    "load_tokenizer",
    "merge_lora",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_3b",
    "qwen2_5_7b",
    "qwen2_5_14b",
    "save_pretrained",
    "scan_layers",
    "small_125m",
    "stacked_layers",
    "tiny_qwen2_5_3b",
    "tiny_qwen2_5_7b",
    "tiny_qwen2_5_14b",
    "tiny_tinyllama_1_1b",
    "tinyllama_1_1b",
    "unscan_layers",
]
