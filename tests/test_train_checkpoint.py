"""Checkpoint checksums: summed per shard, so no array is gathered and any mesh verifies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint
from train.checkpoint import block_checksum, checksums


def _array(dtype) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, 4, 3)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8, np.bool_])
def test_shard_sums_add_up_to_the_whole_array_for_any_split(dtype):
    x = _array(dtype)
    whole = block_checksum(x.shape, (0, 0, 0), x)
    # Two "processes" own the rows 0:2 and 2:6; the second also splits its rows by columns.
    splits = [
        [((0, 0, 0), x[:2]), ((2, 0, 0), x[2:])],
        [((0, 0, 0), x[:2]), ((2, 0, 0), x[2:, :1]), ((2, 1, 0), x[2:, 1:])],
        [((0, 0, 0), x[:, :, :2]), ((0, 0, 2), x[:, :, 2:])],
    ]
    for blocks in splits:
        assert sum(block_checksum(x.shape, start, b) for start, b in blocks) % 2**64 == whole


def test_a_changed_or_moved_element_changes_the_checksum():
    x = _array(np.float32)
    whole = block_checksum(x.shape, (0, 0, 0), x)
    flipped = x.copy()
    flipped.view(np.uint32)[3, 2, 1] ^= 1  # One bit.
    swapped = x.copy()
    swapped[0, 0, 0], swapped[5, 3, 2] = x[5, 3, 2], x[0, 0, 0]
    for y in (flipped, swapped):
        assert block_checksum(y.shape, (0, 0, 0), y) != whole


def test_checksums_of_a_state():
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "empty": jnp.zeros((0, 4)), "step": jnp.int32(7)}
    sums = checksums(tree)
    assert len(sums) == 3 and all(len(s) == 16 for s in sums)
    assert sums[0] == "0" * 16  # Leaves in key order: "empty" first.
    assert sums == checksums(tree)
    assert checksums({**tree, "step": jnp.int32(8)}) != sums


def test_processes_exchange_only_per_leaf_sums(monkeypatch):
    """Two processes, each owning half of the rows: only one (hi, lo) pair per leaf travels."""
    x = _array(np.float32)
    halves = [block_checksum(x.shape, (0, 0, 0), x[:2]), block_checksum(x.shape, (2, 0, 0), x[2:])]
    sent = []

    def allgather(words):
        sent.append(np.asarray(words))
        other = np.array([[halves[1] >> 32, halves[1] & 0xFFFFFFFF]], np.uint32)
        return np.stack([words, other])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(checkpoint, "_local_checksum", lambda leaf: halves[0])
    monkeypatch.setattr(checkpoint.multihost_utils, "process_allgather", allgather)
    whole = block_checksum(x.shape, (0, 0, 0), x)
    assert checksums({"w": jnp.asarray(x)}) == [f"{whole:016x}"]
    assert [w.shape for w in sent] == [(1, 2)]
