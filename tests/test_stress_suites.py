"""The suites' grids: multipliers that only some methods run, the product default's control, the
warm-up-0 setting, and the committed ``results/full`` staying resumable under the new grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbw.train import stress
from lbw.train.stress import Method, Setting, SuiteSpec

RESULTS = Path(__file__).resolve().parents[1] / "results"

METHODS = (
    Method(name="adamw", optimizer="adamw"),
    Method(name="governor", optimizer="lbw", overrides={"policy": "governor"}),
    Method(name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"),
    Method(name="replay", optimizer="adamw", control="replay", source="governor"),
)


def spec(**changes) -> SuiteSpec:
    values = dict(
        name="s",
        description="",
        settings=(
            Setting(name="a", model="tiny_qwen2_5_3b", base_lr=1e-3),
            Setting(name="b", model="tiny_qwen2_5_3b", base_lr=1e-3, lr_multipliers=(1.0, 10.0)),
        ),
        methods=METHODS,
        lr_multipliers=(0.1, 1.0, 10.0),
        multiplier_methods={0.1: ("adamw", "governor", "effective-lr")},
        faults={"none": {}, "spike": {"grad_spike_steps": (3,)}},
        fault_multipliers=(0.1, 1.0),
        seeds=(0, 1),
        train={"log_every": 5},
    )
    values.update(changes)
    return SuiteSpec(**values)


def cells(runs) -> set[tuple[str, str, float, str]]:
    return {(r.setting, r.method, r.lr_multiplier, r.fault) for r in runs}


def test_a_multiplier_runs_only_the_methods_it_names():
    runs = stress.expand(spec())
    got = cells(runs)
    for method in ("adamw", "governor", "effective-lr"):
        assert ("a", method, 0.1, "none") in got and ("a", method, 0.1, "spike") in got
    assert ("a", "replay", 0.1, "none") not in got and ("a", "replay", 0.1, "spike") not in got
    for method in ("adamw", "governor", "effective-lr", "replay"):  # Unlisted: every method.
        assert {("a", method, m, "none") for m in (1.0, 10.0)} <= got
        assert ("b", method, 1.0, "none") in got
    assert not any(m == 0.1 for s, _, m, _ in got if s == "b")  # b's own multipliers.
    # Seeds × cells: a at ×0.1 (3 methods), ×1, ×10, the spike at ×0.1 and ×1; b at ×1, ×10
    # and the spike at ×1.
    assert len(runs) == 2 * (3 + 4 + 4 + 3 + 4 + 4 + 4 + 4)
    by_id = {r.run_id: r for r in runs}
    low = [r for r in runs if r.lr_multiplier == 0.1]
    assert {r.learning_rate for r in low} == {1e-4}
    for r in low:
        if r.depends_on:  # The control reads the governor's run at the same ×0.1.
            assert by_id[r.depends_on].method == "governor"
            assert by_id[r.depends_on].lr_multiplier == 0.1
    # The governor logs every step only where the replay reads it: not at ×0.1.
    logs = {(r.lr_multiplier, r.config["log_every"]) for r in runs if r.method == "governor"}
    assert logs == {(0.1, 5), (1.0, 1), (10.0, 1)}
    # The same spec without the field runs every method at ×0.1, and the ids of the runs both
    # have are the same.
    every = stress.expand(spec(multiplier_methods={}))
    assert {r.run_id for r in runs} < {r.run_id for r in every}
    assert cells(every) - got == {("a", "replay", 0.1, "none"), ("a", "replay", 0.1, "spike")}


def test_an_empty_list_runs_no_method_at_that_multiplier():
    runs = stress.expand(spec(multiplier_methods={0.1: ()}))
    assert {r.lr_multiplier for r in runs if r.setting == "a"} == {1.0, 10.0}


def test_multiplier_methods_are_validated():
    with pytest.raises(ValueError, match=r"unknown methods \['nope'\]"):
        spec(multiplier_methods={0.1: ("adamw", "nope")})
    with pytest.raises(ValueError, match=r"×0\.3, not a multiplier of the suite or of a setting"):
        spec(multiplier_methods={0.3: ("adamw",)})
    with pytest.raises(ValueError, match="control 'effective-lr' without 'governor'"):
        spec(multiplier_methods={0.1: ("adamw", "effective-lr")})
    # A setting's own multipliers are known; and a suite cut down to settings with their own
    # multipliers (benchmarks/suite_subset.py) keeps its field.
    own = Setting(name="c", model="tiny_qwen2_5_3b", base_lr=1e-3, lr_multipliers=(3.0,))
    mine = spec(settings=(own,), multiplier_methods={3.0: ("adamw",)})
    assert {r.method for r in stress.expand(mine)} == {"adamw"}
    assert {r.lr_multiplier for r in stress.expand(spec(settings=(own,)))} == {3.0}
    data = spec().to_dict()  # suite.json keeps it (JSON keys are strings).
    assert data["multiplier_methods"] == {"0.1": ["adamw", "governor", "effective-lr"]}


DEFAULT = ("adamw", "governor+clip", "effective-lr(governor+clip)")


@pytest.mark.parametrize("name", ["quick", "full"])
def test_the_default_has_its_effective_lr_control(name):
    suite = stress.SUITES[name]()
    control = suite.method("effective-lr(governor+clip)")
    assert (control.optimizer, control.control, control.source) == (
        "adamw",
        "effective-lr",
        "governor+clip",
    )
    assert suite.method("governor+clip").optimizer == "lbw+clip"
    base = {s.name: 1e-3 for s in suite.settings}
    runs = stress.expand(suite, base)
    main = suite.settings[0].name
    by_id = {r.run_id: r for r in runs}
    mults = {r.lr_multiplier for r in runs if r.setting == main and r.method == control.name}
    assert mults == set(suite.lr_multipliers)  # Every multiplier of the main setting.
    for r in runs:
        if r.method == control.name:
            source = by_id[r.depends_on]
            assert (source.method, source.learning_rate, source.seed, source.fault) == (
                "governor+clip",
                r.learning_rate,
                r.seed,
                r.fault,
            )


def test_the_reports_subject_is_the_default_in_quick_and_the_governor_in_full():
    """``quick`` is the product claim: the report reads the default against its control.
    ``full`` keeps the committed results' subject, the unclipped governor, and its control."""
    assert stress.quick().roles().subject == "governor+clip"
    full = stress.full()
    old = full.method("effective-lr")  # The committed results' control is unchanged.
    assert (old.control, old.source) == ("effective-lr", "governor")
    assert full.roles().subject == "governor"


