"""The stress-suite machinery on a micro configuration: expansion, resume, controls, report."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import optax
import pytest
from PIL import Image

from lbw.train import archive, peers, stress
from lbw.train.stress import Method, Setting, SuiteSpec, report

MICRO_MODEL = {
    "num_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
}
MICRO_TRAIN = dict(
    seq_len=16,
    batch_size=2,
    steps=6,
    warmup_steps=2,
    eval_every=3,
    eval_batches=1,
    log_every=2,
)


def micro(methods=None, **changes) -> SuiteSpec:
    values = dict(
        name="micro",
        description="micro suite",
        settings=(
            Setting(name="m", model="tiny_qwen2_5_3b", model_overrides=MICRO_MODEL, base_lr=1e-3),
        ),
        methods=methods
        or (
            Method(name="adamw", optimizer="adamw"),
            Method(name="governor", optimizer="lbw", overrides={"policy": "governor"}),
        ),
        lr_multipliers=(1.0, 10.0),
        seeds=(0,),
        train=MICRO_TRAIN,
    )
    values.update(changes)
    return SuiteSpec(**values)


CONTROLS = (
    Method(name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"),
    Method(name="governor", optimizer="lbw", overrides={"policy": "governor"}),
    Method(name="replay", optimizer="adamw", control="replay", source="governor"),
)


def test_expansion_counts_order_and_stable_ids():
    spec = micro(methods=CONTROLS, seeds=(0, 1))
    runs = stress.expand(spec)
    assert len(runs) == 3 * 2 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    stages = [r.stage for r in runs]
    assert stages == sorted(stages, key=lambda s: s == "control")  # Methods, then controls.
    position = {r.run_id: i for i, r in enumerate(runs)}
    for r in runs:
        if r.depends_on:
            assert position[r.depends_on] < position[r.run_id]
            source = runs[position[r.depends_on]]
            assert (source.method, source.learning_rate, source.seed) == (
                "governor",
                r.learning_rate,
                r.seed,
            )
    assert [r.run_id for r in stress.expand(spec)] == [r.run_id for r in runs]
    assert runs[0].run_id == "m__governor__lr1.000e-03__none__s0"
    # Only the run that the replay reads logs every step.
    logs = {r.method: r.config["log_every"] for r in runs}
    assert logs == {"governor": 1, "effective-lr": 2, "replay": 2}
    # Not where no replay reads it: another setting without the replay, or a fault it skips.
    other = Setting(name="o", model="tiny_qwen2_5_3b", model_overrides=MICRO_MODEL, base_lr=1e-3)
    spec = micro(
        methods=CONTROLS,
        settings=(*spec.settings, dataclasses.replace(other, methods=("governor",))),
        faults={"none": {}, "spike": {"grad_spike_steps": (3,)}},
        fault_methods=("governor",),
    )
    logs = {
        (r.setting, r.fault): r.config["log_every"]
        for r in stress.expand(spec)
        if r.method == "governor"
    }
    assert logs == {("m", "none"): 1, ("m", "spike"): 2, ("o", "none"): 2, ("o", "spike"): 2}
    # Seeds of one configuration are adjacent (they share a compiled step).
    assert [r.seed for r in runs[:2]] == [0, 1]


def test_faults_and_sweep_expansion():
    spec = micro(
        faults={"none": {}, "spike": {"grad_spike_steps": (3,)}},
        fault_multipliers=(10.0,),
        settings=(Setting(name="m", model="tiny_qwen2_5_3b", lr_grid=(1e-3, 3e-3)),),
    )
    sweep = stress.expand_sweep(spec)
    assert [r.learning_rate for r in sweep] == [1e-3, 3e-3]
    with pytest.raises(ValueError, match="no base learning rate"):
        stress.expand(spec)
    runs = stress.expand(spec, {"m": 1e-3})
    assert len(runs) == 2 * 2 + 2  # The fault runs only at ×10.
    assert {r.learning_rate for r in runs if r.fault == "spike"} == {1e-2}
    assert sweep[0].run_id in {r.run_id for r in runs}  # A sweep run is a suite run.
    with pytest.raises(ValueError, match="not in the suite"):
        micro(methods=(Method(name="c", optimizer="adamw", control="replay", source="x"),))


def test_time_constants_are_fractions_of_the_run_and_own_base_lrs_are_scaled():
    methods = (
        Method(name="sgg", optimizer="sgg", time_constants={"recluster_every": 0.05}),
        Method(name="prodigy", optimizer="prodigy", base_lr=1.0),
    )
    for steps, every in ((200, 10), (300, 15), (10, 1)):
        spec = micro(methods=methods, train=dict(MICRO_TRAIN, steps=steps))
        runs = stress.expand(spec)
        sgg = [r for r in runs if r.method == "sgg"]
        assert {r.config["optimizer_args"]["recluster_every"] for r in sgg} == {every}
        meta = stress.time_constants(spec)
        assert meta == {"sgg": {"recluster_every": {"fraction": 0.05, "steps": every}}}
    prodigy = [r for r in runs if r.method == "prodigy"]
    assert [r.learning_rate for r in prodigy] == [1.0, 10.0]  # Its own base × the multipliers.
    assert "optimizer_args" not in prodigy[0].config
    # The suites state them, for the methods whose defaults assume runs of 10k+ steps.
    full = stress.time_constants(stress.full())
    assert full["sgg"]["recluster_every"] == {"fraction": 0.05, "steps": 15}
    assert full["spam"]["reset_interval"]["steps"] == 100
    assert stress.time_constants(stress.quick()) == {}  # It runs no peer.
    block = "\n".join(report.time_constants_block({"time_constants": full, "spec": {}}))
    assert "| sgg | recluster_every | 0.05 | 15 |" in block


def test_per_setting_methods_multipliers_and_fault_methods():
    faults = {"none": {}, "spike": {"grad_spike_steps": (3,)}}
    spec = micro(
        methods=CONTROLS,
        settings=(
            Setting(name="a", model="tiny_qwen2_5_3b", base_lr=1e-3),
            Setting(
                name="b",
                model="tiny_qwen2_5_3b",
                base_lr=1e-3,
                methods=("governor",),
                lr_multipliers=(3.0,),
            ),
        ),
        faults=faults,
        fault_methods=("governor",),
        fault_settings=("a",),
    )
    runs = stress.expand(spec)
    a = [r for r in runs if r.setting == "a"]
    b = [r for r in runs if r.setting == "b"]
    assert len(a) == 3 * 2 + 2  # Every method at ×1 and ×10, the fault only for the governor.
    assert {r.method for r in a if r.fault == "spike"} == {"governor"}
    assert [(r.method, r.lr_multiplier) for r in b] == [("governor", 3.0)]
    assert runs == a + b  # Setting by setting, each with its controls last.
    assert [r.stage for r in a][-2:] == ["control", "control"]
    with pytest.raises(ValueError, match="without its source 'governor'"):
        micro(
            methods=CONTROLS,
            settings=(Setting(name="c", model="m", base_lr=1.0, methods=("replay",)),),
        )
    with pytest.raises(ValueError, match="unknown methods"):
        micro(settings=(Setting(name="c", model="m", base_lr=1.0, methods=("nope",)),))
    with pytest.raises(ValueError, match="for LoRA settings"):
        Setting(name="c", model="m", base_lr=1.0, pretrain={})


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_lora_setting_runs_on_its_cached_base(tmp_path):
    spec = micro(
        settings=(
            Setting(
                name="lora",
                model="tiny_qwen2_5_3b",
                model_overrides=MICRO_MODEL,
                lora_rank=2,
                pretrain={"learning_rate": 3e-3, "steps": 4},
                lr_grid=(1e-3, 3e-3),
            ),
        ),
        methods=(Method(name="adamw", optimizer="adamw"),),
        lr_multipliers=(1.0,),
    )
    suite_dir = stress.run_suite(spec, tmp_path, progress=False)
    base = stress.expand_pretrain(spec)[0]
    base_dir = suite_dir / "runs" / base.run_id
    base_summary = json.loads((base_dir / "summary.json").read_text())
    assert base_summary["config"]["lora_rank"] == 0 and base_summary["step"] == 4
    assert (base_dir / stress.BASE_MODEL / "config.json").is_file()
    records = stress.read_jsonl(suite_dir / "runs.jsonl")
    assert len(records) == 2 and all(r["lora_rank"] == 2 for r in records)  # No pre-training.
    for r in records:
        config = json.loads((suite_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert config["config"]["init_from"] == str(base_dir / stress.BASE_MODEL)
    meta = json.loads((suite_dir / "suite.json").read_text())
    assert meta["pretrain"]["lora"]["run_id"] == base.run_id
    assert "cached base" in (suite_dir / "summary.md").read_text()
    # A fresh clone has the results but not the exported base: it is re-made only when a run
    # that needs it is not finished.
    import shutil

    shutil.rmtree(base_dir / stress.BASE_MODEL)
    stress.run_suite(spec, tmp_path, progress=False)
    assert not (base_dir / stress.BASE_MODEL).exists()
    (suite_dir / "runs" / records[0]["run_id"] / "summary.json").unlink()
    stress.run_suite(spec, tmp_path, progress=False)
    assert (base_dir / stress.BASE_MODEL / "config.json").is_file()


def test_loss_spikes_and_scale_helpers():
    lines = [{"kind": "train", "step": s, "loss": v} for s, v in enumerate([5, 4, 2, 4, 4, 2], 1)]
    assert stress.count_loss_spikes(lines, warmup=0, every=1) == 1  # One excursion of 2 lines.
    lines.append({"kind": "train", "step": 7, "loss": None})
    assert stress.count_loss_spikes(lines, warmup=0, every=1) == 2
    assert stress.count_loss_spikes(lines, warmup=6, every=1) == 1
    # Rebinned to windows of 2 steps: means 4.5, 3, 4, 2 (no spike), then the NaN.
    assert stress.count_loss_spikes(lines, warmup=0, every=2) == 1
    assert stress.mean_scale({"control_energy": 2.5, "step": 10}) == pytest.approx(0.75)
    trace_lines = [
        {"kind": "train", "step": 1, "telemetry": {"scale": 1.0, "held": False}},
        {"kind": "train", "step": 2, "telemetry": {"scale": 0.5, "held": True}},
    ]
    assert stress.scale_trace(trace_lines, 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="every step"):
        stress.scale_trace(trace_lines, 3)


def test_replay_schedule_and_registration():
    name = peers.register_replay([1.0, 0.5, 0.25])
    assert peers.register_replay([1.0, 0.5, 0.25]) == name
    assert peers.register_replay([1.0, 0.5]) != name
    schedule = peers.replay_schedule(optax.constant_schedule(2.0), [1.0, 0.5, 0.25])
    np.testing.assert_allclose([schedule(c) for c in range(5)], [2.0, 1.0, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError):
        peers.register_replay([1.0, math.nan])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    spec = micro(methods=CONTROLS, lr_multipliers=(10.0,))
    suite_dir = stress.run_suite(spec, out, progress=False)
    return spec, suite_dir


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_collect_reports_an_interrupted_suite_without_running(finished, tmp_path):
    import shutil

    spec, suite_dir = finished
    copy = tmp_path / suite_dir.name
    shutil.copytree(suite_dir, copy)
    for name in ("runs.jsonl", "summary.md"):
        (copy / name).unlink()
    meta = json.loads((copy / "suite.json").read_text())
    assert meta["started"]["git_commit"] == meta["git_commit"]  # Written before any run.
    assert [p["runs"] for p in meta["invocations"]] == [3]
    lost = stress.expand(spec)[-1].run_id  # Interrupted: its summary was never written.
    (copy / "runs" / lost / "summary.json").unlink()
    stress.run_suite(spec, tmp_path, progress=False, command="collect", collect_only=True)
    assert not (copy / "runs" / lost / "summary.json").exists()  # Nothing ran.
    assert len(stress.read_jsonl(copy / "runs.jsonl")) == 2
    text = (copy / "summary.md").read_text()
    assert "2 finished of the 3 the suite plans" in text and "`collect`" in text


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_collect_leaves_out_a_setting_whose_sweep_has_not_run(finished, tmp_path):
    import shutil

    spec, suite_dir = finished
    copy = tmp_path / suite_dir.name
    shutil.copytree(suite_dir, copy)
    later = Setting(
        name="n", model="tiny_qwen2_5_3b", model_overrides=MICRO_MODEL, lr_grid=(1e-3, 3e-3)
    )
    bigger = spec.replaced(settings=(*spec.settings, later))
    stress.run_suite(bigger, tmp_path, progress=False, command="collect", collect_only=True)
    meta = json.loads((copy / "suite.json").read_text())
    assert meta["not_collected"] == ["n"] and meta["planned_runs"] == 3 + 2 + 3
    assert len(stress.read_jsonl(copy / "runs.jsonl")) == 3
    text = (copy / "summary.md").read_text()
    assert "3 finished of the 8 the suite plans" in text
    assert "(their base learning-rate sweep has not run): `n`" in text


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_a_suite_without_its_run_folders_reports_and_resumes_from_the_archive(finished, tmp_path):
    import shutil

    spec, suite_dir = finished
    copy = tmp_path / suite_dir.name
    shutil.copytree(suite_dir, copy)
    shutil.rmtree(copy / "runs")  # What a committed suite holds.
    assert (copy / archive.NAME).is_file()
    packed = archive.read(copy)
    assert list(packed) == [r.run_id for r in stress.expand(spec)]
    for rid, run in packed.items():
        lines = stress.read_jsonl(suite_dir / "runs" / rid / "metrics.jsonl")
        assert run["metrics"] == [archive.compact(line) for line in lines]
        for kept, line in zip(run["metrics"], lines, strict=True):  # Only tensor_* left out.
            dropped = set(line.get("telemetry", {})) - set(kept.get("telemetry", {}))
            assert all(k.startswith("tensor_") for k in dropped)
        assert run["summary"] == json.loads((suite_dir / "runs" / rid / "summary.json").read_text())
    before = {p.name: p.read_bytes() for p in copy.glob("*.png")}
    (copy / "summary.md").unlink()
    report.write_report(copy)
    assert (copy / "summary.md").read_text() == (suite_dir / "summary.md").read_text()
    assert {p.name: p.read_bytes() for p in copy.glob("*.png")} == before
    assert not (copy / "runs").exists()
    # A fresh clone resumes: the folders come back from the archive and nothing is redone.
    stress.run_suite(spec, tmp_path, progress=False)
    for rid in packed:
        assert stress.read_summary(copy / "runs" / rid) == packed[rid]["summary"]
    assert (copy / "runs.jsonl").read_text() == (suite_dir / "runs.jsonl").read_text()


def test_the_archive_gives_back_every_kept_number_exactly(tmp_path):
    import lzma

    import numpy as np

    grad_norm = float(np.float32(4.296298503875732))
    f32 = {"step": 5, "loss": 5.655632019042969, "telemetry": {"grad_norm": grad_norm}}
    f64 = {"step": 6, "telemetry": {"x": 0.1}}  # Not a float32 (x64 telemetry): kept as is.
    vectors = {"step": 7, "telemetry": {"scale": 0.5, "tensor_update_norms": [1.0, 2.0]}}
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (f32, f64, vectors)))
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    archive.write(tmp_path, ["r"])
    back = archive.read(tmp_path)["r"]
    assert back["metrics"] == [f32, f64, {"step": 7, "telemetry": {"scale": 0.5}}]
    assert back["summary"] == {"status": "completed"}
    text = lzma.open(tmp_path / archive.NAME, "rt").read()
    assert '"grad_norm": 4.2962985' in text and '"x": 0.1' in text  # Shortest float32 digits.
    assert vectors["telemetry"]["tensor_update_norms"] == [1.0, 2.0]  # The input is unchanged.


def test_controls_read_the_governor_run(finished):
    _, suite_dir = finished
    records = {r["run_id"]: r for r in stress.read_jsonl(suite_dir / "runs.jsonl")}
    assert len(records) == 3
    for r in records.values():
        assert r["status"] == "completed"
        assert r["final_eval_ppl"] > 1 and r["best_eval_ppl"] <= r["final_eval_ppl"]
        assert [e[0] for e in r["evals"]] == [3, 6]
        if r["control"] is None:
            continue
        source = records[r["depends_on"]]
        assert source["method"] == "governor"
        summary = json.loads((suite_dir / "runs" / r["run_id"] / "summary.json").read_text())
        if r["control"] == "effective-lr":
            scale = source["telemetry"]["mean_scale"]
            assert r["learning_rate"] == pytest.approx(r["base_learning_rate"] * scale, rel=1e-5)
            assert summary["config"]["optimizer"] == "adamw"
        else:
            lines = stress.read_jsonl(suite_dir / "runs" / r["depends_on"] / "metrics.jsonl")
            trace = stress.scale_trace(lines, 6)
            assert summary["config"]["optimizer"] == peers.register_replay(trace)
            # The replayed learning rates are the schedule's times the trace, step by step.
            own = stress.read_jsonl(suite_dir / "runs" / r["run_id"] / "metrics.jsonl")
            gov = [x for x in lines if x["kind"] == "train"]
            for line in own:
                if line["kind"] == "train":
                    k = line["step"]
                    expect = gov[k - 1]["learning_rate"] * trace[k - 1]
                    assert line["learning_rate"] == pytest.approx(expect, rel=1e-5, abs=1e-12)


def test_resume_does_not_redo_finished_runs(finished):
    spec, suite_dir = finished
    runs = stress.expand(spec)
    mtimes = {
        r.run_id: (suite_dir / "runs" / r.run_id / "summary.json").stat().st_mtime_ns for r in runs
    }
    # A partial suite: one run lost its summary (interrupted), one never started.
    (suite_dir / "runs" / runs[0].run_id / "summary.json").unlink()
    victim = suite_dir / "runs" / runs[-1].run_id
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    stress.run_suite(spec, suite_dir.parent, progress=False)
    after = {
        r.run_id: (suite_dir / "runs" / r.run_id / "summary.json").stat().st_mtime_ns for r in runs
    }
    redone = {k for k in mtimes if after[k] != mtimes[k]}
    assert redone == {runs[0].run_id, runs[-1].run_id}
    assert len(stress.read_jsonl(suite_dir / "runs.jsonl")) == 3


def _fixture_suite(directory):
    """A hand-written suite: two methods, two LRs, two seeds, known perplexities."""
    ppl = {
        ("adamw", 1.0): [10.0, 12.0],
        ("adamw", 10.0): [30.0, 34.0],
        ("governor", 1.0): [10.5, 11.5],
        ("governor", 10.0): [15.0, 17.0],
    }
    records = []
    for (method, mult), values in ppl.items():
        for seed, p in enumerate(values):
            rid = f"m__{method}__x{mult:g}__s{seed}"
            run_dir = directory / "runs" / rid
            run_dir.mkdir(parents=True)
            lines = [
                {
                    "kind": "train",
                    "step": s,
                    "loss": 5.0 - s / 10,
                    "telemetry": {"scale": 0.5, "regime": 2, "regime_name": "STRESSED"}
                    if method == "governor"
                    else {},
                }
                for s in range(1, 11)
            ]
            lines.append({"kind": "eval", "step": 10, "eval_perplexity": p, "wall_time_s": 3.0})
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            records.append(
                {
                    "run_id": rid,
                    "stage": "method",
                    "setting": "m",
                    "model": "tiny",
                    "lora_rank": 0,
                    "method": method,
                    "optimizer": "adamw" if method == "adamw" else "lbw",
                    "control": None,
                    "depends_on": None,
                    "lr_multiplier": mult,
                    "base_learning_rate": 1e-3 * mult,
                    "learning_rate": 1e-3 * mult,
                    "fault": "none",
                    "seed": seed,
                    "status": "completed",
                    "steps": 10,
                    "final_eval_ppl": p,
                    "best_eval_ppl": p,
                    "final_loss": 4.0,
                    "wall_time_s": 4.0,
                    "tokens_per_s": 1000.0,
                    "compile_s": 1.0,
                    "loss_spikes": 0,
                    "evals": [[10, p, 3.0]],
                    "telemetry": {"mean_scale": 0.5, "regime_switches": 1}
                    if method == "governor"
                    else {},
                }
            )
    stress.add_targets(records)
    (directory / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {"spec": {"name": "fixture", "train": {"log_every": 1}}, "git_commit": "abc123"}
    (directory / "suite.json").write_text(json.dumps(meta))


def test_report_from_fixture_jsonl(tmp_path):
    _fixture_suite(tmp_path)
    path = report.write_report(tmp_path)
    text = path.read_text()
    assert "| adamw | 11.00 ± 1.41 | 32.00 ± 2.83 |" in text
    assert "| governor | 11.00 ± 0.71 | 16.00 ± 1.41 |" in text
    assert "×1 (1e-03)" in text and "×10 (1e-02)" in text
    # Targets: AdamW's best is 11; at ×10 it is 32 ≥ 2 × 11, so that LR is a stress LR.
    assert "governor / AdamW-best = 1.45" in text
    assert "governor / AdamW = 11.00 / 11.00 = 1.000" in text
    assert "adamw: 21.50 (governor / adamw = 0.628)" in text
    assert "abc123" in text
    # Target ppl = 1.1 × 11 = 12.1: every ×1 run reaches it, no ×10 run does.
    assert "| adamw | ×1 | 2/2 | 10 | 3.0 | 1.00× |" in text
    assert "| adamw | ×10 | 0/2 |" in text and "| governor | ×1 | 2/2 |" in text
    for png in ("loss_curves.png", "robustness.png", "scale_regime.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"]({png})" in text
        with Image.open(tmp_path / png) as image:
            assert image.mode == "P"  # A palette PNG: committed plots stay small.
    assert report.headline(tmp_path).splitlines()[0].startswith("Final validation perplexity")
    assert "replay control" not in text  # No replay runs: no empty comparison line.


def test_targets_when_adamw_diverged_everywhere(tmp_path):
    _fixture_suite(tmp_path)
    path = tmp_path / "runs.jsonl"
    records = stress.read_jsonl(path)
    for r in records:
        if r["method"] == "adamw":
            r["status"], r["final_eval_ppl"] = "nonfinite", None
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = report.targets_block(report.Suite(tmp_path), "m", "none")
    assert lines == [
        "- AdamW diverged or did not run at every learning rate here; "
        "governor: ×1 11.00; ×10 16.00."
    ]


def test_report_of_a_subset_without_the_baseline(tmp_path):
    """A subset of a suite (benchmarks/suite_subset.py) may leave AdamW out: no speedup then."""
    _fixture_suite(tmp_path)
    path = tmp_path / "runs.jsonl"
    records = [r for r in stress.read_jsonl(path) if r["method"] != "adamw"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report.write_report(tmp_path).read_text()
    assert "| governor | ×1 | 2/2 |" in text and "| adamw |" not in text


def test_report_lists_the_invocations_of_a_suite_run_in_parts(tmp_path):
    _fixture_suite(tmp_path)
    meta = json.loads((tmp_path / "suite.json").read_text())
    meta["invocations"] = [
        {"command": "part one", "git_commit": "a" * 40, "runs": 3, "seconds": 10.0},
        {"command": "part two", "git_commit": "b" * 40, "runs": 5, "seconds": 20.4, "note": "n"},
    ]
    (tmp_path / "suite.json").write_text(json.dumps(meta))
    text = report.write_report(tmp_path).read_text()
    assert "- Run in 2 invocations into the same folder" in text
    assert "  - `part two`: 5 runs in 20 s, commit `bbbbbbb`; n" in text


def test_cli_report(tmp_path, capsys):
    _fixture_suite(tmp_path)
    assert stress.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| governor | 11.00 ± 0.71 | 16.00 ± 1.41 |" in out
    assert (tmp_path / "summary.md").exists()


def test_report_roles_come_from_the_spec_not_names():
    """A renamed method needs no report edit: its role is read from the spec."""
    methods = (
        Method(name="base", optimizer="adamw"),
        Method(name="clipped", optimizer="adamw+clip", overrides={"clip_threshold": 1.0}),
        Method(name="published", optimizer="lbw", overrides={"policy": "reference"}),
        Method(name="mine", optimizer="lbw", overrides={"policy": "governor"}),
        Method(name="mine+sgg", optimizer="lbw+sgg", overrides={"policy": "governor"}),
        Method(name="other", optimizer="zclip"),
        Method(name="lower-lr", optimizer="adamw", control="effective-lr", source="mine"),
        Method(name="lower-lr(pub)", optimizer="adamw", control="effective-lr", source="published"),
        Method(name="schedule", optimizer="adamw", control="replay", source="mine"),
    )
    spec = SuiteSpec(
        name="s",
        description="",
        settings=(Setting(name="m", model="tiny", base_lr=1e-3),),
        methods=methods,
        lr_multipliers=(1.0,),
    )
    roles = spec.roles()
    assert roles.subject == "mine"
    assert roles.guarded == {"published", "mine", "mine+sgg"}
    assert roles.baselines == ("base", "clipped")
    assert [c[0] for c in roles.controls if c[2] == roles.subject] == ["lower-lr", "schedule"]
    assert roles.ladder == ("base", "clipped", "published", "mine", "lower-lr")


def test_report_reads_a_renamed_subject(tmp_path):
    _fixture_suite(tmp_path)
    path = tmp_path / "runs.jsonl"
    records = stress.read_jsonl(path)
    for r in records:
        r["method"] = r["method"].replace("governor", "lbw-governor")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report.write_report(tmp_path).read_text()
    assert "lbw-governor / AdamW = 11.00 / 11.00 = 1.000" in text
    assert "adamw: 21.50 (lbw-governor / adamw = 0.628)" in text
    assert "scale_regime.png" in text


def test_stress_modules_import_only_those_above_them():
    """No import cycle: each module of the stress package imports only those before it."""
    import ast
    from pathlib import Path

    order = [
        "spec",
        "check",
        "expand",
        "records",
        "results",
        "tables",
        "plots",
        "report",
        "runner",
        "gpu_scales",
        "gpu_plan",
        "suites",
        "cli",
    ]
    package = Path(stress.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(order), modules ^ set(order)  # Every module has its place.
    for i, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "lbw.train.stress":
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "lbw.train.stress."
            ):
                used.add(node.module.rsplit(".", 1)[1])
        assert used <= set(order[:i]), (name, used - set(order[:i]))
