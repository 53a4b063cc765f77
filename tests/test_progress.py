"""Progress in logs: plain lines when stderr is not a terminal, for ``lbw-train`` and
``lbw-stress``; the final summary even with ``--quiet``."""

from __future__ import annotations

import json
import os
import time

import pytest

from lbw.train.cli import build_parser, main
from lbw.train.optimizers import available_optimizers
from lbw.train.progress import Throttle, describe, format_duration
from lbw.train.stress.runner import _Progress, running_runs, suite_line
from tests.train_helpers import TINY_FLAGS

FLAGS = ["--seq-len=32", "--batch-size=4", "--eval-batches=2", "--log-every=1", *TINY_FLAGS]


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 59.6, 252, 3599, 3720, 90000)] == [
        "0s",
        "42s",
        "1m00s",
        "4m12s",
        "59m59s",
        "1h02m",
        "25h00m",
    ]


def test_describe_a_telemetry_line():
    line = {
        "step": 120,
        "loss": 3.21014,
        "tokens_per_s": 11204.4,
        "step_time_s": 0.25,
        "telemetry": {"regime_name": "STABLE", "scale": 0.98123},
    }
    assert describe(line, 2000) == (
        "step 120/2000 (6%) loss 3.2101 tok/s 11,204 ETA 7m50s regime STABLE scale 0.981"
    )
    # No guard, a non-finite interval, the last step: no regime, "nan", no ETA.
    last = {"step": 10, "loss": None, "tokens_per_s": 5.0, "step_time_s": 1.0, "telemetry": {}}
    assert describe(last, 10) == "step 10/10 (100%) loss nan tok/s 5"


def test_throttle_prints_the_first_line_then_every_n_seconds():
    now = [0.0]
    throttle = Throttle(30.0, clock=lambda: now[0])
    seen = []
    for t in (0, 10, 29.9, 30, 45, 61, 100):
        now[0] = t
        seen.append(throttle.due())
    assert seen == [True, False, False, True, False, True, True]
    always = Throttle(0.0, clock=lambda: 5.0)
    assert always.due() and always.due()


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_plain_progress_lines_and_the_summary_with_or_without_quiet(tmp_path, capsys):
    """Under pytest stderr is not a terminal, as under a log file or nohup."""
    args = [*FLAGS, "--steps=3", "--optimizer=lbw", "--progress-every=0"]
    assert main([*args, f"--out-dir={tmp_path / 'a'}"]) == 0
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.startswith("lbw-train: step")]
    assert [x.split()[2] for x in lines] == ["1/3", "2/3", "3/3"], err
    assert all(" loss " in x and " regime " in x and " scale " in x for x in lines), lines
    assert "ETA" in lines[1] and "ETA" not in lines[2]
    assert json.loads(out)["status"] == "completed"

    assert list((tmp_path / "a").glob("events.out.tfevents.*"))  # TensorBoard by default.

    assert main([*args, f"--out-dir={tmp_path / 'b'}", "--quiet", "--no-tensorboard"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # No progress, no messages...
    assert json.loads(out)["step"] == 3  # ... but the result.
    assert not list((tmp_path / "b").glob("events.*"))


def test_optimizer_help_lists_the_choices():
    action = next(a for a in build_parser()._actions if a.dest == "optimizer")
    assert "available_optimizers" not in action.help
    listed = action.help.split("one of: ")[1].removesuffix(" (default: adamw)").split(", ")
    assert listed == available_optimizers()


def _metrics(run_dir, lines):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_stress_reads_the_runs_under_way(tmp_path):
    line = {"kind": "train", "step": 4, "loss": 2.0, "tokens_per_s": 100.0, "step_time_s": 0.5}
    _metrics(tmp_path / "running", [line, {"kind": "eval", "step": 4, "eval_loss": 2.1}])
    _metrics(tmp_path / "done", [line])
    (tmp_path / "done" / "summary.json").write_text(json.dumps({"status": "completed"}))
    _metrics(tmp_path / "old", [line])
    os.utime(tmp_path / "old" / "metrics.jsonl", (1.0, 1.0))  # An earlier invocation's.
    steps = {"running": 10, "done": 10, "old": 10, "queued": 10}
    running = running_runs(tmp_path, steps, since=time.time() - 60)
    assert running == {"running": "step 4/10 (40%) loss 2.0000 tok/s 100 ETA 3s"}
    assert suite_line("quick", 12, 81, 300.0, 10, running) == (
        "lbw-stress quick: 12/81 runs done, 5m00s elapsed, ETA 34m30s; "
        "running: step 4/10 (40%) loss 2.0000 tok/s 100 ETA 3s"
    )
    assert suite_line("quick", 3, 81, 5.0, 0, {}) == "lbw-stress quick: 3/81 runs done, 5s elapsed"


def test_stress_prints_a_line_every_n_seconds_into_a_log(tmp_path, capsys):
    progress = _Progress("quick", tmp_path, total=5, done=1, enabled=True, every_s=0.05)
    try:
        deadline = time.monotonic() + 30
        while "lbw-stress quick: 1/5 runs done" not in capsys.readouterr().err:
            assert time.monotonic() < deadline, "no progress line"
            time.sleep(0.05)
    finally:
        progress.close()
    assert progress.bar is None  # Not a terminal: lines, not a bar.


@pytest.mark.parametrize("enabled", [False])
def test_stress_quiet_prints_nothing(tmp_path, capsys, enabled):
    progress = _Progress("quick", tmp_path, total=5, done=1, enabled=enabled, every_s=0.01)
    time.sleep(0.1)
    progress.close()
    assert capsys.readouterr().err == ""