def _main_cells(suite: SuiteSpec, mult: float) -> set[str]:
    runs = stress.expand(suite, {s.name: 1e-3 for s in suite.settings})
    main = suite.settings[0].name
    return {r.method for r in runs if r.setting == main and r.lr_multiplier == mult}


def test_quick_grid():
    """The product claim only: the default, its baseline, bare AdamW and the default's control,
    at every multiplier from ×0.1 to ×10, and without warm-up at ×1 and ×10."""
    quick = stress.quick()
    four = {"adamw", "adamw+clip", "governor+clip", "effective-lr(governor+clip)"}
    for mult in (0.1, 0.3, 1.0, 3.0, 10.0):
        assert _main_cells(quick, mult) == four
    assert [s.name for s in quick.settings] == ["tiny_qwen2_5_3b", "tiny_qwen2_5_3b+warmup0"]
    warm0 = quick.setting("tiny_qwen2_5_3b+warmup0")
    every = stress.expand(quick, {s.name: 1e-3 for s in quick.settings})
    runs = [r for r in every if r.setting == warm0.name]
    assert {r.method for r in runs} == four and {r.lr_multiplier for r in runs} == {1.0, 10.0}
    assert {r.config["warmup_steps"] for r in runs} == {0}
    assert {r.config["model_overrides"]["num_layers"] for r in runs} == {2}
    assert [r.learning_rate for r in stress.expand_sweep(quick) if r.setting == warm0.name] == [
        3e-4,
        1e-3,
        3e-3,
    ]
    assert "without warm-up" in quick.description and "20 warm-up steps" in quick.description


def test_full_grid():
    full = stress.full()
    low = {
        "adamw",
        "adamw+clip1",
        "adamw+clip0.5",
        "governor",
        "governor+clip",
        "effective-lr(governor+clip)",
        "governor+clip+boost",
        "prodigy",
        "dadapt-adamw",
        "mechanic",
        "schedule-free-adamw",
    }
    assert _main_cells(full, 0.1) == _main_cells(full, 0.3) == low
    runs = stress.expand(full, {s.name: 3e-3 for s in full.settings})
    warm0 = [r for r in runs if r.setting == "tiny_qwen2_5_3b+warmup0"]
    assert {r.method for r in warm0} == {
        "adamw",
        "adamw+clip1",
        "governor+clip",
        "effective-lr(governor+clip)",
    }
    assert {r.lr_multiplier for r in warm0} == {1.0, 10.0} and {r.fault for r in warm0} == {"none"}
    assert {r.config["warmup_steps"] for r in warm0} == {0} and {r.seed for r in warm0} == {0, 1, 2}
    sweep = [r.learning_rate for r in stress.expand_sweep(full) if r.setting == warm0[0].setting]
    assert sweep == [3e-4, 1e-3, 3e-3, 1e-2]
    # Faults stay at ×1 and Prodigy's ×0.1 is of its own base 1.0.
    assert {r.lr_multiplier for r in runs if r.fault != "none"} == {1.0}
    assert {r.learning_rate for r in runs if r.method == "prodigy" and r.lr_multiplier < 1} == {
        0.1,
        0.3,
    }


