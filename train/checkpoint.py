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
  the config and a 64-bit checksum of every array of ``state`` (:func:`checksums`), checked on
  restore, so that a corrupted file is reported instead of silently resuming from wrong numbers.

The checksum of an array is a sum, modulo 2**64, of a hash of each element's bits and global
position. Each process sums over the shards it owns (one replica of each), and only those small
sums travel between processes: no array is gathered, and a checkpoint saved on one mesh verifies
on another.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lbw.train.config import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be restored (unreadable, corrupted, or not there)."""


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a finished step directory (looked at without Orbax, so
    nothing is created; Orbax names an unfinished one ``<step>.orbax-checkpoint-tmp-*``)."""
    path = Path(directory)
    return path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 20  # Elements hashed at a time, to bound the host memory of a large shard.


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def block_checksum(shape: tuple[int, ...], start: tuple[int, ...], block: np.ndarray) -> int:
    """Sum modulo 2**64 of ``mix(mix(position) ^ bits)`` over the elements of ``block``, the
    block of an array of global ``shape`` that starts at index ``start``. Sums of disjoint
    blocks that cover the array add up (modulo 2**64) to the checksum of the whole array."""
    if np.ndim(block) == 0:
        block, shape, start = np.reshape(block, 1), (1,), (0,)
    block = np.ascontiguousarray(block)
    if block.dtype.itemsize not in (1, 2, 4, 8):
        raise TypeError(f"no checksum for arrays of dtype {block.dtype}")
    if block.size == 0:
        return 0
    rows = max(1, _CHUNK // max(1, block[0].size))
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for r in range(0, block.shape[0], rows):
            chunk = block[r : r + rows]
            bits = chunk.view(f"u{chunk.dtype.itemsize}").astype(np.uint64)
            position = np.zeros((), np.uint64)
            stride = 1
            for d in reversed(range(chunk.ndim)):
                first = start[d] + (r if d == 0 else 0)
                axis = np.arange(first, first + chunk.shape[d], dtype=np.uint64)
                position = position + (axis * np.uint64(stride)).reshape(
                    (-1,) + (1,) * (chunk.ndim - 1 - d)
                )
                stride *= shape[d]
            hashed = _mix64(_mix64(position * _GOLDEN) ^ bits)
            total = total + np.sum(hashed, dtype=np.uint64)
    return int(total)


def _local_checksum(x: Any) -> int:
    """The sum of :func:`block_checksum` over the shards of ``x`` this process owns (replica 0
    of each shard only, so that every element counts once over all processes)."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return block_checksum(x.shape, (0,) * x.ndim, x) if jax.process_index() == 0 else 0
    total = 0
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = tuple(s.indices(n)[0] for s, n in zip(shard.index, x.shape, strict=True))
        total += block_checksum(x.shape, start, np.asarray(shard.data))
    return total % 2**64


def checksums(tree: Any) -> list[str]:
    """The 64-bit checksum of every array leaf of ``tree``, in leaf order, as hex strings.

    Each process hashes only the shards it owns; with several processes the per-leaf sums (two
    uint32 words each) are the only values exchanged. The result does not depend on how the
    arrays are sharded.
    """
    sums = [_local_checksum(x) for x in jax.tree.leaves(tree)]
    if jax.process_count() > 1:
        words = np.array([[s >> 32, s & 0xFFFFFFFF] for s in sums], np.uint32).reshape(-1, 2)
        gathered = np.asarray(multihost_utils.process_allgather(words))  # [processes, leaves, 2]
        sums = [
            sum((int(hi) << 32) | int(lo) for hi, lo in gathered[:, i]) % 2**64
            for i in range(len(sums))
        ]
    return [f"{s:016x}" for s in sums]


def _legacy_fingerprint(tree: Any) -> list[int]:
    """CRC-32 of every whole array (what checkpoints saved before :func:`checksums` hold)."""

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return [zlib.crc32(np.ascontiguousarray(host(x)).tobytes()) for x in jax.tree.leaves(tree)]


def _same_sums(saved: list | None, restored: list, empty: Any) -> bool:
    """Whether the saved per-leaf sums match the restored state's. Checkpoints saved before
    SGG's skipped tensors and unsensed guard signals became ``optax.MaskedNode`` hold zero-size
    arrays there (stored as nothing, summed as ``empty``): those sums are left out."""
    if saved is None or len(saved) == len(restored):
        return saved == restored
    return [s for s in saved if s != empty] == [s for s in restored if s != empty]


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey.
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _lookup(saved: Any, path: tuple[Any, ...]) -> Any:
    """The array at ``path`` in a tree restored without a target (nested dicts and lists), or
    ``None`` when there is none."""
    node = saved
    for key in path:
        name = _key_name(key)
        if isinstance(node, dict) and name in node:
            node = node[name]
        elif isinstance(node, list | tuple) and name.isdigit() and int(name) < len(node):
            node = node[int(name)]
        else:
            return None
    return node


def fit_saved_tree(saved: Any, target: Any) -> tuple[Any, list[str]]:
    """Places the arrays of ``saved`` (a checkpoint restored without a target) into the
    structure of ``target``, matching them by their path of field names and keys.

    A state saved by an earlier version whose structure differs only by nodes without arrays
    (a field added as :class:`optax.MaskedNode`, say) restores this way, leaf for leaf. An
    array the checkpoint does not have is taken from ``target`` when ``target`` holds a
    concrete array there (a freshly initialised state: a state field added since starts from
    its initial value), and its path is returned.

    Returns:
      ``(state, filled)``: the restored state and the paths of the arrays taken from
      ``target``.

    Raises:
      ValueError: when an array is missing from ``saved`` and ``target`` has only its shape,
        or differs in shape or dtype; the message names the first such path.
    """
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves, filled = [], []
    for path, want in paths_and_leaves:
        got = _lookup(saved, path)
        where = jax.tree_util.keystr(path)
        if got is None or not hasattr(got, "shape"):
            if not isinstance(want, jax.Array):
                raise ValueError(f"the checkpoint has no array at {where}")
            got = want
            filled.append(where)
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(
                f"the checkpoint's array at {where} is {got.dtype}{list(got.shape)}, "
                f"expected {want.dtype}{list(want.shape)}"
            )
        sharding = getattr(want, "sharding", None)
        leaves.append(jax.device_put(got, sharding) if sharding is not None else got)
    return jax.tree_util.tree_unflatten(treedef, leaves), filled


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
        # Orbax removes unfinished checkpoints of an earlier run in a background thread that
        # close() does not wait for; a process that exits soon after (a refused resume) would
        # end that thread at interpreter shutdown, with a traceback. Wait for it here.
        wait_for_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as the checkpoint of ``step``;
        returns once it is on disk."""
        meta = {**meta, "step": step, "checksums": checksums(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint of ``step`` into the structure of ``abstract_state``.

        A checkpoint of an earlier version restores when it holds every array of
        ``abstract_state`` or ``abstract_state`` is concrete (:func:`fit_saved_tree`); the
        paths of the arrays it lacked, which keep ``abstract_state``'s values, are in the
        returned meta's ``"filled"`` (empty otherwise).

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
        filled: list[str] = []
        try:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                state = restored["state"]
            except ValueError as mismatch:
                # Saved by an earlier version whose state tree had another structure (e.g. one
                # field fewer that holds no arrays): read it as saved and match arrays by path.
                if "structure" not in str(mismatch):
                    raise
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                    ),
                )
                state, filled = fit_saved_tree(restored["state"], abstract_state)
            meta = dict(restored["meta"])
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files.
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} is corrupted or unreadable "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]}).{hint}"
            ) from e
        # The checksums cover the arrays the checkpoint holds, not those filled in above.
        saved_part = jax.tree_util.tree_map_with_path(
            lambda path, x: None if jax.tree_util.keystr(path) in filled else x, state
        )
        if "checksums" in meta:
            intact = _same_sums(meta["checksums"], checksums(saved_part), "0" * 16)
        else:  # Saved before per-shard checksums.
            intact = _same_sums(meta.get("fingerprint"), _legacy_fingerprint(saved_part), 0)
        if not intact:
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} is corrupted: its arrays do "
                f"not match the checksums saved with them.{hint}"
            )
        meta["filled"] = filled
        return state, meta

    def discard_after(self, step: int) -> None:
        """Deletes every checkpoint later than ``step`` (before resuming from ``step``)."""
        for s in self.steps():
            if s > step:
                self.manager.delete(s)

    def close(self) -> None:
        self.manager.close()
