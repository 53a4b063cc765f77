"""The stress suite: a declarative matrix of training runs, expanded, run resumably, reported.

A :class:`SuiteSpec` names model settings (preset, overrides, LoRA or full), methods (registered
optimizers plus config overrides), learning-rate multipliers of a per-setting base learning
rate, faults and seeds. :func:`run_suite` runs it in three stages:

1. **Base learning rate** (:func:`choose_base_lr`): for every setting without a fixed
   ``base_lr``, AdamW runs over the setting's ``lr_grid`` (first seed, no fault) and the
   learning rate with the best final evaluation perplexity becomes the base. These runs have the
   same ids as the suite's own AdamW runs at those learning rates, so they are never run twice.
2. **Methods**: every method × setting × multiplier × fault × seed that reads no other run.
3. **Controls**, after the runs they read (same setting, learning rate, fault and seed):

   * ``effective-lr``: AdamW at the learning rate × the guarded run's mean applied scale
     (:func:`mean_scale`) — is the guard's benefit just a lower learning rate?
   * ``replay``: AdamW whose learning rate follows the guarded run's per-step applied-scale
     trace, open loop (:func:`train.peers.register_replay`) — is it just a schedule? The run
     it reads logs every step (``log_every=1``); nothing else does.

Runs write ``<out>/<suite>/runs/<run_id>/`` (``metrics.jsonl``, ``summary.json``); a run whose
``summary.json`` is complete is not run again, so an interrupted suite resumes where it stopped.
``<out>/<suite>/runs.jsonl`` holds one line per finished run (:func:`run_record`) and
``suite.json`` the spec and the chosen base learning rates; at the end every finished run's
``metrics.jsonl`` and ``summary.json`` go into the one compressed ``metrics.jsonl.xz``
(:mod:`train.archive`), which is what a committed suite keeps instead of ``runs/`` (unpacked
again when ``runs/`` is absent, so a fresh clone resumes). :mod:`train.report` turns them into
``summary.md`` and plots.

Definitions (also written into ``summary.md``):

* **loss spike**: after warm-up, a logged training loss (the mean over the suite's log interval)
  above ``spike_factor`` (1.5) × the lowest logged loss so far, or a non-finite one; counted
  once per excursion (the excursion ends at the first logged loss back under the threshold).
* **target perplexity** of a setting and fault: ``target_factor`` (1.10) × the best mean (over
  seeds) final perplexity of AdamW over the learning rates run. Steps and time to target are
  those of the first evaluation at or below it.
* **mean scale**: the mean over steps of the guard's applied scale (0 on a held step),
  ``1 − control_energy / steps`` (exact because the scale never exceeds 1).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from train import archive, peers  # peers registers the peers and the replay control.
from train.config import FaultConfig, TrainConfig, UserError

SPIKE_FACTOR = 1.5
TARGET_FACTOR = 1.10
FINISHED = ("completed", "nonfinite")
CONTROLS = ("effective-lr", "replay")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One method of a suite.

    Attributes:
      name: the label in tables and run ids (``governor``, ``adamw+clip0.5``).
      optimizer: the registered optimizer name (``train.optimizers``), ``adamw`` for controls.
      overrides: :class:`TrainConfig` fields to set (``policy``, ``clip_threshold``, …).
      control: ``None``, ``"effective-lr"`` or ``"replay"``.
      source: for a control, the name of the method whose run it reads.
      time_constants: the method's time constants as fractions of the run's ``steps``
        (factory keyword → fraction, e.g. ``{"recluster_every": 0.05}``); each run gets
        ``max(1, round(fraction × steps))`` in ``optimizer_args``.
      base_lr: a learning rate of the method's own that the multipliers scale instead of the
        setting's base (1.0 for the methods whose learning rate multiplies a learned step
        size); ``None``: the setting's.
    """

    name: str
    optimizer: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    control: str | None = None
    source: str | None = None
    time_constants: Mapping[str, float] = dataclasses.field(default_factory=dict)
    base_lr: float | None = None

    def resolved_time_constants(self, steps: int) -> dict[str, int]:
        """``time_constants`` in steps for a run of ``steps`` updates."""
        return {k: max(1, round(f * steps)) for k, f in self.time_constants.items()}

    def __post_init__(self):
        if (self.control is None) != (self.source is None):
            raise ValueError(f"method {self.name!r}: control and source go together.")
        if self.control is not None and self.control not in CONTROLS:
            raise ValueError(f"method {self.name!r}: control must be one of {CONTROLS}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """A model setting: preset, overrides, LoRA or full, and its base learning rate.

    Attributes:
      name: the label in tables and run ids.
      model: a preset of ``models.PRESETS``.
      model_overrides: fields of the preset to replace.
      lora_rank: 0 for full-parameter training, r > 0 for rank-r LoRA adapters.
      base_lr: the base learning rate, or ``None`` to choose it with :func:`choose_base_lr`
        over ``lr_grid`` as the suite's first stage.
      lr_grid: the AdamW sweep grid of :func:`choose_base_lr`.
      base_lr_note: how a fixed ``base_lr`` was measured (the command), for the report.
      pretrain: for LoRA, :class:`TrainConfig` fields of the cached base pre-training (full
        parameters, AdamW, the suite's first seed, no fault), e.g. ``{"learning_rate": 1e-3}``;
        it runs once, before everything else, and every run of the setting starts from its
        exported weights (``init_from``). ``None``: the runs start from a random base.
      methods: the names of the suite's methods this setting runs (empty: all of them).
      lr_multipliers: this setting's learning-rate multipliers (empty: the suite's).
      train: :class:`TrainConfig` fields that replace the suite's for this setting (e.g. a
        longer run: ``{"steps": 2000}``).
      seeds: this setting's seeds (empty: the suite's).
    """

    name: str
    model: str
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lora_rank: int = 0
    base_lr: float | None = None
    lr_grid: tuple[float, ...] = ()
    base_lr_note: str = ""
    pretrain: Mapping[str, Any] | None = None
    methods: tuple[str, ...] = ()
    lr_multipliers: tuple[float, ...] = ()
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = ()

    def __post_init__(self):
        if self.base_lr is None and not self.lr_grid:
            raise ValueError(f"setting {self.name!r}: give base_lr or an lr_grid to sweep.")
        if self.pretrain is not None and self.lora_rank == 0:
            raise ValueError(
                f"setting {self.name!r}: a base pre-training is for LoRA settings (lora_rank > 0)."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteSpec:
    """A declarative stress suite.

    Attributes:
      name: the suite's name (its directory under the output root).
      description: one paragraph for the report.
      settings: the model settings.
      methods: the methods, controls included (a control's source must be listed too).
      lr_multipliers: multipliers of each setting's base learning rate.
      faults: fault name → :class:`FaultConfig` fields (``"none"``: ``{}``).
      fault_settings: settings that run the faults other than ``"none"`` (empty: all).
      fault_multipliers: multipliers at which the faults run (empty: all).
      fault_methods: methods that run the faults other than ``"none"`` (empty: all).
      seeds: the seeds.
      train: :class:`TrainConfig` fields shared by every run (steps, data, sizes, …).
      device: the kind of machine the suite is meant for (for the report).
    """

    name: str
    description: str
    settings: tuple[Setting, ...]
    methods: tuple[Method, ...]
    lr_multipliers: tuple[float, ...]
    faults: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: {"none": {}}
    )
    fault_settings: tuple[str, ...] = ()
    fault_multipliers: tuple[float, ...] = ()
    fault_methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "CPU"

    def __post_init__(self):
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r}: duplicate method names {names}.")
        for m in self.methods:
            if m.source is not None and m.source not in names:
                raise ValueError(f"control {m.name!r} reads {m.source!r}, not in the suite.")
            if m.source is not None and self.method(m.source).control is not None:
                raise ValueError(f"control {m.name!r} reads another control.")
        for s in self.settings:
            unknown = sorted(set(s.methods) - set(names))
            if unknown:
                raise ValueError(f"setting {s.name!r} names unknown methods {unknown}.")
            for name in self.methods_of(s):
                source = self.method(name).source
                if source is not None and source not in self.methods_of(s):
                    raise ValueError(
                        f"setting {s.name!r} runs control {name!r} without its source {source!r}."
                    )
        unknown = sorted(set(self.fault_methods) - set(names))
        if unknown:
            raise ValueError(f"fault_methods names unknown methods {unknown}.")
        for name in self.fault_methods:
            source = self.method(name).source
            if source is not None and source not in self.fault_methods:
                raise ValueError(f"fault_methods has control {name!r} without {source!r}.")
        if "none" not in self.faults:
            raise ValueError("faults must include 'none'.")
        for fault in self.faults.values():
            FaultConfig(**fault)  # Validates.

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def methods_of(self, setting: Setting) -> list[str]:
        """The names of the methods ``setting`` runs, in the suite's order."""
        return [m.name for m in self.methods if not setting.methods or m.name in setting.methods]

    def replaced(self, **changes) -> SuiteSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclasses.dataclass(frozen=True)
class Run:
    """One expanded run. ``config`` holds the :class:`TrainConfig` fields except ``out_dir``;
    a control's ``optimizer``/``learning_rate`` are resolved from ``depends_on`` when it runs."""

    run_id: str
    stage: str  # "sweep", "method" or "control".
    setting: str
    method: str
    lr_multiplier: float | None
    learning_rate: float
    fault: str
    seed: int
    config: Mapping[str, Any]
    depends_on: str | None = None
    control: str | None = None
    base: str | None = None  # The run id of the setting's base pre-training, if any.


PRETRAIN = "base-pretrain"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def run_id(setting: str, method: str, learning_rate: float, fault: str, seed: int) -> str:
    """A stable id from what defines a run (its learning rate by value, not by multiplier)."""
    return _slug(f"{setting}__{method}__lr{learning_rate:.3e}__{fault}__s{seed}")


def _config(spec: SuiteSpec, setting: Setting, method: Method, lr: float, fault: str, seed: int):
    values = dict(spec.train)
    values.update(setting.train)
    values.update(
        model=setting.model,
        model_overrides=dict(setting.model_overrides),
        lora_rank=setting.lora_rank,
        optimizer=method.optimizer,
        learning_rate=lr,
        seed=seed,
        faults=dict(spec.faults[fault]),
        quiet=True,
    )
    values.update(method.overrides)
    if method.time_constants:
        steps = int(values.get("steps", TrainConfig.steps))
        args = dict(values.get("optimizer_args") or {})
        args.update(method.resolved_time_constants(steps))
        values["optimizer_args"] = args
    if any(m.control == "replay" and m.source == method.name for m in spec.methods):
        values["log_every"] = 1  # The replay control needs this run's per-step scale.
    return values


def pretrain_id(setting: Setting, spec: SuiteSpec) -> str | None:
    """The run id of ``setting``'s base pre-training, or ``None`` if it has none."""
    if setting.pretrain is None:
        return None
    lr = float(setting.pretrain.get("learning_rate", TrainConfig.learning_rate))
    return run_id(setting.name, PRETRAIN, lr, "none", spec.seeds[0])


def expand_pretrain(spec: SuiteSpec) -> list[Run]:
    """The base pre-training runs of the LoRA settings that have one: full parameters, AdamW,
    the suite's first seed, no fault, the suite's ``train`` fields then ``pretrain``'s."""
    runs = []
    for s in spec.settings:
        if s.pretrain is None:
            continue
        values = dict(spec.train)
        values.update(
            model=s.model,
            model_overrides=dict(s.model_overrides),
            optimizer="adamw",
            seed=spec.seeds[0],
            quiet=True,
        )
        values.update(s.pretrain)
        values.update(lora_rank=0, faults={})
        runs.append(
            Run(
                run_id=pretrain_id(s, spec),
                stage="pretrain",
                setting=s.name,
                method=PRETRAIN,
                lr_multiplier=None,
                learning_rate=float(values.get("learning_rate", TrainConfig.learning_rate)),
                fault="none",
                seed=spec.seeds[0],
                config=values,
            )
        )
    return runs


def expand_sweep(spec: SuiteSpec) -> list[Run]:
    """The AdamW runs of :func:`choose_base_lr` for the settings without a fixed base LR."""
    adamw = Method(name="adamw", optimizer="adamw")
    seed = spec.seeds[0]
    return [
        Run(
            run_id=run_id(s.name, "adamw", lr, "none", seed),
            stage="sweep",
            setting=s.name,
            method="adamw",
            lr_multiplier=None,
            learning_rate=lr,
            fault="none",
            seed=seed,
            config=_config(spec, s, adamw, lr, "none", seed),
            base=pretrain_id(s, spec),
        )
        for s in spec.settings
        if s.base_lr is None
        for lr in s.lr_grid
    ]


def expand(spec: SuiteSpec, base_lrs: Mapping[str, float] | None = None) -> list[Run]:
    """The suite's runs, methods before the controls that read them.

    Args:
      spec: the suite.
      base_lrs: base learning rate per setting name, for settings without a fixed one.

    Returns:
      The runs in execution order, setting by setting: the setting's runs that read no other
      run first (grouped so that the seeds of one configuration are adjacent and share a
      compiled step), then its controls. Ids are stable: the same spec and base LRs give the
      same ids.

    Raises:
      ValueError: if a setting's base learning rate is unknown.
    """
    base_lrs = dict(base_lrs or {})
    out = []
    for setting in spec.settings:
        methods, controls = [], []
        base = setting.base_lr if setting.base_lr is not None else base_lrs.get(setting.name)
        if base is None:
            raise ValueError(f"setting {setting.name!r} has no base learning rate yet.")
        names = spec.methods_of(setting)
        for fault in spec.faults:
            if fault != "none" and spec.fault_settings and setting.name not in spec.fault_settings:
                continue
            for mult in setting.lr_multipliers or spec.lr_multipliers:
                if (
                    fault != "none"
                    and spec.fault_multipliers
                    and mult not in spec.fault_multipliers
                ):
                    continue
                for method in spec.methods:
                    if method.name not in names or (
                        fault != "none"
                        and spec.fault_methods
                        and method.name not in spec.fault_methods
                    ):
                        continue
                    lr = float(f"{(method.base_lr or base) * mult:.6g}")
                    for seed in setting.seeds or spec.seeds:
                        run = Run(
                            run_id=run_id(setting.name, method.name, lr, fault, seed),
                            stage="control" if method.control else "method",
                            setting=setting.name,
                            method=method.name,
                            lr_multiplier=mult,
                            learning_rate=lr,
                            fault=fault,
                            seed=seed,
                            config=_config(spec, setting, method, lr, fault, seed),
                            depends_on=run_id(setting.name, method.source, lr, fault, seed)
                            if method.source
                            else None,
                            control=method.control,
                            base=pretrain_id(setting, spec),
                        )
                        (controls if method.control else methods).append(run)
        out += methods + controls
    return out


# ---------------------------------------------------------------------------------------------
# Reading runs.


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``summary.json`` if it is complete (a finished status), else ``None``."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("status") in FINISHED else None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def count_loss_spikes(
    lines: Iterable[Mapping[str, Any]], *, warmup: int, every: int, factor: float = SPIKE_FACTOR
) -> int:
    """Loss spikes in a run's train lines (see the module docstring for the definition).

    Lines logged more often than ``every`` steps are first averaged over windows of ``every``
    steps, so runs logged at different intervals are counted alike.
    """
    windows: dict[int, list[float | None]] = {}
    for line in lines:
        if line.get("kind") == "train" and line["step"] > warmup:
            windows.setdefault(-(-line["step"] // every), []).append(line.get("loss"))
    count, best, inside = 0, math.inf, False
    for key in sorted(windows):
        values = windows[key]
        if all(_finite(v) for v in values):
            loss = sum(values) / len(values)
            bad = loss > factor * best
            best = min(best, loss)
        else:
            bad = True
        if bad and not inside:
            count += 1
        inside = bad
    return count


def mean_scale(telemetry: Mapping[str, Any]) -> float | None:
    """The guard's mean applied scale over the run, ``1 − control_energy / steps``."""
    if "control_energy" not in telemetry or not telemetry.get("step"):
        return None
    return 1.0 - float(telemetry["control_energy"]) / float(telemetry["step"])


def scale_trace(lines: Iterable[Mapping[str, Any]], steps: int) -> list[float]:
    """The per-step applied scale from a run logged every step: the guard's
    ``effective_scale`` (its per-tensor limits included, 0 on a held step), or for older runs
    ``scale`` (0 on a held step).

    Raises:
      ValueError: if a step in ``1..steps`` has no telemetry line.
    """
    by_step = {}
    for line in lines:
        tel = line.get("telemetry") or {}
        if line.get("kind") != "train":
            continue
        if "effective_scale" in tel:
            by_step[line["step"]] = float(tel["effective_scale"])
        elif "scale" in tel:
            by_step[line["step"]] = 0.0 if tel.get("held") else float(tel["scale"])
    missing = [s for s in range(1, steps + 1) if s not in by_step]
    if missing:
        raise ValueError(
            f"the scale trace lacks steps {missing[:5]}…: the replayed run must log every step."
        )
    return [by_step[s] for s in range(1, steps + 1)]


def _telemetry_summary(tel: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "control_energy" in tel:
        out = {
            "mean_scale": mean_scale(tel),
            "control_active_steps": tel.get("control_active_steps"),
            "regime_switches": tel.get("regime_switches"),
            "control_energy": tel.get("control_energy"),
            "held_steps": tel.get("skipped_steps"),
            "final_scale": tel.get("scale"),
            "final_regime": tel.get("regime_name"),
        }
    elif "skipstep_skipped_steps" in tel:
        out = {"held_steps": tel["skipstep_skipped_steps"]}
    elif "zclip_clipped_steps" in tel:
        out = {"control_active_steps": tel["zclip_clipped_steps"]}
    return out


def run_record(run: Run, run_dir: Path, summary: Mapping[str, Any], spike_every: int):
    """The per-run line of ``runs.jsonl``; targets are filled in by :func:`add_targets`."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    evals = [
        [r["step"], r.get("eval_perplexity"), r.get("wall_time_s")]
        for r in lines
        if r.get("kind") == "eval"
    ]
    finite_evals = [e[1] for e in evals if _finite(e[1])]
    config = summary["config"]
    return {
        "run_id": run.run_id,
        "stage": run.stage,
        "setting": run.setting,
        "model": config["model"],
        "lora_rank": config["lora_rank"],
        "method": run.method,
        "optimizer": config["optimizer"],
        "control": run.control,
        "depends_on": run.depends_on,
        "lr_multiplier": run.lr_multiplier,
        "base_learning_rate": run.learning_rate,
        "learning_rate": config["learning_rate"],
        "fault": run.fault,
        "seed": run.seed,
        "status": summary["status"],
        "steps": summary["step"],
        "final_eval_ppl": summary.get("eval_perplexity")
        if summary["status"] == "completed"
        else None,
        "best_eval_ppl": min(finite_evals) if finite_evals else None,
        "final_loss": summary.get("loss"),
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "compile_s": summary.get("compile_s"),
        "loss_spikes": count_loss_spikes(lines, warmup=config["warmup_steps"], every=spike_every),
        "evals": evals,
        "telemetry": _telemetry_summary(summary.get("telemetry") or {}),
    }


def add_targets(records: list[dict[str, Any]], factor: float = TARGET_FACTOR) -> None:
    """Sets ``target_ppl``, ``steps_to_target`` and ``time_to_target_s`` of every record."""
    groups: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in records:
        if r["method"] == "adamw" and r["stage"] != "control":
            ppl = r["final_eval_ppl"]
            groups.setdefault((r["setting"], r["fault"]), {}).setdefault(
                r["base_learning_rate"], []
            ).append(ppl if _finite(ppl) else math.inf)
    for r in records:
        per_lr = groups.get((r["setting"], r["fault"]), {})
        means = [sum(v) / len(v) for v in per_lr.values()]
        best = min(means) if means else math.inf
        target = factor * best if math.isfinite(best) else None
        r["target_ppl"] = target
        r["steps_to_target"] = r["time_to_target_s"] = None
        if target is not None:
            for step, ppl, wall in r["evals"]:
                if _finite(ppl) and ppl <= target:
                    r["steps_to_target"], r["time_to_target_s"] = step, wall
                    break


# ---------------------------------------------------------------------------------------------
# Running.


BASE_MODEL = "model"  # The exported weights of a base pre-training run, in its run folder.


def _finished(runs_dir: Path, rid: str, stage: str) -> bool:
    """Whether run ``rid`` is done: a complete summary and, for a base pre-training, the
    exported model (not committed with results, so a fresh clone re-creates it)."""
    if read_summary(runs_dir / rid) is None:
        return False
    return stage != "pretrain" or (runs_dir / rid / BASE_MODEL / "config.json").is_file()


def _resolve(run: Run, runs_dir: Path) -> dict[str, Any]:
    """The run's TrainConfig fields, a control's learning rate/optimizer read from its source."""
    config = dict(run.config)
    if run.stage == "pretrain":
        config["export_to"] = str(runs_dir / run.run_id / BASE_MODEL)
    if run.base is not None:
        if not _finished(runs_dir, run.base, "pretrain"):
            raise RuntimeError(f"{run.run_id} needs the base {run.base}, which has not finished.")
        config["init_from"] = str(runs_dir / run.base / BASE_MODEL)
    if run.control is None:
        return config
    source_dir = runs_dir / run.depends_on
    source = read_summary(source_dir)
    if source is None:
        raise RuntimeError(f"control {run.run_id} needs {run.depends_on}, which has not finished.")
    if run.control == "effective-lr":
        scale = mean_scale(source.get("telemetry") or {})
        if scale is None:
            raise ValueError(f"{run.depends_on} has no guard telemetry to read a scale from.")
        config["learning_rate"] = float(f"{run.learning_rate * max(scale, 1e-6):.6g}")
        config["optimizer"] = "adamw"
    else:
        trace = scale_trace(read_jsonl(source_dir / "metrics.jsonl"), source["step"])
        config["optimizer"] = peers.register_replay(trace)
    return config


def _execute(runs: Sequence[Run], runs_dir: str) -> list[str]:
    """Runs ``runs`` in this process (a worker's task); returns their ids."""
    from train.loop import NonFiniteError, train

    done = []
    for run in runs:
        out_dir = Path(runs_dir) / run.run_id
        if not _finished(Path(runs_dir), run.run_id, run.stage):
            config = _resolve(run, Path(runs_dir))
            try:
                # An unfinished run (killed, or a base without its export) starts afresh.
                train(TrainConfig(**config, out_dir=str(out_dir), overwrite=True))
            except NonFiniteError:
                pass  # summary.json records "nonfinite"; the suite goes on.
        done.append(run.run_id)
    return done


def _groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that differ only in their seed, together: they share one compiled step."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.setting, run.method, run.learning_rate, run.fault, run.control is not None)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


class _Bar:
    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="run", desc=desc, dynamic_ncols=True)

    def update(self, n: int, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_stage(runs: Sequence[Run], runs_dir: Path, workers: int, bar: _Bar) -> None:
    todo = [r for r in runs if not _finished(runs_dir, r.run_id, r.stage)]
    groups = _groups(todo)
    if workers <= 1 or len(groups) <= 1:
        for group in groups:
            _execute(group, str(runs_dir))
            bar.update(len(group), group[0].run_id)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_execute, group, str(runs_dir)) for group in groups]
        for future in concurrent.futures.as_completed(futures):
            ids = future.result()
            bar.update(len(ids), ids[-1])


def choose_base_lr(
    spec: SuiteSpec, records: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The base learning rate of each setting: fixed, or the AdamW sweep's best.

    For a setting with ``base_lr=None``, AdamW runs at every learning rate of ``lr_grid`` (the
    suite's first seed, no fault); the learning rate with the lowest final evaluation
    perplexity is the base (a diverged run counts as infinite perplexity).

    Args:
      spec: the suite.
      records: run id → run record (:func:`run_record`) of the finished sweep runs.

    Returns:
      setting name → ``{"base_lr", "procedure", "grid": {lr: final ppl}}``.
    """
    out = {}
    for s in spec.settings:
        if s.base_lr is not None:
            out[s.name] = {"base_lr": s.base_lr, "procedure": s.base_lr_note or "fixed"}
            continue
        grid = {}
        for lr in s.lr_grid:
            record = records[run_id(s.name, "adamw", lr, "none", spec.seeds[0])]
            ppl = record["final_eval_ppl"]
            grid[f"{lr:.3g}"] = ppl if _finite(ppl) else None
        best = min(s.lr_grid, key=lambda lr: grid[f"{lr:.3g}"] or math.inf)
        out[s.name] = {
            "base_lr": best,
            "procedure": f"AdamW sweep over {list(s.lr_grid)}, seed {spec.seeds[0]}, "
            "lowest final eval perplexity",
            "grid": grid,
        }
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> dict[str, Any]:
    """The git commit of the code and the tracked library/training files changed since it."""
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "lbw_optax", "train")
    return {
        "git_commit": (_git("rev-parse", "HEAD") or "unknown").strip(),
        "uncommitted": sorted(line[3:] for line in (dirty or "").splitlines()),
    }


def _spike_every(spec: SuiteSpec) -> int:
    return int(spec.train.get("log_every", TrainConfig().log_every))


def collect(spec: SuiteSpec, runs: Sequence[Run], runs_dir: Path) -> list[dict[str, Any]]:
    """The records of the finished ``runs`` (targets added), in ``runs`` order."""
    records, seen = [], set()
    for run in runs:
        if run.run_id in seen:
            continue
        summary = read_summary(runs_dir / run.run_id)
        if summary is not None:
            records.append(run_record(run, runs_dir / run.run_id, summary, _spike_every(spec)))
            seen.add(run.run_id)
    add_targets(records)
    return records


def _write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def run_suite(
    spec: SuiteSpec,
    out: str | os.PathLike = "runs",
    *,
    workers: int = 1,
    progress: bool = True,
    command: str = "",
    machine: str = "",
    collect_only: bool = False,
) -> Path:
    """Runs (or resumes) ``spec`` under ``out/<name>`` and writes the report.

    With ``collect_only``, nothing runs: the finished runs of an interrupted suite are collected
    into ``runs.jsonl`` and the report (which says how many of the planned runs finished).

    Returns:
      The suite directory (``runs/``, ``runs.jsonl``, ``suite.json``, ``summary.md``, PNGs).
    """
    from train import report

    suite_dir = Path(out) / spec.name
    runs_dir = suite_dir / "runs"
    archive.restore(suite_dir)  # A committed suite without its run folders: unpack them.
    runs_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    version = code_version()  # At the start: the code the runs of this invocation use.
    if version["uncommitted"]:  # Keep the uncommitted changes the runs use, to reproduce them.
        patch = _git("diff", "HEAD", "--", *version["uncommitted"]) or ""
        (suite_dir / "code.patch").write_text(patch)
    already = {p.parent.name for p in runs_dir.glob("*/summary.json")}
    meta_path = suite_dir / "suite.json"
    if not collect_only:  # Written first, so that an interrupted suite keeps its record.
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.setdefault("spec", spec.to_dict())
        meta["time_constants"] = time_constants(spec)
        meta["started"] = dict(version, command=command, machine=machine)
        _write_json(meta_path, meta)

    sweep = expand_sweep(spec)
    sweep_ids = {r.run_id for r in sweep}
    # Before the sweep the total is an estimate that assumes every sweep run is a suite run.
    guess = {s.name: s.base_lr or s.lr_grid[0] for s in spec.settings}
    total = len({r.run_id for r in expand(spec, guess)} | sweep_ids)
    done = sum(read_summary(runs_dir / i) is not None for i in sweep_ids)
    bar = _Bar(total, done, progress, spec.name)
    pretrain = {r.run_id: r for r in expand_pretrain(spec)}

    def stage(runs: Sequence[Run]) -> None:
        """Runs ``runs``, after the base pre-trainings that their unfinished runs start from."""
        if collect_only:
            return
        todo = [r for r in runs if not _finished(runs_dir, r.run_id, r.stage)]
        bases = [pretrain[b] for b in dict.fromkeys(r.base for r in todo if r.base)]
        _run_stage(bases, runs_dir, workers, _Bar(0, 0, False, ""))
        _run_stage(todo, runs_dir, workers, bar)

    try:
        stage(sweep)
        swept = {r["run_id"]: r for r in collect(spec, sweep, runs_dir)}
        if collect_only and sweep_ids - set(swept):
            raise UserError(
                f"{suite_dir}: the base learning-rate sweep has not finished; nothing to collect "
                "(run the suite without --collect)."
            )
        base = choose_base_lr(spec, swept)
        runs = expand(spec, {k: v["base_lr"] for k, v in base.items()})
        ids = [r.run_id for r in runs]
        extra = len(sweep_ids - set(ids))
        if bar.bar is not None:
            bar.bar.total = len(ids) + extra
            bar.bar.n = (
                extra
                + sum(read_summary(runs_dir / i) is not None for i in ids if i not in sweep_ids)
                + len(sweep_ids & set(ids))
            )
            bar.bar.refresh()
        for setting in spec.settings:  # Setting by setting: an interrupted suite has whole ones.
            mine = [r for r in runs if r.setting == setting.name]
            stage([r for r in mine if r.control is None])
            stage([r for r in mine if r.control is not None])
    finally:
        bar.close()

    records = collect(spec, [*runs, *sweep], runs_dir)
    _write_jsonl(suite_dir / "runs.jsonl", records)
    archive.write(suite_dir, [*pretrain, *(r["run_id"] for r in records)])
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    ran = len({r["run_id"] for r in records} - already)
    meta.update(spec=spec.to_dict(), base_lr=base, planned_runs=len(set(ids) | sweep_ids))
    bases = {}
    for r in pretrain.values():
        summary = read_summary(runs_dir / r.run_id)
        if summary is not None:
            bases[r.setting] = {
                "run_id": r.run_id,
                "steps": summary["step"],
                "learning_rate": r.learning_rate,
                "final_eval_ppl": summary.get("eval_perplexity"),
            }
    if bases:
        meta["pretrain"] = bases
    meta["definitions"] = {"spike_factor": SPIKE_FACTOR, "target_factor": TARGET_FACTOR}
    meta["time_constants"] = time_constants(spec)
    if collect_only:
        if "git_commit" not in meta:  # The record of the interrupted invocation, if written.
            meta.update(meta.get("started") or dict(version, command=command, machine=machine))
        meta["collected_by"] = command
    elif ran or "git_commit" not in meta:  # A no-op invocation keeps the record of the real one.
        meta.update(
            version,
            command=command,
            machine=machine,
            last_invocation_s=round(time.perf_counter() - start, 1),
            runs_in_last_invocation=ran,
        )
    _write_json(meta_path, meta)
    report.write_report(suite_dir)
    return suite_dir


def time_constants(spec: SuiteSpec) -> dict[str, dict[str, dict[str, float]]]:
    """Method → factory keyword → ``{"fraction", "steps"}`` for the suite's run length."""
    steps = int(spec.train.get("steps", TrainConfig.steps))
    return {
        m.name: {
            k: {"fraction": f, "steps": m.resolved_time_constants(steps)[k]}
            for k, f in m.time_constants.items()
        }
        for m in spec.methods
        if m.time_constants
    }


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The suites.

# The shipped data, a tiny Qwen2.5-style model, a short cosine run: a ~10-minute CPU suite.
QUICK_TRAIN = dict(
    data="wikitext2",
    seq_len=64,
    batch_size=8,
    steps=200,
    warmup_steps=20,
    schedule="cosine",
    eval_every=50,
    eval_batches=4,
    log_every=5,
    checkpoint_every=0,
)

GOVERNOR = dict(policy="governor")
REFERENCE = dict(policy="reference")

# The peers' time constants as fractions of the run (the library defaults stay the papers',
# set for runs of 10k steps and more). SGG: T at 5 % of the steps, the top of the paper's
# 1-5 % (Appendix A), so 20 re-clusterings per run. SPAM: two moment resets per run (every
# third of it), the ramp and the no-clip window keeping their reference ratios to the
# interval (150 and 20 of 500). AdaGC and ZClip: warm-ups of 5 % of the run, half the
# learning-rate warm-up. Reduce-on-plateau: the loss averaged over 2.5 % of the run, so its
# patience of 10 such means is a quarter of the run.
TIME_CONSTANTS = {
    "sgg": {"recluster_every": 0.05},
    "lbw+sgg": {"recluster_every": 0.05},
    "spam": {"reset_interval": 1 / 3, "warmup_steps": 0.1, "clip_delay": 0.04 / 3},
    "adagc": {"warmup_steps": 0.05},
    "zclip": {"warmup_steps": 0.05},
    "reduce-on-plateau": {"accumulation_size": 0.025},
}


def _peer(name: str, optimizer: str | None = None, **kwargs) -> Method:
    """A method with the suite's time constants for ``optimizer`` (default: ``name``)."""
    optimizer = optimizer or name
    return Method(
        name=name, optimizer=optimizer, time_constants=TIME_CONSTANTS.get(optimizer, {}), **kwargs
    )


# The learning-rate-robust methods a user would pick instead of a governor. Prodigy and
# D-Adaptation run at their own base, 1.0 (a multiplier of the learned step), times the
# suite's multipliers; the others at the setting's base times the multipliers.
LR_FREE = (
    _peer("stable-adamw"),
    _peer("prodigy", base_lr=1.0),
    _peer("dadapt-adamw", base_lr=1.0),
    _peer("mechanic"),
    _peer("schedule-free-adamw"),
    _peer("reduce-on-plateau"),
    _peer("apply-if-finite"),
)


def _core_methods(clips: Sequence[float]) -> list[Method]:
    methods = [Method(name="adamw", optimizer="adamw")]
    for c in clips:
        label = "adamw+clip" if len(clips) == 1 else f"adamw+clip{c:g}"
        methods.append(Method(name=label, optimizer="adamw+clip", overrides={"clip_threshold": c}))
    methods += [
        Method(name="reference", optimizer="lbw", overrides=REFERENCE),
        Method(name="governor", optimizer="lbw", overrides=GOVERNOR),
        Method(
            name="governor+clip",
            optimizer="lbw+clip",
            overrides={**GOVERNOR, "clip_threshold": clips[0]},
        ),
        _peer("sgg"),
        _peer("governor+sgg", "lbw+sgg", overrides=GOVERNOR),
        _peer("zclip"),
        _peer("skip-step"),
    ]
    return methods


# The guard over another inner optimizer, beside that optimizer alone.
OTHER_INNER = ("lion", "governor(lion)")


def quick() -> SuiteSpec:
    """The default suite: CPU, about ten minutes on two quiet cores."""
    quick_methods = (
        *_core_methods([1.0]),
        *(m for m in LR_FREE if m.name in ("stable-adamw", "reduce-on-plateau")),
        Method(name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"),
        Method(name="lion", optimizer="lion"),
        Method(name="governor(lion)", optimizer="lbw", overrides={**GOVERNOR, "inner": "lion"}),
    )
    return SuiteSpec(
        name="quick",
        description=(
            "CPU suite: the shipped WikiText-2 sample, a 2-layer cut of the tiny Qwen2.5-3B-style "
            "preset (byte-level), full-parameter training, 200 steps of 8×64 tokens; twelve "
            "methods (the governor over clipping, StableAdamW, reduce-on-plateau and the "
            "effective-LR control included) at the sweep's base learning rate and two stress "
            "multipliers, two seeds; and Lion alone and governed at ×1 and ×10 of 1e-4. The "
            "peers' time constants are fractions of the run (see Time constants)."
        ),
        settings=(
            Setting(
                name="tiny_qwen2_5_3b",
                model="tiny_qwen2_5_3b",
                model_overrides={"num_layers": 2},
                lr_grid=(3e-4, 1e-3, 3e-3),
                methods=tuple(m.name for m in quick_methods if m.name not in OTHER_INNER),
            ),
            Setting(
                name="tiny_qwen2_5_3b+lion",
                model="tiny_qwen2_5_3b",
                model_overrides={"num_layers": 2},
                base_lr=1e-4,
                base_lr_note="a tenth of AdamW's base, within the Lion paper's 3-10x smaller",
                methods=OTHER_INNER,
                lr_multipliers=(1.0, 10.0),
            ),
        ),
        methods=quick_methods,
        lr_multipliers=(1.0, 3.0, 10.0),
        seeds=(0, 1),
        train=QUICK_TRAIN,
    )


FULL_TRAIN = dict(
    data="wikitext2",
    seq_len=64,
    batch_size=8,
    steps=300,
    warmup_steps=30,
    schedule="cosine",
    eval_every=50,
    eval_batches=8,
    log_every=5,
    checkpoint_every=0,
)

# Faults of the full suite, at fixed steps of its 300-step runs.
FULL_FAULTS = {
    "none": {},
    "grad-spike": {"grad_spike_steps": (150,), "grad_spike_factor": 1e4},
    "nan-loss": {"nan_loss_steps": (150,)},
    "corrupt": {"corrupt_start": 150, "corrupt_steps": 10},
    "lr-shock": {"lr_shock_start": 150, "lr_shock_steps": 10, "lr_shock_factor": 10.0},
}

# What the size ladder, TinyLlama and LoRA settings run: the baselines, both rules, the control.
LADDER_METHODS = ("adamw", "adamw+clip1", "reference", "governor", "effective-lr")


def full() -> SuiteSpec:
    """CPU, hours: every method and control, the size ladder, TinyLlama, LoRA, faults, 3 seeds."""
    qwen_grid = (3e-4, 1e-3, 3e-3, 1e-2)
    ladder = dict(methods=LADDER_METHODS, lr_multipliers=(1.0, 10.0), lr_grid=qwen_grid[:3])
    settings = (
        Setting(name="tiny_qwen2_5_3b", model="tiny_qwen2_5_3b", lr_grid=qwen_grid),
        Setting(
            name="tiny_qwen2_5_3b+lora8",
            model="tiny_qwen2_5_3b",
            lora_rank=8,
            pretrain={"learning_rate": 1e-3},
            methods=LADDER_METHODS,
            lr_multipliers=(1.0, 10.0),
            lr_grid=(1e-3, 3e-3, 1e-2),
        ),
        Setting(
            name="tiny_qwen2_5_3b+2000-steps",
            model="tiny_qwen2_5_3b",
            base_lr=3e-3,
            base_lr_note="the tiny_qwen2_5_3b sweep's choice at 300 steps",
            methods=("adamw", "adamw+clip1", "governor", "effective-lr"),
            lr_multipliers=(1.0, 10.0),
            train={"steps": 2000, "warmup_steps": 200, "eval_every": 250},
            seeds=(0, 1),
        ),
        Setting(name="tiny_tinyllama_1_1b", model="tiny_tinyllama_1_1b", **ladder),
        Setting(name="tiny_qwen2_5_7b", model="tiny_qwen2_5_7b", **ladder),
        Setting(name="tiny_qwen2_5_14b", model="tiny_qwen2_5_14b", **ladder),
    )
    methods = (
        *_core_methods([1.0, 0.5]),
        _peer("adagc"),
        _peer("spam"),
        *LR_FREE,
        Method(name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"),
        Method(
            name="effective-lr(reference)",
            optimizer="adamw",
            control="effective-lr",
            source="reference",
        ),
        Method(name="replay", optimizer="adamw", control="replay", source="governor"),
    )
    return SuiteSpec(
        name="full",
        description=(
            "CPU suite (about two hours on two cores): 300 steps of 8×64 byte-level tokens of the "
            "shipped WikiText-2 sample. The tiny Qwen2.5-3B-style preset (4 layers, full "
            "parameters) runs every method and control at ×1/×3/×10/×30 of its AdamW-swept base "
            "learning rate, clipping at 1.0 and 0.5, and each fault type (at ×1, the baselines, "
            "both rules and the peers), and the learning-rate-robust methods (StableAdamW, "
            "Prodigy and D-Adaptation at ×1-×30 of their own base 1.0, Mechanic, schedule-free "
            "AdamW, reduce-on-plateau, apply-if-finite). LoRA (rank 8, on a base pre-trained "
            "by AdamW for 300 steps), the TinyLlama-style preset (full parameters) and the "
            "size ladder (tiny Qwen2.5 7B/14B-style presets) run AdamW, clipping at 1.0, both "
            "rules and the effective-LR control at ×1 and ×10. Three seeds."
        ),
        settings=settings,
        methods=methods,
        lr_multipliers=(1.0, 3.0, 10.0, 30.0),
        faults=FULL_FAULTS,
        fault_settings=("tiny_qwen2_5_3b",),
        fault_multipliers=(1.0,),
        fault_methods=(
            "adamw",
            "adamw+clip1",
            "reference",
            "governor",
            "zclip",
            "skip-step",
            "adagc",
            "spam",
            "stable-adamw",
            "apply-if-finite",
        ),
        seeds=(0, 1, 2),
        train=FULL_TRAIN,
    )


def _wikitext103_cached() -> bool:
    """Whether ``datasets`` can load WikiText-103 here (reachable Hub or a local cache)."""
    try:
        import datasets

        datasets.load_dataset_builder("Salesforce/wikitext", "wikitext-103-raw-v1")
    except Exception:  # Offline, missing package: any error means "not available".
        return False
    return True


def paper() -> SuiteSpec:
    """For a GPU: the paper's learning rates on the largest presets that fit one device."""
    data = "wikitext103" if _wikitext103_cached() else "wikitext2"
    train = dict(
        data=data,
        seq_len=512,
        batch_size=8,
        steps=1000,
        warmup_steps=50,
        schedule="cosine",
        eval_every=100,
        eval_batches=32,
        log_every=10,
        checkpoint_every=0,
    )
    return SuiteSpec(
        name="paper",
        description=(
            f"GPU suite: data {data}; Qwen2.5-0.5B-style and TinyLlama-1.1B-style decoders "
            "(random initialisation, full-parameter), 1000 steps of 8×512 tokens; the paper's "
            "learning rates 1e-4 (calm) and the stress rates 1e-3 and 3e-3; three seeds."
        ),
        settings=(
            Setting(
                name="qwen2_5_0_5b",
                model="qwen2_5_0_5b",
                base_lr=1e-4,
                base_lr_note="the paper's calm learning rate",
            ),
            Setting(
                name="tinyllama_1_1b",
                model="tinyllama_1_1b",
                base_lr=1e-4,
                base_lr_note="the paper's calm learning rate",
            ),
        ),
        methods=(
            *_core_methods([1.0]),
            Method(
                name="effective-lr", optimizer="adamw", control="effective-lr", source="governor"
            ),
            Method(name="replay", optimizer="adamw", control="replay", source="governor"),
        ),
        lr_multipliers=(1.0, 10.0, 30.0),
        seeds=(0, 1, 2),
        train=train,
        device="GPU",
    )


def gpu() -> SuiteSpec:
    """For one GPU, within a budget (:mod:`train.gpu_suite`; its step count is set by a plan)."""
    from train import gpu_suite

    return gpu_suite.gpu()


SUITES: dict[str, Callable[[], SuiteSpec]] = {
    "quick": quick,
    "full": full,
    "paper": paper,
    "gpu": gpu,
}


# ---------------------------------------------------------------------------------------------
# The CLI.


def _machine() -> str:
    import platform

    import jax

    backend = jax.default_backend().upper()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    arch = platform.machine().replace("_", "-")
    return f"{os.cpu_count()}-core {arch} {backend}, {memory:.0f} GiB, JAX {jax.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """``lbw-stress [quick|full|paper|gpu] [--out results] [--workers N] [--seeds ...] [--quiet]
    [--budget-s S] [--steps N]``, or ``lbw-stress report DIR``."""
    from train.cli import ArgumentParser, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        p = ArgumentParser(
            prog="lbw-stress report", description="Regenerate a suite's report from its JSONL."
        )
        p.add_argument("directory", help="a suite directory, e.g. results/quick")
        args = p.parse_args(argv[1:])
        directory = Path(args.directory)
        if not directory.is_dir():
            p.error(f"no suite folder {str(directory)!r}; give the folder of a suite run")
        if not read_jsonl(directory / "runs.jsonl"):
            p.error(
                f"{str(directory)!r} holds no runs.jsonl with finished runs; give the folder of "
                "a suite run (e.g. results/quick), or write one from an interrupted suite's "
                "finished runs with 'lbw-stress SUITE --out ROOT --collect'"
            )
        from train import report

        path = report.write_report(directory)
        print(report.headline(directory))
        print(f"\nreport: {path}")
        return 0
    p = ArgumentParser(
        prog="lbw-stress",
        description="Run a stress suite (resumable: finished runs are not redone), then write "
        "summary.md, runs.jsonl and plots under OUT/SUITE. 'lbw-stress report DIR' regenerates "
        "a report from the JSONL alone.",
    )
    p.add_argument("suite", nargs="?", default="quick", choices=sorted(SUITES))
    p.add_argument(
        "--out",
        default="runs",
        help="output root (default: %(default)s; the committed results/ used --out results)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: min(2, CPU count) = %(default)s)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: write runs.jsonl and the report from the finished runs of an "
        "interrupted suite",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="gpu suite: its time budget in seconds, probe and compilation included (default: "
        "360); a plan that does not fit is refused before any run starts",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="gpu suite: steps per run (default: the most that fit the budget)",
    )
    args = p.parse_args(argv)
    spec = SUITES[args.suite]()
    plan = None
    if args.suite == "gpu" and not args.collect:
        from train import gpu_suite

        try:
            budget = gpu_suite.DEFAULT_BUDGET_S if args.budget_s is None else args.budget_s
            plan = gpu_suite.prepare(args.out, budget, steps=args.steps)
        except gpu_suite.BudgetError as e:
            print(f"lbw-stress: error: {e}", file=sys.stderr)
            return 2
        spec = plan.spec
    if args.seeds:
        spec = spec.replaced(seeds=tuple(args.seeds))
    command = "lbw-stress " + " ".join(argv) if argv else "lbw-stress"
    out = Path(args.out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                p.error(f"--out {str(out)!r}: {str(path)!r} is a file; give a folder")
            break
    try:
        suite_dir = run_suite(
            spec,
            args.out,
            workers=1 if args.suite == "gpu" else args.workers,  # One process shares compilations.
            progress=not args.quiet,
            command=command.strip(),
            machine=_machine(),
            collect_only=args.collect,
        )
    except UserError as e:
        print(f"lbw-stress: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "lbw-stress: interrupted; finished runs are kept: the same command resumes the suite, "
            "and --collect reports the finished runs",
            file=sys.stderr,
        )
        return 130
    if plan is not None:
        from train import gpu_suite

        gpu_suite.record_plan(suite_dir, plan)
    from train import report

    print(report.headline(suite_dir))
    print(f"\nreport: {suite_dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
