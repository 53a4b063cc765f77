"""What a run trains and on what, built from its config before anything is written: the
names checked, the data read and batched, the model and its optimizer built and sharded."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from lbw import models
from lbw.train import sharding
from lbw.train.config import TrainConfig, UserError
from lbw.train.data import Batches, DataStream, eval_set, load_tokens
from lbw.train.model import build_model, model_config
from lbw.train.optimizers import check_optimizer
from lbw.train.step import make_optimizer


def check_config(config: TrainConfig) -> None:
    """Raises :class:`~train.config.UserError` for names the run cannot use: an unknown model
    preset or model field, an unknown optimizer, a bad mesh. Cheap: reads no data and builds
    nothing."""
    fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
    unknown = sorted(set(config.model_overrides) - fields)
    if unknown:
        raise UserError(
            f"--model-override: the model config has no field {', '.join(map(repr, unknown))}; "
            f"fields: {', '.join(sorted(fields))}."
        )
    try:
        shape = model_config(config)
        if config.scan_layers and config.lora_rank:
            raise ValueError(
                "--scan-layers and --lora-rank: LoRA adapters need the unrolled layout; drop "
                "--scan-layers"
            )
        check_optimizer(config.optimizer)
        sharding.parse_mesh(config.mesh)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    if config.seq_len > shape.max_position_embeddings:
        raise UserError(
            f"--seq-len {config.seq_len} is longer than model {shape.name!r} was made for "
            f"(max_position_embeddings {shape.max_position_embeddings}); use --seq-len "
            f"{shape.max_position_embeddings} or less, or raise the limit with "
            "--model-override max_position_embeddings=N."
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run trains and on what: built from the config, before anything is written."""

    model: models.Decoder
    optimizer: nnx.Optimizer
    wrt: Any  # The filter of the trainable variables.
    stream: DataStream
    eval_batches: np.ndarray  # [n, B, T+1]
    data: str  # The data's description.
    schedule: Any  # The learning rate schedule of a peak of 1 ...
    peak: float  # ... times this.
    mesh: jax.sharding.Mesh | None
    trainable: int  # Number of trainable parameters.


def build_setup(config: TrainConfig) -> Setup:
    """Reads and tokenizes the data, builds the model and its optimizer, and shards both over
    the config's mesh."""
    tokenizer = models.load_tokenizer(config.tokenizer)
    tokens = load_tokens(config, tokenizer)
    train_tokens, eval_tokens, description = tokens.train, tokens.eval, tokens.description
    batches = Batches(
        train_tokens,
        seq_len=config.seq_len,
        batch_size=config.batch_size * config.grad_accum,  # The micro-batches of one update.
        seed=config.seed,
    )
    stream = DataStream(batches, config.faults, vocab_size=tokens.vocab_size, seed=config.seed)
    eval_batches = eval_set(
        eval_tokens,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        num_batches=config.eval_batches,
    )

    model, wrt = build_model(config, tokens.vocab_size)
    optimizer, unit_schedule = make_optimizer(config, model, wrt)
    mesh = None
    if config.mesh:
        mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch(config.batch_size, mesh)
        nnx.update(model, sharding.shard(nnx.state(model), mesh))
        nnx.update(optimizer, sharding.shard(nnx.state(optimizer), mesh))
    return Setup(
        model=model,
        optimizer=optimizer,
        wrt=wrt,
        stream=stream,
        eval_batches=eval_batches,
        data=description,
        schedule=unit_schedule,
        peak=config.learning_rate if config.peak_lr_in_state else 1.0,
        mesh=mesh,
        trainable=sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))),
    )