def test_the_committed_full_suite_is_what_the_suite_plans():
    """``lbw-stress full --out results`` reruns nothing and has nothing left to run: with the
    committed bases, the suite plans exactly the committed runs (sweeps included)."""
    meta = json.loads((RESULTS / "full" / "suite.json").read_text())
    committed = {r["run_id"] for r in stress.read_jsonl(RESULTS / "full" / "runs.jsonl")}
    full = stress.full()
    base = {k: v["base_lr"] for k, v in meta["base_lr"].items()}
    assert set(base) == {s.name for s in full.settings}
    planned = {r.run_id for r in stress.expand_sweep(full)}
    planned |= {r.run_id for r in stress.expand(full, base)}
    assert committed == planned
    runs = [r for r in stress.expand(full, base) if r.setting == "tiny_qwen2_5_3b"]
    boosted = [r for r in runs if r.method == "governor+clip+boost"]
    assert {r.lr_multiplier for r in boosted} == {0.1, 0.3, 1.0, 3.0, 10.0, 30.0}
    assert {r.fault for r in runs if r.method == "governor+clip"} == set(full.faults)


def _hand_made_suite(directory, ran, ppl_of):
    """A suite folder of hand-made records: ``ran`` maps a method to its multipliers, and
    ``ppl_of(mult, seed)`` gives a run's final perplexity; seeds 0 and 1."""
    from lbw.train.stress import report

    records = []
    for method, mults in ran.items():
        for mult in mults:
            for seed in (0, 1):
                ppl = ppl_of(mult, seed)
                lr = 1e-3 * mult
                records.append(
                    {
                        "run_id": f"m__{method}__{lr:.3e}__s{seed}",
                        "stage": "method",
                        "setting": "m",
                        "model": "tiny",
                        "lora_rank": 0,
                        "method": method,
                        "optimizer": {"adamw": "adamw", "governor": "lbw"}.get(method, "lbw+clip"),
                        "control": None,
                        "depends_on": None,
                        "lr_multiplier": mult,
                        "base_learning_rate": lr,
                        "learning_rate": lr,
                        "fault": "none",
                        "seed": seed,
                        "status": "completed",
                        "steps": 10,
                        "final_eval_ppl": ppl,
                        "best_eval_ppl": ppl,
                        "final_loss": 2.0,
                        "wall_time_s": 1.0,
                        "tokens_per_s": 100.0,
                        "compile_s": 0.1,
                        "loss_spikes": 0,
                        "evals": [[10, ppl, 1.0]],
                        "telemetry": {},
                    }
                )
    stress.add_targets(records)
    (directory / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "suite.json").write_text(json.dumps({"spec": {"name": "s"}}))
    return report.Suite(directory)


def test_the_report_shows_a_multiplier_that_only_some_methods_ran(tmp_path):
    """report.py reads the multipliers from runs.jsonl: a ×0.1 column appears, with "–" for
    the methods that do not run it."""
    from lbw.train.stress import report

    ran = {"adamw": (0.1, 1.0, 10.0), "governor+clip": (0.1, 1.0, 10.0), "governor": (1.0, 10.0)}
    suite = _hand_made_suite(
        tmp_path, ran, lambda m, seed: {0.1: 20.0, 1.0: 8.0, 10.0: 12.0}[m] + seed
    )
    table = report.ppl_table(suite, "m", "none")
    assert table[0] == "| method | ×0.1 (1e-04) | ×1 (1e-03) | ×10 (1e-02) |"
    assert "| governor | – | 8.50 ± 0.71 | 12.50 ± 0.71 |" in table
    assert "| governor+clip | 20.50 ± 0.71 | 8.50 ± 0.71 | 12.50 ± 0.71 |" in table
    text = report.write_report(tmp_path).read_text()
    assert "| governor | – | 8.50 ± 0.71 | 12.50 ± 0.71 |" in text
    assert "| governor | ×0.1 |" not in text  # No empty speed or telemetry rows.
    # The targets compare each pair over the multipliers both ran, and a too-low learning rate
    # is not a stress one.
    from lbw.train.stress import tables

    targets = "\n".join(tables.targets_block(suite, "m", "none"))
    assert "Stress LR ×0.1" not in targets
    assert "governor: 10.50 (governor+clip / governor = 1.000 over ×1, ×10)" in targets


def test_a_chaotic_cell_is_marked_and_explained(tmp_path):
    """A cell whose seeds' standard deviation is over 20 % of its mean gets ‡ and the note; a
    table without one gets neither."""
    from lbw.train.stress import report

    ran = {"adamw": (1.0, 10.0)}
    spread = {1.0: 0.1, 10.0: 8.0}  # ×10: 12 and 20, std 5.66 = 35 % of 16.
    suite = _hand_made_suite(tmp_path, ran, lambda m, seed: 12.0 + seed * spread[m])
    table = report.ppl_table(suite, "m", "none")
    assert "| adamw | 12.05 ± 0.07 | 16.00 ± 5.66 ‡ |" in table
    assert table[-1].startswith("‡ chaotic: the seeds' standard deviation is over 20 %")
    calm = _hand_made_suite(tmp_path, ran, lambda m, seed: 12.0 + seed * 0.1)
    assert not any("‡" in line for line in report.ppl_table(calm, "m", "none"))
