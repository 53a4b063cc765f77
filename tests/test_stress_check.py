"""``lbw-stress SUITE --check DIR``: the cells of a rerun whose mean final perplexity moved by more
than their spread, on hand-made ``runs.jsonl`` records."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from lbw.train import stress
from lbw.train.stress import check


def record(method, ppl, seed, *, mult=1.0, lr=1e-3, fault="none", setting="m", status=None):
    """A ``runs.jsonl`` line with what the check and the report's headline read."""
    diverged = ppl is None or not math.isfinite(ppl)
    return {
        "run_id": f"{setting}__{method}__lr{lr:.3e}__{fault}__s{seed}",
        "stage": "sweep" if mult is None else "method",
        "setting": setting,
        "model": "tiny",
        "lora_rank": 0,
        "method": method,
        "optimizer": "adamw" if method == "adamw" else "lbw",
        "control": None,
        "depends_on": None,
        "lr_multiplier": mult,
        "base_learning_rate": lr,
        "learning_rate": lr,
        "fault": fault,
        "seed": seed,
        "status": status or ("nonfinite" if diverged else "completed"),
        "final_eval_ppl": None if diverged else ppl,
    }


def old_records():
    return [
        # Unmoved: means 10.0 and 10.1, spread max(1.41, 1.41) = 1.41.
        record("adamw", 9.0, 0),
        record("adamw", 11.0, 1),
        # Moved: 8.0 ± 0.14 -> 9.0 ± 0.14.
        record("governor", 7.9, 0),
        record("governor", 8.1, 1),
        # Diverged on one seed (NaN as a null perplexity, or an infinite one).
        record("adamw", 20.0, 0, mult=10.0, lr=1e-2),
        record("adamw", None, 1, mult=10.0, lr=1e-2),
        record("governor", math.inf, 0, mult=10.0, lr=1e-2),
        record("governor", math.inf, 1, mult=10.0, lr=1e-2),
        # A cell the rerun lacks, under a fault; a sweep-only run.
        record("adamw", 12.0, 0, fault="spike"),
        record("adamw", 15.0, 0, mult=None, lr=3e-4),
    ]


def new_records():
    return [
        record("adamw", 9.1, 0),
        record("adamw", 11.1, 1),
        record("governor", 8.9, 0),
        record("governor", 9.1, 1),
        record("adamw", 21.0, 0, mult=10.0, lr=1e-2),  # Both seeds finite now: moved.
        record("adamw", 30.0, 1, mult=10.0, lr=1e-2),
        record("governor", math.inf, 0, mult=10.0, lr=1e-2),  # Still both diverged.
        record("governor", None, 1, mult=10.0, lr=1e-2),
        record("adamw", 15.0, 0, mult=None, lr=3e-4),  # The sweep run, unchanged.
        record("adamw+clip", 8.0, 0, mult=0.1, lr=1e-4),  # A new cell.
    ]


def by_key(rows):
    return {(r.key[2], r.key[3], r.key[1]): r for r in rows}


def test_cells_moved_unmoved_diverged_and_one_sided():
    rows = by_key(check.compare(old_records(), new_records()))
    assert len(rows) == 7
    same = rows["adamw", 1e-3, "none"]
    assert not same.moved and same.spread == pytest.approx(math.sqrt(2))
    assert same.old.mean == 10.0 and same.new.mean == pytest.approx(10.1)
    moved = rows["governor", 1e-3, "none"]
    assert moved.moved and moved.spread == pytest.approx(math.sqrt(0.02))
    assert moved.ratio == pytest.approx(9.0 / 8.0)
    escaped = rows["adamw", 1e-2, "none"]  # Seed 1 diverged before, not now.
    assert escaped.moved and escaped.old.diverged == {1} and not escaped.new.diverged
    assert math.isnan(escaped.ratio)  # Its means are over other seeds.
    assert not rows["governor", 1e-2, "none"].moved  # Diverged on every seed on both sides.
    assert not rows["adamw", 3e-4, "none"].moved and rows["adamw", 3e-4, "none"].multiplier is None
    gone = rows["adamw", 1e-3, "spike"]
    assert gone.new is None and not gone.moved
    new = rows["adamw+clip", 1e-4, "none"]
    assert new.old is None and new.multiplier == 0.1 and not new.moved
    # Rows: the old side's cells in order, then the new-only ones.
    assert [r.key[2] for r in check.compare(old_records(), new_records())][-1] == "adamw+clip"


