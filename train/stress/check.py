"""Comparing two runs of a suite (``lbw-stress SUITE --check DIR``): the cells whose mean final
perplexity moved by more than their spread.

A **cell** is setting × fault × method × learning rate (the run's own, before a control scales
it; the base learning-rate sweep's runs are cells too). Its value on each side is the final
evaluation perplexity of each seed, a diverged run (stopped on NaN/Inf, or an overflowed
perplexity) counting as diverged rather than as a number.

The **spread** of a cell is the larger of the two sides' sample standard deviations over the
seeds' finite perplexities (the ``±`` of the reports' tables, so a flagged cell can be checked by
eye against the two ``summary.md``; not the range, which grows with the number of seeds), and at
least :data:`RTOL` of the old mean (below the tables' two decimals: a one-seed cell, whose
deviation is 0, is not flagged for the last digits of a float). A cell **moved** when its
diverged seeds differ between the sides, or when the means of its finite perplexities differ by
more than the spread. On a CPU the suites are deterministic, so a moved cell means the code or
the data changed; on hardware that is not, a shift of one spread happens by chance: a screen, not
a significance test.

Everything here is a pure function of the records of ``runs.jsonl``
(:func:`~train.stress.records.run_record`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

RTOL = 1e-3  # The least spread, as a fraction of the old mean.

Key = tuple[str, str, str, float]  # (setting, fault, method, learning rate)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One side's runs of a cell.

    Attributes:
      multiplier: the runs' learning-rate multiplier (``None``: sweep runs only).
      ppl: seed → final perplexity (``math.inf`` for a diverged run).
    """

    multiplier: float | None
    ppl: Mapping[int, float]

    @property
    def diverged(self) -> frozenset[int]:
        return frozenset(s for s, p in self.ppl.items() if not math.isfinite(p))

    @property
    def finite(self) -> list[float]:
        return [p for p in self.ppl.values() if math.isfinite(p)]

    @property
    def mean(self) -> float:
        """The mean of the finite perplexities (NaN if every seed diverged)."""
        return statistics.fmean(self.finite) if self.finite else math.nan

    @property
    def std(self) -> float:
        """The sample standard deviation of the finite perplexities (0 for one)."""
        return statistics.stdev(self.finite) if len(self.finite) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Row:
    """One cell of the comparison.

    Attributes:
      key: ``(setting, fault, method, learning rate)``.
      old, new: the two sides' cells (``None`` where a side lacks the cell).
      spread: the cell's spread (NaN where it is not compared by value).
      moved: whether the cell moved (``False`` where a side lacks it).
    """

    key: Key
    old: Cell | None
    new: Cell | None
    spread: float
    moved: bool

    @property
    def multiplier(self) -> float | None:
        for cell in (self.old, self.new):
            if cell is not None and cell.multiplier is not None:
                return cell.multiplier
        return None

    @property
    def ratio(self) -> float:
        """New mean / old mean (NaN unless both are finite, or where the diverged seeds differ:
        the means are then over other seeds)."""
        if self.old is None or self.new is None or self.old.diverged != self.new.diverged:
            return math.nan
        return self.new.mean / self.old.mean if self.old.mean else math.nan


def _ppl(record: Mapping[str, Any]) -> float:
    ppl = record.get("final_eval_ppl")
    finite = isinstance(ppl, int | float) and math.isfinite(ppl)
    return float(ppl) if finite and record.get("status", "completed") == "completed" else math.inf


def key(record: Mapping[str, Any]) -> Key:
    """A record's cell (its learning rate at six significant digits, as run ids are made)."""
    lr = float(f"{record['base_learning_rate']:.6g}")
    return (record["setting"], record["fault"], record["method"], lr)


def cells(records: Iterable[Mapping[str, Any]]) -> dict[Key, Cell]:
    """The cells of ``records`` (the lines of a ``runs.jsonl``), in the records' order."""
    mults: dict[Key, float | None] = {}
    ppl: dict[Key, dict[int, float]] = {}
    for r in records:
        k = key(r)
        ppl.setdefault(k, {})[r["seed"]] = _ppl(r)
        if mults.get(k) is None:
            mults[k] = r.get("lr_multiplier")
    return {k: Cell(mults[k], v) for k, v in ppl.items()}


def compare_cells(old: Cell, new: Cell) -> tuple[float, bool]:
    """The spread of a cell present on both sides and whether it moved."""
    if old.diverged != new.diverged:
        return math.nan, True
    if not old.finite:  # Every seed diverged on both sides.
        return math.nan, False
    spread = max(old.std, new.std, RTOL * abs(old.mean))
    return spread, abs(new.mean - old.mean) > spread


def compare(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Every cell of either side: the old records' cells in their order, then the new-only ones.

    Args:
      old: the records of the reference ``runs.jsonl``.
      new: the records of the rerun.

    Returns:
      One :class:`Row` per cell.
    """
    before, after = cells(old), cells(new)
    rows = []
    for k in [*before, *(k for k in after if k not in before)]:
        a, b = before.get(k), after.get(k)
        both = a is not None and b is not None
        spread, moved = compare_cells(a, b) if both else (math.nan, False)
        rows.append(Row(k, a, b, spread, moved))
    return rows


def fmt_cell(cell: Cell, spread: float | None = None) -> str:
    """``mean ± spread`` (default: the cell's own deviation), with the diverged seeds."""
    if not cell.finite:
        return "diverged"
    text = f"{cell.mean:.2f} ± {cell.std if spread is None or math.isnan(spread) else spread:.2f}"
    if cell.diverged:
        text += f" ({len(cell.diverged)}/{len(cell.ppl)} diverged)"
    return text


def _lr(row: Row) -> str:
    lr = f"{row.key[3]:.0e}"
    return f"×{row.multiplier:g} ({lr})" if row.multiplier is not None else f"{lr} (sweep)"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def moved_table(rows: Sequence[Row]) -> list[str]:
    """The moved cells: old ± spread, new ± spread, new / old."""
    out = []
    for row in rows:
        if row.moved:
            ratio = f"{row.ratio:.3f}" if math.isfinite(row.ratio) else "–"
            old, new = fmt_cell(row.old, row.spread), fmt_cell(row.new, row.spread)
            out.append([*row.key[:3], _lr(row), old, new, ratio])
    header = ["setting", "fault", "method", "LR", "old ± spread", "new ± spread", "new / old"]
    return _table(header, out)


def report(rows: Sequence[Row], old_name: str, new_name: str) -> list[str]:
    """The comparison's lines: the counts, the moved cells and the cells only one side has."""
    both = [r for r in rows if r.old is not None and r.new is not None]
    moved = [r for r in both if r.moved]
    lines = [
        f"Check of {new_name} against {old_name}: {len(moved)} of {len(both)} cells moved by "
        "more than their spread (mean final perplexity over seeds; spread: the larger seed "
        f"standard deviation, at least {RTOL:.1%} of the old mean; or other seeds diverged)."
    ]
    if moved:
        lines += ["", *moved_table(moved)]
    for side, name in (("old", old_name), ("new", new_name)):
        only = [r for r in rows if getattr(r, "new" if side == "old" else "old") is None]
        if only:
            lines += ["", f"Only in {name} ({len(only)} cell{'s' * (len(only) != 1)}):"]
            lines += [
                f"- {' / '.join(r.key[:3])} / {_lr(r)}: {fmt_cell(getattr(r, side))}" for r in only
            ]
    return lines
