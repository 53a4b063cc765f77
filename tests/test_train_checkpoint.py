"""Checkpoint checksums: summed per shard, so no array is gathered and any mesh verifies."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbw.train import checkpoint
from lbw.train.checkpoint import block_checksum, checksums


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


def _masked_state():
    """SGG over a guard with the reference policy: MaskedNode for the bias's cluster fields and
    for the unsensed per-tensor signals."""
    import optax

    import lbw_optax

    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = lbw_optax.sgg(lbw_optax.guard(optax.adam(1e-2), policy="reference"), recluster_every=1)
    state = tx.init(params)
    grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    _, state = tx.update(grads, state, params, value=jnp.float32(1.0))
    return state


def test_a_state_with_masked_nodes_round_trips(tmp_path):
    import optax

    state = _masked_state()
    assert isinstance(state.cluster_ids["b"], optax.MaskedNode)
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, every=1)
    try:
        saver.save(1, state, {"note": "x"})
        restored, meta = saver.restore(1, state)
    finally:
        saver.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert meta["note"] == "x"


def test_a_checkpoint_saved_with_zero_size_placeholders_still_restores(tmp_path):
    """Before MaskedNode, those places held zero-size arrays: saved as nothing (None), summed."""
    import optax
    import orbax.checkpoint as ocp

    state = _masked_state()
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    old = jax.tree.map(lambda x: jnp.zeros([0]) if is_masked(x) else x, state, is_leaf=is_masked)
    on_disk = jax.tree.map(lambda x: None if x.size == 0 else x, old)
    meta = {"step": 3, "checksums": checksums(old)}
    assert len(meta["checksums"]) > len(jax.tree.leaves(state))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "meta")) as manager:
        manager.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(on_disk), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, every=1)
    try:
        restored, _ = saver.restore(3, state)
    finally:
        saver.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    meta["checksums"][-1] = "1" * 16  # A changed array still fails the check.
    assert not checkpoint._same_sums(meta["checksums"], checksums(state), "0" * 16)


class _Before(NamedTuple):
    count: jax.Array
    mu: dict


class _After(NamedTuple):  # A later version: one more field, holding no arrays.
    count: jax.Array
    mu: dict
    margin: Any = None


def test_a_state_saved_before_a_field_without_arrays_was_added_still_restores(tmp_path):
    import optax

    before = {"opt": _Before(jnp.int32(7), {"w": jnp.arange(6.0).reshape(2, 3)})}
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, every=1)
    try:
        saver.save(7, before, {})
        after = {"opt": _After(jnp.int32(0), {"w": jnp.zeros((2, 3))}, optax.MaskedNode())}
        restored, _ = saver.restore(7, after)
        assert isinstance(restored["opt"], _After)
        assert isinstance(restored["opt"].margin, optax.MaskedNode)
        assert int(restored["opt"].count) == 7
        np.testing.assert_array_equal(restored["opt"].mu["w"], before["opt"].mu["w"])
        # A field with arrays that the checkpoint lacks starts from the target's value...
        extra = {"opt": _After(jnp.int32(0), {"w": jnp.zeros((2, 3))}, jnp.full(2, 5.0))}
        restored, meta = saver.restore(7, extra)
        assert meta["filled"] == ["['opt'].margin"] and int(restored["opt"].count) == 7
        np.testing.assert_array_equal(restored["opt"].margin, [5.0, 5.0])
        # ...and is an error naming where when the target has only its shape.
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), extra)
        with pytest.raises(checkpoint.CheckpointError, match=r"no array at \['opt'\]\.margin"):
            saver.restore(7, shapes)
        wrong = {"opt": _After(jnp.int32(0), {"w": jnp.zeros((3, 2))}, optax.MaskedNode())}
        with pytest.raises(checkpoint.CheckpointError, match=r"float32\[2, 3\], expected"):
            saver.restore(7, wrong)
    finally:
        saver.close()