def test_the_spread_is_the_larger_deviation_and_at_least_a_thousandth():
    old = [record("adamw", 10.0, 0), record("adamw", 10.0, 1)]  # Deviation 0.
    for new_ppl, moved in ((10.009, False), (10.011, True)):  # 0.1 % of 10 = 0.01.
        rows = check.compare(old, [record("adamw", new_ppl, 0), record("adamw", new_ppl, 1)])
        assert rows[0].moved is moved and rows[0].spread == pytest.approx(0.01)
    wide = [record("adamw", 9.0, 0), record("adamw", 13.0, 1)]  # New side: 11 ± 2.83.
    (row,) = check.compare(old, wide)
    assert row.spread == pytest.approx(math.sqrt(8)) and not row.moved
    (row,) = check.compare(wide, old)
    assert row.spread == pytest.approx(math.sqrt(8)) and not row.moved


def test_the_report_lines():
    rows = check.compare(old_records(), new_records())
    text = "\n".join(check.report(rows, "results/quick", "runs/quick"))
    assert text.startswith("Check of runs/quick against results/quick: 2 of 5 cells moved")
    assert "| m | none | governor | ×1 (1e-03) | 8.00 ± 0.14 | 9.00 ± 0.14 | 1.125 |" in text
    assert (
        "| m | none | adamw | ×10 (1e-02) | 20.00 ± 0.00 (1/2 diverged) | 25.50 ± 6.36 | – |"
        in (text)
    )
    assert "| adamw | ×1 (1e-03) |" not in text  # Unmoved cells are not listed.
    assert "Only in results/quick (1 cell):\n- m / spike / adamw / ×1 (1e-03): 12.00 ± 0.00" in text
    assert "Only in runs/quick (1 cell):\n- m / none / adamw+clip / ×0.1 (1e-04): 8.00 ± 0.00" in (
        text
    )
    quiet = check.report(check.compare(old_records(), old_records()), "a", "b")
    assert quiet == [
        "Check of b against a: 0 of 6 cells moved by more than their spread (mean final "
        "perplexity over seeds; spread: the larger seed standard deviation, at least 0.1% of "
        "the old mean; or other seeds diverged)."
    ]


def test_check_imports_nothing_of_the_stress_package():
    """A leaf module: records in, rows out (the CLI reads the files)."""
    tree = ast.parse(Path(check.__file__).read_text())
    modules = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    modules |= {
        a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
    }
    assert not any(m.startswith(("lbw", "train")) for m in modules), modules


def _write(directory: Path, records) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "suite.json").write_text(json.dumps({"spec": {"name": "quick"}}))


@pytest.fixture
def rerun(monkeypatch):
    """``run_suite`` patched out: it writes the given records as the rerun's ``runs.jsonl``."""
    calls = []

    def run_suite(spec, out, **kwargs):
        calls.append((spec.name, Path(out), kwargs))
        suite_dir = Path(out) / spec.name
        _write(suite_dir, calls_records[0])
        return suite_dir

    calls_records = [new_records()]
    monkeypatch.setattr(stress.cli, "run_suite", run_suite)
    monkeypatch.setattr(stress.cli, "machine", lambda: "test machine")
    return calls, calls_records


def test_cli_check_exit_status_and_table(tmp_path, capsys, rerun):
    calls, records = rerun
    _write(tmp_path / "reference", old_records())
    out = tmp_path / "out"
    argv = ["quick", "--out", str(out), "--check", str(tmp_path / "reference"), "--quiet"]
    assert stress.main(argv) == 1
    assert calls[0][:2] == ("quick", out)  # Reran into --out, not into the reference.
    text = capsys.readouterr().out
    assert "2 of 5 cells moved" in text and "| m | none | governor | ×1 (1e-03) |" in text
    records[0] = old_records()
    assert stress.main([*argv, "--collect"]) == 0  # Nothing moved.
    assert calls[1][2]["collect_only"] is True
    captured = capsys.readouterr()
    assert "0 of 6 cells moved" in captured.out
    assert "already holds runs" in captured.err  # The first call's rerun is not redone.


def test_cli_check_refuses_its_own_folder_and_a_folder_without_runs(tmp_path, capsys, rerun):
    calls, _ = rerun
    _write(tmp_path / "quick", old_records())
    with pytest.raises(SystemExit) as e:
        stress.main(["quick", "--out", str(tmp_path), "--check", str(tmp_path / "quick")])
    assert e.value.code == 2 and "give another --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stress.main(["quick", "--out", str(tmp_path / "o"), "--check", str(tmp_path / "none")])
    assert "no runs.jsonl with finished runs" in capsys.readouterr().err
    assert calls == []  # Refused before anything ran.
