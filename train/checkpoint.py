"""Orbax checkpoints of a run: trainable params, optimizer state, data position, RNG, config.

Each checkpoint is a step directory written by ``orbax.checkpoint.CheckpointManager``: orbax
writes it under a temporary name and renames it when complete, so a run killed mid-save leaves
no half-written checkpoint behind (the temporary is cleaned up at the next start). The last
``keep`` checkpoints are kept.

A checkpoint holds two items:

* ``state``: ``{"params": ..., "optimizer": ...}``, the trainable parameters (the LoRA
  adapters only, for a LoRA run; the frozen base weights are rebuilt from the config and seed)
  and the ``nnx.Optimizer`` state (step counter and optax state, governance state included);
* ``meta``: JSON with the step, the data stream state (position and RNG), the elapsed wall time,
  the config and a CRC-32 of every array of ``state``, checked on restore, so that a corrupted
  file is reported instead of silently resuming from wrong numbers.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored (unreadable, corrupted, or not there)."""


def _host(x: Any) -> np.ndarray:
    """The whole value of ``x``; a sharded array spanning several processes is gathered."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def fingerprint(tree: Any) -> list[int]:
    """CRC-32 of the bytes of every array leaf of ``tree``, in leaf order."""
    leaves = [_host(x) for x in jax.tree.leaves(tree)]
    return [zlib.crc32(np.ascontiguousarray(x).tobytes()) for x in leaves]


def _drop_empty(tree: Any) -> Any:
    """``tree`` with its zero-size arrays (SGG keeps them for tensors it never scales) replaced
    by ``None``: Orbax cannot save them, and they hold no values."""
    return jax.tree.map(lambda x: None if np.size(x) == 0 else x, tree)


def _empty_like(x: Any) -> Any:
    value = np.zeros(np.shape(x), x.dtype)
    sharding = getattr(x, "sharding", None)
    return value if sharding is None else jax.device_put(value, sharding)


def _fill_empty(restored: Any, abstract: Any) -> Any:
    """The inverse of :func:`_drop_empty`: ``restored`` in the structure of ``abstract``."""
    leaves, treedef = jax.tree.flatten(abstract)
    values = jax.tree.leaves(restored, is_leaf=lambda x: x is None)
    filled = [_empty_like(a) if np.size(a) == 0 else v for a, v in zip(leaves, values, strict=True)]
    return jax.tree.unflatten(treedef, filled)


class Checkpointer:
    """Saves and restores run checkpoints in ``directory``.

    Args:
      directory: where the step directories go (created if missing).
      keep: how many of the latest checkpoints to keep.
      every: the save interval in steps (``save`` is called by the loop on those steps and
        at the end of the run).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as the checkpoint of ``step``;
        returns once it is on disk."""
        meta = {**meta, "step": step, "fingerprint": fingerprint(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_drop_empty(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint of ``step`` into the structure of ``abstract_state``.

        Raises:
          CheckpointError: if there is no such checkpoint, or it cannot be read, or its arrays
            do not match their saved CRC-32; the message names the step, the directory and the
            other steps available.
        """
        steps = self.steps()
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint for step {step} in {self.directory}; available: {steps or 'none'}."
            )
        others = [s for s in steps if s < step]
        hint = (
            f" Earlier checkpoints: {others}; resume from one with --resume --resume-step "
            f"{others[-1]} (later checkpoints are then discarded)."
            if others
            else " There is no earlier checkpoint."
        )
        # Arrays of abstract_state are restored with their shardings (a checkpoint saved on one
        # mesh restores onto another).
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_drop_empty(abstract)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            state = _fill_empty(restored["state"], abstract_state)
            meta = dict(restored["meta"])
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files.
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} is corrupted or unreadable "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]}).{hint}"
            ) from e
        if meta.get("fingerprint") != fingerprint(state):
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} is corrupted: its arrays do "
                f"not match the checksums saved with them.{hint}"
            )
        return state, meta

    def discard_after(self, step: int) -> None:
        """Deletes every checkpoint later than ``step`` (before resuming from ``step``)."""
        for s in self.steps():
            if s > step:
                self.manager.delete(s)

    def close(self) -> None:
        self.manager.close()
