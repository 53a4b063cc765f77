"""Hugging Face checkpoints: load ``config.json`` + safetensors into a ``Decoder``, and export back.

Supported architectures: ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) and ``LlamaForCausalLM`` (LLaMA-2
layout, TinyLlama). A checkpoint directory holds ``config.json`` and either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.

Parameter paths map onto tensor names one to one because the modules use the Hugging Face
attribute names (see ``models.decoder``)::

    embed_tokens/embedding                  model.embed_tokens.weight                 [V, D]
    layers/i/self_attn/q_proj/kernel        model.layers.i.self_attn.q_proj.weight    [N*H, D] (ᵀ)
    layers/i/self_attn/q_proj/bias          model.layers.i.self_attn.q_proj.bias      [N*H]
    layers/i/mlp/gate_proj/kernel           model.layers.i.mlp.gate_proj.weight       [F, D]   (ᵀ)
    layers/i/input_layernorm/scale          model.layers.i.input_layernorm.weight     [D]
    norm/scale                              model.norm.weight                         [D]
    lm_head/kernel                          lm_head.weight                            [V, D]   (ᵀ)

Flax kernels are ``[in, out]`` and PyTorch weights ``[out, in]``: kernels are transposed both ways.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lbw.models import layout
from lbw.models.config import ModelConfig
from lbw.models.decoder import Decoder
from lbw.models.lora import has_lora, merge_lora

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Buffers some older checkpoints store; they are recomputed, never loaded.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def config_from_hf(
    hf_config: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=None, name: str = "hf"
) -> ModelConfig:
    """Translates a Hugging Face ``config.json`` (as a dict) into a :class:`ModelConfig`.

    Raises:
      ValueError: for an architecture or an option this decoder does not implement.
    """
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture: model_type={model_type!r}, architectures={architectures}. "
            f"Supported: {sorted(_ARCHITECTURES.values())} (model_type 'qwen2' or 'llama')."
        )
    arch = model_type

    def unsupported(option: str):
        return ValueError(f"Unsupported {arch} option in config.json: {option}.")

    if hf_config.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf_config['hidden_act']!r} (only 'silu')")
    if arch == "llama" and hf_config.get("attention_bias", False):
        raise unsupported("attention_bias=true (adds an o_proj bias)")
    if arch == "llama" and hf_config.get("mlp_bias", False):
        raise unsupported("mlp_bias=true")
    if hf_config.get("use_sliding_window", False):
        raise unsupported("use_sliding_window=true")
    if "sliding_attention" in (hf_config.get("layer_types") or []):
        raise unsupported("sliding-window layers")

    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise unsupported(f"rope_type={rope_type!r} (only plain RoPE)")
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))

    num_heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads
    return ModelConfig(
        name=name,
        arch=arch,
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        qkv_bias=arch == "qwen2",
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf_config.get("max_position_embeddings", 32_768),
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
    )


def config_to_hf(config: ModelConfig, *, dtype=None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` (as a dict) of a :class:`ModelConfig`.

    Raises:
      ValueError: for a configuration the Hugging Face architecture cannot express.
    """
    if config.arch == "qwen2" and not config.qkv_bias:
        raise ValueError(
            "Qwen2ForCausalLM always has q/k/v bias; set qkv_bias=True or arch='llama'."
        )
    if config.arch == "llama" and config.qkv_bias:
        raise ValueError("LlamaForCausalLM has no q/k/v-only bias; use arch='qwen2'.")
    dtype_name = jnp.dtype(config.param_dtype if dtype is None else dtype).name
    hf_config = {
        "architectures": [_ARCHITECTURES[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": dtype_name,
    }
    if config.arch == "qwen2":
        hf_config["use_sliding_window"] = False
    else:
        hf_config["attention_bias"] = False
        hf_config["mlp_bias"] = False
    return hf_config


def hf_weight_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """Maps an NNX parameter path to ``(Hugging Face tensor name, transpose?)``.

    >>> hf_weight_name(("layers", 3, "self_attn", "q_proj", "kernel"))
    ('model.layers.3.self_attn.q_proj.weight', True)
    """
    *modules, leaf = (str(part) for part in path)
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"No Hugging Face tensor for parameter {'/'.join(map(str, path))}.")
    prefix = "" if modules[0] == "lm_head" else "model."
    return f"{prefix}{'.'.join(modules)}.{_LEAF_TO_HF[leaf]}", leaf == "kernel"


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from the shard index or the single weights file."""
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"Shards listed in {index} are missing: {missing}.")
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory} (found: {found}). "
        "Only safetensors checkpoints are supported."
    )


def load_pretrained(
    path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, scan_layers: bool = False
) -> Decoder:
    """Builds a :class:`Decoder` from a Hugging Face checkpoint directory.

    The model is built abstractly (``nnx.eval_shape``) and each parameter is read straight from
    the safetensors files, so no random initialization happens.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or sharded safetensors
        with ``model.safetensors.index.json``.
      dtype: compute dtype of the model.
      param_dtype: storage dtype of the parameters (default: ``dtype``); checkpoint tensors are
        cast to it.
      scan_layers: return the model in the scanned layout (see :mod:`models.layout`).

    Returns:
      The loaded model.

    Raises:
      FileNotFoundError: when ``config.json`` or the weights are missing.
      ValueError: for an unsupported architecture, or tensors missing, unexpected or misshapen.
    """
    from safetensors import safe_open

    directory = Path(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}.")
    config = config_from_hf(
        json.loads(config_file.read_text()),
        dtype=dtype,
        param_dtype=param_dtype,
        name=directory.name,
    )
    files = _weight_files(directory)

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    wanted = {}  # hf name → (variable, transpose)
    for var_path, variable in nnx.to_flat_state(state):
        name, transpose = hf_weight_name(var_path)
        wanted[name] = (variable, transpose)

    missing = sorted(set(wanted) - set(files))
    if missing:
        raise ValueError(
            f"Checkpoint {directory} lacks {len(missing)} tensors, e.g. {missing[:5]}."
        )
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(
        name
        for name in set(files) - set(wanted)
        if name not in ignorable and not _IGNORED.match(name)
    )
    if unexpected:
        raise ValueError(
            f"Checkpoint {directory} has {len(unexpected)} tensors this {config.arch} "
            f"decoder does not use, e.g. {unexpected[:5]}."
        )

    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                variable, transpose = wanted[name]
                array = f.get_tensor(name)
                if transpose:
                    array = array.T
                if array.shape != variable.shape:
                    raise ValueError(
                        f"Tensor {name} has shape {array.shape}"
                        f"{' after transposing' if transpose else ''}; the config implies "
                        f"{variable.shape}."
                    )
                variable.set_value(jnp.asarray(array, dtype=variable.dtype))
    model = nnx.merge(graphdef, state)
    return layout.scan_layers(model) if scan_layers else model


def _parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"``, ``"500MiB"``, ``"200KB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot read a size from {size!r}; use e.g. 5GB, 500MiB or 200000.")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * units.get(unit, 1))


def save_pretrained(
    model: Decoder,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Writes ``model`` as a Hugging Face checkpoint that ``transformers`` can load.

    LoRA adapters, if any, are merged into the weights of a copy first; ``model`` is unchanged.
    Checkpoints larger than ``max_shard_size`` are split into
    ``model-0000i-of-0000n.safetensors`` shards with a ``model.safetensors.index.json``.

    Args:
      model: the decoder to export.
      path: output directory (created if needed).
      dtype: dtype of the written tensors (default: the model's ``param_dtype``).
      max_shard_size: largest shard, in bytes or as a string such as ``"5GB"``.
    """
    from safetensors.numpy import save_file

    if has_lora(model):
        model = merge_lora(nnx.clone(model))
    if model.config.scan_layers:  # Hugging Face names one tensor per layer.
        model = layout.unscan_layers(model)
    config = model.config
    hf_config = config_to_hf(config, dtype=dtype)
    out_dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
    limit = _parse_size(max_shard_size)

    tensors = {}
    for var_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_weight_name(var_path)
        array = np.asarray(jax.device_get(variable[...]).astype(out_dtype))
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)

    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensors[name]
        shard_bytes += size

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    metadata = {"format": "pt"}  # transformers reads safetensors files marked as PyTorch.
    if len(shards) == 1:
        (directory / WEIGHTS_INDEX_NAME).unlink(missing_ok=True)  # A stale index would win.
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
