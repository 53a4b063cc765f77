"""The training loop: data, evaluation, telemetry, checkpoints and resume, and the CLI.

>>> from train import TrainConfig, train
>>> summary = train(TrainConfig(steps=50, out_dir="runs/demo"))  # doctest: +SKIP

The names below are imported when first used (PEP 562), so that ``lbw-train`` starts, and
handles Ctrl-C, before JAX is imported.
"""

import importlib

# First: on a base install (no [train] extra) it exits with one line saying what to install.
from train import _extra  # noqa: F401

# Public name -> the module that defines it.
_EXPORTS = {
    "Batches": "train.data",
    "CheckpointError": "train.checkpoint",
    "Checkpointer": "train.checkpoint",
    "DataError": "train.data",
    "DataPosition": "train.data",
    "DataStream": "train.data",
    "FaultConfig": "train.config",
    "Interrupted": "train.loop",
    "NonFiniteError": "train.loop",
    "TrainConfig": "train.config",
    "UserError": "train.config",
    "available_optimizers": "train.optimizers",
    "build_model": "train.loop",
    "build_optimizer": "train.optimizers",
    "eval_set": "train.data",
    "evaluate": "train.loop",
    "is_guarded": "train.optimizers",
    "learning_rate_schedule": "train.optimizers",
    "load_text": "train.data",
    "make_train_step": "train.loop",
    "register_optimizer": "train.optimizers",
    "tokenize": "train.data",
    "train": "train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
