"""The ``gpu`` suite's plan (budget, floor, refusal), its definition, the shared compiled step,
and the GPU evidence script's smoke mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lbw.train import gpu_suite, stress
from lbw.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent

# An H200-like probe: 30 s compilations, 60 ms steps.
PROBE = gpu_suite.Probe(compile_s=30.0, step_s=0.06, eval_s=0.2, setup_s=2.0, wall_s=40.0)


def test_gpu_suite_definition():
    spec = gpu_suite.gpu()
    runs = stress.expand(spec)
    assert len(runs) == 15  # Five methods at three learning rates, one seed.
    assert {m.name for m in spec.methods} == {
        "adamw",
        "adamw+clip",
        "reference",
        "governor",
        "effective-lr",
    }
    assert sorted({r.learning_rate for r in runs}) == [1e-4, 1e-3, 3e-3]
    (setting,) = spec.settings
    assert setting.model == "qwen2_5_0_5b" and setting.model_overrides == {"dtype": "bfloat16"}
    assert spec.train["seq_len"] == 512 and spec.train["data"] == "wikitext2"
    assert spec.train["peak_lr_in_state"] and spec.seeds == (0,)
    controls = [r for r in runs if r.control]
    assert {r.control for r in controls} == {"effective-lr"}
    assert all(r.depends_on.split("__")[1] == "governor" for r in controls)
    # One compilation per optimizer: the control runs AdamW, the learning rate is state.
    assert gpu_suite.compilations(runs) == 4
    assert stress.SUITES["gpu"]().name == "gpu"


def test_plan_takes_the_most_steps_that_fit_and_refuses_below_the_floor():
    scale = gpu_suite.GPU
    plan = gpu_suite.plan(PROBE, 360.0, scale)
    assert scale.floor_steps <= plan.steps < scale.max_steps
    assert plan.spec.train["steps"] == plan.steps and plan.compilations == 4
    available = 360.0 - PROBE.wall_s - gpu_suite.RESERVE_S
    assert gpu_suite.MARGIN * plan.estimate_s <= available
    more = gpu_suite.gpu(scale, plan.steps + 1)
    assert gpu_suite.MARGIN * gpu_suite.estimate_s(more, PROBE) > available
    assert f"{plan.steps} steps per run" in plan.spec.description
    # A larger budget gives more steps, up to the cap.
    assert gpu_suite.plan(PROBE, 600.0, scale).steps > plan.steps
    assert gpu_suite.plan(PROBE, 1e5, scale).steps == scale.max_steps
    # Below the floor: refused, with the numbers that explain why.
    with pytest.raises(gpu_suite.BudgetError, match=r"does not fit its 200 s budget") as e:
        gpu_suite.plan(PROBE, 200.0, scale)
    assert "the floor of 50 steps" in str(e.value) and "step 60.0 ms" in str(e.value)
    # A fixed step count is checked, not chosen.
    assert gpu_suite.plan(PROBE, 360.0, scale, steps=120).steps == 120
    with pytest.raises(gpu_suite.BudgetError, match="at 900 steps per run"):
        gpu_suite.plan(PROBE, 360.0, scale, steps=900)


def test_probe_times_from_two_runs():
    first = {"step": 10, "compile_s": 31.0, "step_time_s": 0.07, "wall_time_s": 50.0}
    again = {"step": 10, "compile_s": 0.1, "step_time_s": 0.05, "wall_time_s": 3.0}
    lines = [
        {"kind": "train", "step": 5, "wall_time_s": 1.0},
        {"kind": "eval", "step": 5, "wall_time_s": 1.3},
        {"kind": "train", "step": 10, "wall_time_s": 1.6},
        {"kind": "eval", "step": 10, "wall_time_s": 1.8},
    ]
    probe = gpu_suite.probe_from_runs(first, again, lines)
    assert probe.compile_s == 31.0 and probe.step_s == 0.05
    assert probe.eval_s == pytest.approx(0.3)
    assert probe.setup_s == pytest.approx(3.0 - 0.1 - 9 * 0.05 - 0.5)
    assert probe.wall_s == 53.0
    with pytest.raises(ValueError, match="evaluation"):
        gpu_suite.probe_from_runs(first, again, lines[:1])


def test_cli_refuses_a_plan_that_does_not_fit(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_probe(scale, out_dir):
        calls.append(scale.name)
        return PROBE

    monkeypatch.setattr(gpu_suite, "measure_probe", fake_probe)
    assert stress.main(["gpu", "--out", str(tmp_path), "--budget-s", "120", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("lbw-stress: error: suite 'gpu' does not fit its 120 s budget")
    assert calls == ["gpu"] and not (tmp_path / "gpu").exists()  # No run started.
    assert stress.main(["gpu", "--out", str(tmp_path), "--steps", "5000", "--quiet"]) == 2
    assert "at 5000 steps per run" in capsys.readouterr().err


MICRO = {**gpu_suite.MICRO_MODEL, "dtype": "bfloat16"}


def _micro_config(tmp_path, name, **changes):
    values = dict(
        model="tiny_qwen2_5_3b",
        model_overrides=MICRO,
        seq_len=16,
        batch_size=2,
        steps=4,
        warmup_steps=1,
        log_every=1,
        eval_batches=1,
        optimizer="lbw",
        quiet=True,
        out_dir=str(tmp_path / name),
    )
    values.update(changes)
    return TrainConfig(**values)


def test_peak_lr_in_state_gives_the_same_run_and_shares_the_optimizer(tmp_path):
    from lbw.train import loop

    plain = _micro_config(tmp_path, "plain", learning_rate=3e-3)
    state = _micro_config(tmp_path, "state", learning_rate=3e-3, peak_lr_in_state=True)
    other = _micro_config(tmp_path, "other", learning_rate=1e-3, peak_lr_in_state=True)
    # Runs that differ only in their learning rate share the transformation, hence the step.
    transform = lambda c: c.optim.build(c.steps, faults=c.faults, grad_accum=c.grad_accum).tx
    assert transform(state) is transform(other)
    assert transform(plain) is not transform(_micro_config(tmp_path, "x", learning_rate=1e-3))
    a, b = loop.train(plain), loop.train(state)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    read = lambda c: [
        json.loads(line) for line in (Path(c.out_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    lr_a = [x["learning_rate"] for x in read(plain) if x["kind"] == "train"]
    lr_b = [x["learning_rate"] for x in read(state) if x["kind"] == "train"]
    assert lr_b == pytest.approx(lr_a, rel=1e-6) and max(lr_b) == pytest.approx(3e-3)


@pytest.mark.slow
def test_gpu_evidence_smoke(tmp_path):
    """The whole script in smoke mode, as the GPU machine runs it: from another folder,
    without ``datasets``, in a checkout that is not a git repository."""
    out = tmp_path / "out"
    code = (
        "import sys, runpy; sys.modules['datasets'] = None; "
        f"sys.argv = ['gpu_evidence.py', {str(out)!r}, '--smoke', "
        f"'--work-dir', {str(tmp_path / 'work')!r}]; "
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_evidence.py')!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GIT_DIR"] = str(tmp_path / "not-a-repository")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "evidence.json",
            "log.txt",
            "runs.jsonl",
            "suite-runs.tar.gz",
            "suite-summary.md",
            "suite.json",
            "summary.md",
            "trace.xplane.pb",
        ]
    )
    for p in out.iterdir():  # What comes back from the machine: plain, small, simple names.
        assert p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        assert p.stat().st_size < 16 * 2**20
    evidence = json.loads((out / "evidence.json").read_text())
    assert {k: v["status"] for k, v in evidence["stages"].items()} == {
        "suite": "done",
        "guard": "done",
        "sgg": "done",
        "model_step 0.5B stand-in": "done",
        "model_step 1.5B stand-in": "done",
    }
    assert evidence["code"]["git_commit"] == "unknown"
    assert evidence["code"]["code_dir"] == str(ROOT)
    results = evidence["results"]
    assert results["suite"]["runs"] == 15 and results["suite"]["plan"]["compilations"] == 4
    from benchmarks.gpu_evidence import GUARD_METHODS

    guard = results["guard"]["methods"]
    assert set(guard) == {
        f"{name} [{layout}]" for name, _, layouts in GUARD_METHODS for layout in layouts
    }
    assert guard["adamw [scanned]"]["ratio"] == guard["adamw [unrolled]"]["ratio"] == 1.0
    assert guard["lbw(governor) [scanned]"]["hlo_gb"] > guard["adamw [scanned]"]["hlo_gb"] > 0
    assert results["guard"]["trace"]["kept"]
    assert set(results["sgg"]["steps"]) == {
        "adamw",
        "sgg_adamw ordinary step",
        "sgg_adamw re-clustering step",
    }
    for label in ("0.5B stand-in", "1.5B stand-in"):
        assert set(results[f"model_step {label}"]) == {"full", "lora"}
    suite = json.loads((out / "suite.json").read_text())
    assert suite["plan"]["steps"] == results["suite"]["plan"]["steps"]
    summary = (out / "summary.md").read_text()
    assert "## LR-stress suite" in summary and "× adamw" in summary
    assert "stage model_step 1.5B stand-in: done" in (out / "log.txt").read_text()
