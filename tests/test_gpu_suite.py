"""The GPU suites' plan (what is given up first, the floor, the refusal), their definitions, the
deadline that stops a stage and keeps what it has, the evidence script's budget and its path
logic, and (slow) its smoke mode."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbw.train import stress
from lbw.train.config import TrainConfig
from lbw.train.stress import gpu_plan, gpu_scales
from lbw.train.stress.spec import BASELINE, Method

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_evidence.sh"

# An H200-like probe of the scanned 0.5B model: 10 s compilations, 75 ms steps.
PROBE = gpu_plan.Probe(compile_s=10.0, step_s=0.075, eval_s=0.15, setup_s=2.0, wall_s=20.0)


def test_gpu_suite_definition():
    spec = gpu_plan.suite()
    runs = stress.expand(spec)
    names = ["adamw", "adamw+clip", "lbw_adamw", "governor-unclipped"]
    assert [m.name for m in spec.methods] == [*names, "effective-lr"]
    # The default is lbw_adamw's: the governor over AdamW clipped at 1.0.
    default = spec.method("lbw_adamw")
    assert default.optimizer == "lbw+clip" and default.overrides["clip_threshold"] == 1.0
    assert [(r.method, r.lr_multiplier) for r in runs] == [
        *[(m, 10.0) for m in names],
        *[(m, 1.0) for m in names],
        *[(m, 30.0) for m in names],
        ("effective-lr", 10.0),  # The control at ×10 only, reading the default's run.
    ]
    assert runs[-1].depends_on == runs[2].run_id
    assert sorted({r.learning_rate for r in runs}) == [1e-4, 1e-3, 3e-3]
    (setting,) = spec.settings
    assert setting.model == "qwen2_5_0_5b" and setting.model_overrides == {"dtype": "bfloat16"}
    train = spec.train
    assert train["scan_layers"] and train["peak_lr_in_state"] and train["steps"] == 300
    assert train["warmup_steps"] == 30 and train["schedule"] == "cosine"
    assert train["steps"] // train["eval_every"] == 5 and train["eval_batches"] == 4
    assert train["seq_len"] == 512 and train["data"] == "wikitext2" and spec.seeds == (0,)
    # One compilation per optimizer: the control runs AdamW, the learning rate is state.
    assert gpu_plan.compilations(runs) == 4
    assert stress.SUITES["gpu"]().name == "gpu"

    depth = gpu_plan.suite(gpu_plan.DEPTH)
    assert depth.settings[0].model == "small_125m" and depth.train["steps"] == 1000
    assert [(r.method, r.lr_multiplier) for r in stress.expand(depth)] == [
        ("adamw", 10.0),
        ("lbw_adamw", 10.0),
        ("adamw", 1.0),
        ("lbw_adamw", 1.0),
    ]
    assert stress.SUITES["gpu-depth"]().name == "gpu-depth"


def test_the_unclipped_governor_runs_only_when_it_is_not_the_default(monkeypatch):
    names = [m.name for m in gpu_plan.stress_methods()]
    assert names == ["adamw", "adamw+clip", "lbw_adamw", "governor-unclipped", "effective-lr"]
    same = Method(name="governor-unclipped", optimizer="lbw+clip", overrides={"policy": "governor"})
    # The default's config (clip 1.0): stress_methods reads the name where the scales live.
    monkeypatch.setattr(gpu_scales, "UNCLIPPED_GOVERNOR", same)
    names = [m.name for m in gpu_plan.stress_methods()]
    assert names == ["adamw", "adamw+clip", "lbw_adamw", "effective-lr"]


def _need(scale, steps, mults, probe=PROBE):
    return gpu_plan.MARGIN * gpu_plan.estimate_s(gpu_plan.suite(scale, steps, mults), probe)


def _budget_for(need_s, probe=PROBE):
    """The budget whose runs get exactly ``need_s``."""
    return need_s + probe.wall_s + gpu_plan.RESERVE_S


def test_plan_gives_up_x30_before_steps_and_refuses_below_the_floor():
    scale = gpu_plan.GPU
    everything = _need(scale, 300, (10.0, 1.0, 30.0))
    without_30 = _need(scale, 300, (10.0, 1.0))
    assert without_30 < everything

    full = gpu_plan.plan(PROBE, _budget_for(everything), scale)
    assert full.steps == 300 and full.multipliers == (10.0, 1.0, 30.0) and not full.dropped
    assert full.runs == 13 and full.compilations == 4

    # Just short of the whole plan: ×30 goes, the steps stay.
    cut = gpu_plan.plan(PROBE, _budget_for(everything - 1.0), scale)
    assert cut.steps == 300 and cut.multipliers == (10.0, 1.0) and cut.runs == 9
    assert len(cut.dropped) == 1 and cut.dropped[0].startswith("×30")
    assert "given up to fit: ×30" in cut.spec.description

    # Short of even that: the steps go, down to the most that fit.
    budget = _budget_for(_need(scale, 250, (10.0, 1.0)) + 0.01)
    fewer = gpu_plan.plan(PROBE, budget, scale)
    assert fewer.multipliers == (10.0, 1.0) and fewer.steps == 250
    assert fewer.dropped[0].startswith("×30") and fewer.dropped[1].startswith("steps: 250")
    assert fewer.spec.train["steps"] == 250 and fewer.spec.train["warmup_steps"] == 25

    # Below the floor of 200 steps: refused, with the numbers that explain why.
    budget = _budget_for(_need(scale, 200, (10.0, 1.0)) - 0.01)
    with pytest.raises(gpu_plan.BudgetError, match=r"the floor of 200 steps") as e:
        gpu_plan.plan(PROBE, budget, scale)
    assert "×1, ×10" in str(e.value) and "step 75.0 ms" in str(e.value)

    # A fixed step count is checked (×30 may still go), never cut.
    assert gpu_plan.plan(PROBE, 1e5, scale, steps=900).steps == 900
    with pytest.raises(gpu_plan.BudgetError, match="at 900 steps per run"):
        gpu_plan.plan(PROBE, _budget_for(everything), scale, steps=900)


def test_the_depth_plan_gives_up_x1_and_never_its_steps():
    scale = gpu_plan.DEPTH
    both = _need(scale, 1000, (10.0, 1.0))
    assert gpu_plan.plan(PROBE, _budget_for(both), scale).multipliers == (10.0, 1.0)
    only_10 = gpu_plan.plan(PROBE, _budget_for(both - 1.0), scale)
    assert only_10.multipliers == (10.0,) and only_10.steps == 1000 and only_10.runs == 2
    with pytest.raises(gpu_plan.BudgetError, match="floor of 1000 steps"):
        gpu_plan.plan(PROBE, _budget_for(_need(scale, 1000, (10.0,)) - 1.0), scale)


def test_probe_times_from_two_runs():
    first = {"step": 10, "compile_s": 31.0, "step_time_s": 0.07, "wall_time_s": 50.0}
    again = {"step": 10, "compile_s": 0.1, "step_time_s": 0.05, "wall_time_s": 3.0}
    lines = [
        {"kind": "train", "step": 5, "wall_time_s": 1.0},
        {"kind": "eval", "step": 5, "wall_time_s": 1.3},
        {"kind": "train", "step": 10, "wall_time_s": 1.6},
        {"kind": "eval", "step": 10, "wall_time_s": 1.8},
    ]
    probe = gpu_plan.probe_from_runs(first, again, lines)
    assert probe.compile_s == 31.0 and probe.step_s == 0.05
    assert probe.eval_s == pytest.approx(0.3)
    assert probe.setup_s == pytest.approx(3.0 - 0.1 - 9 * 0.05 - 0.5)
    assert probe.wall_s == 53.0
    with pytest.raises(ValueError, match="evaluation"):
        gpu_plan.probe_from_runs(first, again, lines[:1])


def test_cli_refuses_a_plan_that_does_not_fit(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_probe(scale, out_dir):
        calls.append(scale.name)
        return PROBE

    monkeypatch.setattr(gpu_plan, "measure_probe", fake_probe)
    assert stress.main(["gpu", "--out", str(tmp_path), "--budget-s", "120", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("lbw-stress: error: suite 'gpu' does not fit its 120 s budget")
    assert calls == ["gpu"] and not (tmp_path / "gpu").exists()  # No run started.
    assert stress.main(["gpu-depth", "--out", str(tmp_path), "--budget-s", "60"]) == 2
    assert "suite 'gpu-depth' does not fit" in capsys.readouterr().err
    assert calls == ["gpu", "gpu-depth"]


MICRO = {**gpu_plan.MICRO_MODEL, "dtype": "bfloat16"}


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


@pytest.mark.slow  # Trains several runs: .ci/run runs it with -m slow.
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


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_a_deadline_stops_a_run_between_steps_and_nothing_else(tmp_path):
    from lbw.train import loop

    config = _micro_config(
        tmp_path, "long", optimizer="adamw", steps=100_000, eval_every=0, log_every=1
    )
    with gpu_plan.Deadline(0.0) as deadline:
        loop.train(config)
    assert deadline.expired and deadline.stopped
    lines = (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(lines) < 1000  # Stopped at a step's end, its telemetry written.
    assert not (Path(config.out_dir) / "summary.json").exists()
    # Code that does not train is never interrupted; it reads the time left.
    with gpu_plan.Deadline(0.05) as deadline:
        time.sleep(0.5)
    assert deadline.expired and not deadline.stopped and deadline.left() < 0
    # A Ctrl-C of the user's is not the deadline's to swallow.
    with pytest.raises(KeyboardInterrupt), gpu_plan.Deadline(60.0):
        raise KeyboardInterrupt


@pytest.mark.slow  # Trains several runs: .ci/run runs it with -m slow.
def test_a_suite_stopped_at_its_deadline_keeps_its_finished_runs(tmp_path):
    scale = dataclasses.replace(
        gpu_plan.SMOKE,
        name="stop-test",
        methods=(BASELINE,),
        lr_multipliers=(1.0, 10.0),
        droppable=(10.0,),
        steps=4,
        evals=2,
        log_every=1,
    )
    first = gpu_plan.plan(PROBE, 1e5, dataclasses.replace(scale, lr_multipliers=(1.0,)))
    assert gpu_plan.run_plan(first, tmp_path, 600.0)["stopped"] is False
    # The whole plan, longer, with no time left: the ×1 run is kept (finished: run ids do not
    # name the steps), the ×10 one stops after a step; the records, the report and the plan
    # are written all the same.
    whole = gpu_plan.plan(PROBE, 1e5, scale, steps=5000)
    ran = gpu_plan.run_plan(whole, tmp_path, 0.0)
    assert ran["stopped"] is True
    assert [(r["method"], r["lr_multiplier"]) for r in ran["records"]] == [("adamw", 1.0)]
    suite_dir = tmp_path / "stop-test"
    meta = json.loads((suite_dir / "suite.json").read_text())
    assert meta["plan"]["stopped_at_deadline"] is True and meta["plan"]["steps"] == 5000
    assert "adamw" in (suite_dir / "summary.md").read_text()
    stopped = [p for p in (suite_dir / "runs").iterdir() if not (p / "summary.json").exists()]
    assert len(stopped) == 1 and "lr1.000e-03" in stopped[0].name
    per_method = gpu_plan.per_method(whole, ran["records"])
    assert per_method["adamw"]["estimated_run_s"] == pytest.approx(whole.run_estimate_s, abs=0.01)
    assert len(per_method["adamw"]["measured_run_s"]) == 1


class _NoTime:
    def left(self):
        return -1.0

    def elapsed(self):
        return 0.0


def test_evidence_cost_stage_runs_only_the_parts_that_fit(tmp_path):
    from benchmarks.gpu_sizes import SMOKE_SIZES
    from benchmarks.gpu_timing import stage_guard

    state = {"results": {}, "machine": {"memory_bandwidth_bytes_per_s": None}}
    saved = []
    result = stage_guard(SMOKE_SIZES, 8, _NoTime(), state, tmp_path, lambda: saved.append(1))
    assert result is state["results"]["guard"] and result["methods"] == {}
    assert set(result["skipped"]) == {"scanned", "unrolled"}
    assert "left" in result["skipped"]["unrolled"]


def test_evidence_skips_what_its_budget_cannot_hold_and_writes_what_it_has(tmp_path):
    from benchmarks import gpu_evidence

    out = tmp_path / "out"
    args = [str(out), "--smoke", "--work-dir", str(tmp_path / "work"), "--stages", "depth,guard"]
    status = gpu_evidence.main([*args, "--total-budget-s", "6", "--guard-reserve-s", "5"])
    assert status == 0
    evidence = json.loads((out / "evidence.json").read_text())
    stages = evidence["stages"]
    assert stages["depth"]["status"] == "skipped" and "left for it" in stages["depth"]["reason"]
    assert stages["guard"]["status"] == "done"
    assert set(evidence["results"]["guard"]["skipped"]) == {"scanned", "unrolled"}
    assert evidence["budgets"] == {"total_s": 6.0, "suite_s": 90.0, "guard_reserve_s": 5.0}
    assert "| depth | skipped |" in (out / "summary.md").read_text()
    assert "stage guard: done" in (out / "log.txt").read_text()


def _fake_python(tmp_path, pip_status: int) -> tuple[Path, Path]:
    """An interpreter that records a ``-m pip`` call (exiting ``pip_status``) and runs the
    rest with this one."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" > {log}; exit {pip_status}; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return fake, log


