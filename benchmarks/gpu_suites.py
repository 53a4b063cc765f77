"""The GPU evidence's stages 1 and 2: probe, plan and run a stress suite within its budget, and
pack the suites' reports and folders (:mod:`benchmarks.gpu_evidence`)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_machine import say
from lbw.train.stress import gpu_plan, report


def stage_suite(
    scale: gpu_plan.Scale,
    budget_s: float,
    work: Path,
    state: dict[str, Any],
    key: str,
) -> dict[str, Any]:
    """Probe, plan and run one suite within ``budget_s`` (probe included).

    Raises:
      gpu_plan.BudgetError: the plan does not fit.
    """
    start = time.perf_counter()
    probe_dir = work / f"{scale.name}-probe"
    with gpu_plan.Deadline(budget_s) as deadline:
        probe = gpu_plan.measure_probe(scale, probe_dir)
    if deadline.stopped:
        raise gpu_plan.BudgetError(f"the probe of {scale.name!r} outran its {budget_s:.0f} s")
    state[f"{key}_probe"] = probe  # The cost stage's unit of time, even if the plan is refused.
    the_plan = gpu_plan.plan(probe, budget_s, scale)
    say(f"{scale.name} plan: {json.dumps(the_plan.to_dict())}")
    state[f"{key}_plan"] = the_plan
    left = budget_s - (time.perf_counter() - start) - gpu_plan.RESERVE_S
    ran = gpu_plan.run_plan(
        the_plan,
        work,
        left,
        command=state["command"],
        machine=state["machine"]["summary"],
    )
    suite_dir = ran["suite_dir"]
    records = ran["records"]
    meta = json.loads((suite_dir / "suite.json").read_text())
    return {
        "plan": the_plan.to_dict(),
        "model": scale.model,
        "suite_dir": str(suite_dir),
        "stopped_at_budget": ran["stopped"],
        "runs_planned": the_plan.runs,
        "runs_finished": len(records),
        "suite_wall_s": round(ran["seconds"], 1),
        "probe_s": round(probe.wall_s, 1),
        "headline": report.headline(suite_dir),
        "per_method": gpu_plan.per_method(the_plan, records),
        "records": [{k: v for k, v in r.items() if k != "telemetry"} for r in records],
        "meta_seconds": meta.get("last_invocation_s"),
    }


def pack_suites(out: Path, work: Path, state: dict[str, Any]) -> None:
    """Copies the suites' reports into ``out`` and packs their folders and probes."""
    folders = []
    for key, target in (("suite", "suite-summary.md"), ("depth", "depth-summary.md")):
        result = state["results"].get(key)
        if not result:
            continue
        suite_dir = Path(result["suite_dir"])
        if (suite_dir / "summary.md").exists():
            shutil.copyfile(suite_dir / "summary.md", out / target)
        folders.append(suite_dir)
    for p in sorted(work.glob("*-probe")):
        folders.append(p)
    if not folders:
        return
    tmp = out / "suites.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in folders:
            tar.add(folder, arcname=folder.name)
    os.replace(tmp, out / "suites.tar.gz")
