"""The training loop: data, evaluation, telemetry, checkpoints and resume, and the CLI.

>>> from train import TrainConfig, train
>>> summary = train(TrainConfig(steps=50, out_dir="runs/demo"))  # doctest: +SKIP
"""

from train import (
    # First: on a base install (no [train] extra) it exits with one line saying what to install.
    _extra,  # noqa: F401
    peers,  # noqa: F401  Registers zclip, skip-step, adagc and spam.
)
from train.checkpoint import Checkpointer, CheckpointError
from train.config import FaultConfig, TrainConfig, UserError
from train.data import Batches, DataError, DataPosition, DataStream, eval_set, load_text, tokenize
from train.loop import Interrupted, NonFiniteError, build_model, evaluate, make_train_step, train
from train.optimizers import (
    available_optimizers,
    build_optimizer,
    is_guarded,
    learning_rate_schedule,
    register_optimizer,
)

__all__ = [
    "Batches",
    "CheckpointError",
    "Checkpointer",
    "DataError",
    "DataPosition",
    "DataStream",
    "FaultConfig",
    "Interrupted",
    "NonFiniteError",
    "TrainConfig",
    "UserError",
    "available_optimizers",
    "build_model",
    "build_optimizer",
    "eval_set",
    "evaluate",
    "is_guarded",
    "learning_rate_schedule",
    "load_text",
    "make_train_step",
    "register_optimizer",
    "tokenize",
    "train",
]
