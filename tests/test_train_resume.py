"""Checkpoints and resume: a run killed with SIGKILL and resumed equals an uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from lbw.train import CheckpointError, train
from tests.train_helpers import (
    PYTHON,
    ROOT,
    TINY_FLAGS,
    cli_env,
    load_checkpoint,
    read_jsonl,
    tiny_config,
    train_losses,
)

STEPS = 60
FLAGS = [
    "--seq-len=32",
    "--batch-size=4",
    f"--steps={STEPS}",
    "--log-every=1",
    "--eval-every=20",
    "--eval-batches=2",
    "--checkpoint-every=10",
    "--optimizer=lbw",
    "--corrupt-start=15",  # The data RNG is in use on both sides of the kill.
    "--corrupt-steps=20",
    "--quiet",
    *TINY_FLAGS,
]


def _cli(out_dir, *extra) -> list[str]:
    return [PYTHON, "-m", "lbw.train.cli", *FLAGS, f"--out-dir={out_dir}", *extra]


def _run(args, env):
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _without_timing(record: dict) -> dict:
    timing = ("tokens_per_s", "step_time_s", "wall_time_s")
    return {k: v for k, v in record.items() if k not in timing}


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    env = cli_env(tmp_path / "jax-cache")
    _run(_cli(tmp_path / "ref"), env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = killed / "checkpoints" / "20"
    deadline = time.monotonic() + 240
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "checkpoint 20 never appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (killed / "summary.json").exists()  # Killed mid-run, not after it.

    _run(_cli(killed, "--resume"), env)

    ref_lines = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got_lines = read_jsonl(killed / "metrics.jsonl")
    # Every line once, in order, with the same values (timings aside).
    assert [(r["kind"], r["step"]) for r in got_lines] == [
        (r["kind"], r["step"]) for r in ref_lines
    ]
    assert [_without_timing(r) for r in got_lines] == [_without_timing(r) for r in ref_lines]
    ref_losses = train_losses(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert train_losses(killed / "metrics.jsonl") == ref_losses  # Exact float equality.

    config = tiny_config(tmp_path / "ref", optimizer="lbw", steps=STEPS)
    ref_state, ref_meta = load_checkpoint(config, STEPS)
    got_state, got_meta = load_checkpoint(dataclasses.replace(config, out_dir=str(killed)), STEPS)
    chex.assert_trees_all_equal(ref_state, got_state)  # Params and optimizer state, bitwise.
    assert ref_meta["data"] == got_meta["data"]


def _corrupt(step_dir: Path) -> None:
    for path in sorted((step_dir / "state").rglob("*")):
        if path.is_file() and path.stat().st_size > 0:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_corrupted_latest_checkpoint_errors_and_previous_resumes(tmp_path):
    config = tiny_config(tmp_path, steps=20, checkpoint_every=10, eval_every=10)
    train(config)
    reference = read_jsonl(tmp_path / "metrics.jsonl")
    _corrupt(tmp_path / "checkpoints" / "20")
    # As if killed after its last checkpoint: a resume of a completed run does nothing.
    (tmp_path / "summary.json").unlink()

    resumed = dataclasses.replace(config, resume=True)
    with pytest.raises(CheckpointError, match=r"step 20 .* corrupted") as e:
        train(resumed)
    assert "--resume-step 10" in str(e.value)

    summary = train(dataclasses.replace(config, resume=True, resume_step=10))
    assert summary["status"] == "completed"
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [_without_timing(r) for r in lines] == [_without_timing(r) for r in reference]
    assert (tmp_path / "checkpoints" / "20").exists()  # Rewritten by the resumed run.
    state, _ = load_checkpoint(config, 20)
    chex.assert_tree_all_finite(state)


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path):
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
    train(config)
    with pytest.raises(ValueError, match="learning_rate"):
        train(dataclasses.replace(config, resume=True, learning_rate=0.1))
    with pytest.raises(ValueError, match=r"already holds the results of a run \(checkpoints/"):
        train(config)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty", resume=True))
    with pytest.raises(CheckpointError, match="No checkpoint for step 3"):
        train(dataclasses.replace(config, resume=True, resume_step=3))
    assert np.isfinite(train_losses(tmp_path / "metrics.jsonl")[4])
