"""A suite's results as the report reads them: the records of a suite directory
(:class:`Suite`), their statistics over seeds, and the numbers and tables in Markdown."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lbw.train import archive
from lbw.train.stress.records import read_jsonl
from lbw.train.stress.spec import Roles


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number (not None, NaN or Inf)."""
    return isinstance(x, int | float) and math.isfinite(x)


def final_ppl(r: Mapping[str, Any]) -> float:
    """Final perplexity, infinite for a run that stopped on NaN/Inf or overflowed."""
    return r["final_eval_ppl"] if finite(r["final_eval_ppl"]) else math.inf


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); infinite if any value is."""
    if not values:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# A cell whose seeds' standard deviation is more than this fraction of its mean is chaotic:
# its mean says little until more seeds are run.
CHAOTIC_SPREAD = 0.2
CHAOTIC_NOTE = (
    "‡ chaotic: the seeds' standard deviation is over 20 % of the mean, so the mean says little "
    "until more seeds run."
)


def chaotic(mean: float, std: float | None) -> bool:
    """Whether a finite ``mean ± std`` cell has a spread over :data:`CHAOTIC_SPREAD` of it."""
    finite_cell = std is not None and math.isfinite(mean) and math.isfinite(std)
    return finite_cell and std > CHAOTIC_SPREAD * abs(mean)


def fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    if math.isinf(mean):
        return "diverged"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _roles(meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Roles:
    """The roles from the suite's spec, or (a spec without methods) from the records."""
    if meta.get("spec", {}).get("methods"):
        return Roles.from_spec(meta["spec"])
    method_of = {r["run_id"]: r["method"] for r in records}
    methods: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["stage"] in ("method", "control"):
            methods.setdefault(
                r["method"],
                {
                    "name": r["method"],
                    "optimizer": r["optimizer"],
                    "control": r["control"],
                    "source": method_of.get(r["depends_on"]) if r["control"] else None,
                },
            )
    return Roles.of(list(methods.values()))


class Suite:
    """The loaded records of a suite directory."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        meta_path = self.dir / "suite.json"
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.records = read_jsonl(self.dir / "runs.jsonl")
        # Sweep-only runs (learning rates outside the multiplier grid) stay out of the tables.
        self.grid = [r for r in self.records if r["lr_multiplier"] is not None]
        self.settings = list(dict.fromkeys(r["setting"] for r in self.grid))
        self.faults = list(dict.fromkeys(r["fault"] for r in self.grid))
        self.roles = _roles(self.meta, self.records)
        ran = {r["method"] for r in self.grid}
        known = [n for n in self.roles.order if n in ran]
        self.methods = known + sorted(ran - set(known))
        self._archive: dict[str, dict[str, Any]] | None = None

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """A run's ``metrics.jsonl`` lines, from its folder or else from the suite's archive."""
        path = self.dir / "runs" / run_id / archive.METRICS
        if path.is_file():
            return read_jsonl(path)
        if self._archive is None:
            self._archive = archive.read(self.dir)
        return self._archive.get(run_id, {}).get("metrics", [])

    def select(self, **where) -> list[dict[str, Any]]:
        return [r for r in self.grid if all(r[k] == v for k, v in where.items())]

    def multipliers(self, setting: str, fault: str) -> list[float]:
        return sorted({r["lr_multiplier"] for r in self.select(setting=setting, fault=fault)})

    def lr_of(self, setting: str, mult: float) -> float:
        return next(
            r["base_learning_rate"]
            for r in self.grid
            if r["setting"] == setting and r["lr_multiplier"] == mult
        )

    def cell(self, setting: str, fault: str, method: str, mult: float, key=final_ppl):
        values = [
            key(r)
            for r in self.select(setting=setting, fault=fault, method=method, lr_multiplier=mult)
        ]
        return mean_std(values), len(values)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
