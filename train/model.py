"""The model a run trains: its config (a preset, or the architecture of an ``init_from``
checkpoint), its weights and its LoRA adapters."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from flax import nnx

from lbw import models
from lbw.train.config import TrainConfig, UserError

# Fields of a model config that a checkpoint's weights do not fix: a label, the numerics it is
# loaded in, and the context length it was trained for (RoPE has no table of positions).
# The layout fields too: a checkpoint loads into either layout, with or without remat.
_NOT_ARCHITECTURE = frozenset(
    {"name", "dtype", "param_dtype", "max_position_embeddings", "scan_layers", "remat"}
)


def architecture_differences(
    checkpoint: models.ModelConfig, model: models.ModelConfig
) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's, model's)}`` for the architecture fields that differ."""
    return {
        f.name: (getattr(checkpoint, f.name), getattr(model, f.name))
        for f in dataclasses.fields(model)
        if f.name not in _NOT_ARCHITECTURE and getattr(checkpoint, f.name) != getattr(model, f.name)
    }


def differences_text(differs: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in differs.items())


def model_config(config: TrainConfig) -> models.ModelConfig:
    """The model a run trains: the ``model`` preset with its layout flags and
    ``model_overrides``; with ``init_from``, the architecture of the checkpoint's
    ``config.json`` (with the same), or the preset when one is named and it agrees with the
    checkpoint.

    Raises:
      FileNotFoundError: if ``init_from`` holds no ``config.json``.
      ValueError: an unknown preset or field; a named preset whose architecture differs from
        the checkpoint's (a :class:`~train.config.UserError` naming the fields and the fix).
    """
    # The layout flags, then the overrides (which may name them too).
    overrides = {"scan_layers": config.scan_layers, "remat": config.remat}
    overrides |= config.model_overrides
    if config.init_from is None:
        return models.get_config(config.model, **overrides)
    path = Path(config.init_from) / models.hf.CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {config.init_from}: no config.json in it.")
    checkpoint = models.config_from_hf(json.loads(path.read_text()), name=path.parent.name)
    if config.model is None:
        return dataclasses.replace(checkpoint, **overrides)
    preset = models.get_config(config.model, **overrides)
    differs = architecture_differences(checkpoint, preset)
    if differs:
        raise UserError(
            f"--model {config.model} does not match the config.json of --init-from "
            f"{config.init_from} ({differences_text(differs)}); drop --model to train the "
            "checkpoint's architecture."
        )
    return preset


def build_model(config: TrainConfig, vocab_size: int) -> tuple[models.Decoder, Any]:
    """The decoder of ``config`` (:func:`model_config`; LoRA adapters added when
    ``lora_rank > 0``) and the filter of its trainable variables.

    Raises:
      ValueError: if the tokenizer's ``vocab_size`` does not fit the model's vocabulary.
    """
    spec = model_config(config)
    if vocab_size > spec.vocab_size:
        raise ValueError(
            f"The tokenizer has {vocab_size} ids but model {spec.name!r} only "
            f"{spec.vocab_size} embeddings."
        )
    model = models.Decoder(spec, rngs=nnx.Rngs(config.seed))
    if config.init_from is not None:
        load_weights(model, config.init_from)
    if config.lora_rank == 0:
        return model, nnx.Param
    models.add_lora(
        model,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        targets=config.lora_targets,
        rngs=nnx.Rngs(config.seed + 1),
    )
    return model, models.LORA_PARAMS


def load_weights(model: models.Decoder, path: str | os.PathLike) -> None:
    """Replaces the parameters of ``model`` by those of the Hugging Face-format checkpoint at
    ``path`` (``models.save_pretrained``'s layout).

    Raises:
      FileNotFoundError: if ``path`` holds no ``config.json`` or weights.
      ValueError: if the checkpoint's architecture differs from ``model``'s (the fields that
        differ are named).
    """
    mine = model.config
    base = models.load_pretrained(
        path, dtype=mine.dtype, param_dtype=mine.param_dtype, scan_layers=mine.scan_layers
    )
    differs = architecture_differences(base.config, mine)
    if differs:
        raise ValueError(
            f"init_from {path}: the checkpoint does not fit model {mine.name!r}: "
            f"{differences_text(differs)}."
        )
    nnx.update(model, nnx.state(base, nnx.Param))
