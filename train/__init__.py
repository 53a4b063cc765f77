"""The training loop: data, evaluation, telemetry, checkpoints and resume, and the CLI.

>>> from train import TrainConfig, train
>>> summary = train(TrainConfig(steps=50, out_dir="runs/demo"))  # doctest: +SKIP

The names below are imported when first used (PEP 562), so that ``lbw-train`` starts, and
handles Ctrl-C, before JAX is imported.
"""

import importlib

# First: on a base install (no [train] extra) it exits with one line saying what to install.
from lbw.train import _extra  # noqa: F401

# Public name -> the module that defines it.
_EXPORTS = {
    "Batches": "lbw.train.data",
    "CheckpointError": "lbw.train.checkpoint",
    "Checkpointer": "lbw.train.checkpoint",
    "DataError": "lbw.train.data",
    "DataPosition": "lbw.train.data",
    "DataStream": "lbw.train.data",
    "FaultConfig": "lbw.train.config",
    "Interrupted": "lbw.train.loop",
    "NonFiniteError": "lbw.train.loop",
    "OptimizerConfig": "lbw.train.config",
    "TrainConfig": "lbw.train.config",
    "UserError": "lbw.train.config",
    "available_optimizers": "lbw.train.optimizers",
    "build_model": "lbw.train.model",
    "build_optimizer": "lbw.train.optimizers",
    "eval_set": "lbw.train.data",
    "evaluate": "lbw.train.step",
    "is_guarded": "lbw.train.optimizers",
    "learning_rate_schedule": "lbw.train.optimizers",
    "load_text": "lbw.train.data",
    "make_optimizer": "lbw.train.step",
    "make_train_step": "lbw.train.step",
    "register_optimizer": "lbw.train.optimizers",
    "tokenize": "lbw.train.data",
    "train": "lbw.train.loop",
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