@pytest.mark.parametrize("install", [False, True], ids=["links", "install-fails"])
def test_evidence_script_imports_this_checkout_without_an_install(tmp_path, install):
    """As on the GPU machine: from another folder, no PYTHONPATH, another ``benchmarks`` and
    ``lbw`` in the current folder, and (here) an install of the project elsewhere."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("raise ImportError('the wrong one')\n")
    (tmp_path / "lbw" / "train").mkdir(parents=True)
    (tmp_path / "lbw" / "train" / "__init__.py").write_text("raise ImportError('wrong one')\n")
    fake, log = _fake_python(tmp_path, pip_status=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=str(fake), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    argv = [str(SCRIPT), *(["--install"] if install else []), "--where"]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {
        "lbw.train": str(ROOT / "train"),
        "lbw.models": str(ROOT / "models"),
        "lbw_optax": str(ROOT / "lbw_optax"),
        "benchmarks": str(ROOT / "benchmarks"),
    }
    if install:
        assert log.read_text().split() == [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            str(ROOT),
        ]
        assert "failed; using the links instead" in result.stderr
    else:
        assert not log.exists()
    assert not list((tmp_path / "tmp").iterdir())  # The links' folder is gone.


def test_the_smoke_mode_ends_within_three_minutes():
    from benchmarks.gpu_sizes import GPU_SIZES, SMOKE_SIZES

    # Its budget stops it (Python's start-up and a last compilation on top).
    assert SMOKE_SIZES.total_budget_s <= 165.0
    assert GPU_SIZES.total_budget_s <= 8 * 60 - 15  # On a GPU: 8 minutes, start-up included.
    for sizes in (GPU_SIZES, SMOKE_SIZES):
        assert sizes.suite_budget_s + sizes.guard_reserve_s <= sizes.total_budget_s


@pytest.mark.slow
def test_gpu_evidence_smoke(tmp_path):
    """The whole command in smoke mode, as the GPU machine runs it: the shell script from
    another folder, without ``datasets``, in a checkout that is not a git repository. The
    budgets are raised so that every part runs on a loaded CPU too (the smoke mode's own budget
    of 165 s skips what a slow machine cannot fit)."""
    out = tmp_path / "out"
    blocked = tmp_path / "blocked" / "datasets"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('no datasets on the GPU machine')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        GIT_DIR=str(tmp_path / "not-a-repository"),
        PYTHON=sys.executable,
        PYTHONPATH=str(blocked.parent),
    )
    start = time.perf_counter()
    result = subprocess.run(
        [str(SCRIPT), str(out), "--smoke", "--work-dir", str(tmp_path / "work"), *BUDGETS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_evidence_outputs())
    for p in out.iterdir():  # What comes back from the machine: plain, small, simple names.
        assert p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        assert p.stat().st_size < 16 * 2**20
    evidence = json.loads((out / "evidence.json").read_text())
    assert {k: v["status"] for k, v in evidence["stages"].items()} == {
        "suite": "done",
        "depth": "done",
        "guard": "done",
    }
    assert evidence["wall_s"] <= evidence["budgets"]["total_s"]
    assert evidence["code"]["git_commit"] == "unknown"
    assert evidence["code"]["code_dir"] == str(ROOT)
    results = evidence["results"]
    suite = results["suite"]
    assert suite["runs_finished"] == suite["runs_planned"] == 13
    assert suite["plan"]["compilations"] == 4 and not suite["stopped_at_budget"]
    methods = {"adamw", "adamw+clip", "lbw_adamw", "governor-unclipped", "effective-lr"}
    assert set(suite["per_method"]) == methods
    assert results["depth"]["runs_finished"] == 4
    from benchmarks.gpu_timing import GUARD_METHODS, UNROLLED

    guard = results["guard"]
    assert guard["skipped"] == {}
    assert set(guard["methods"]) == {f"{n} [scanned]" for n in GUARD_METHODS} | {
        f"{n} [unrolled]" for n in UNROLLED
    }
    assert guard["methods"]["adamw [scanned]"]["ratio"] == 1.0
    assert (
        guard["methods"]["lbw_adamw [scanned]"]["hlo_gb"]
        > guard["methods"]["adamw [scanned]"]["hlo_gb"]
        > 0
    )
    assert guard["trace"]["kept"] and guard["trace"]["steps"] == 1
    summary = (out / "summary.md").read_text()
    assert "## LR-stress suite" in summary and "## Depth suite" in summary
    assert "Time to the target perplexity" in summary and "× adamw" in summary
    print(f"smoke: {wall:.0f} s wall, {evidence['wall_s']} s in main()")


BUDGETS = ("--total-budget-s", "1200", "--suite-budget-s", "700", "--guard-reserve-s", "400")


def gpu_evidence_outputs():
    from benchmarks.gpu_evidence import OUTPUTS

    return OUTPUTS
