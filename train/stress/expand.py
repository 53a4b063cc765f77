"""Expansion of a :class:`~train.stress.spec.SuiteSpec` into runs: the base pre-trainings,
the base learning-rate sweep, then every method × setting × multiplier × fault × seed."""

from __future__ import annotations

import re
from collections.abc import Mapping

from lbw.train.config import TrainConfig
from lbw.train.stress.spec import BASELINE, Method, Run, Setting, SuiteSpec

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
    if _replayed(spec, setting, method, fault):
        values["log_every"] = 1  # The replay control needs this run's per-step scale.
    return values


def _replayed(spec: SuiteSpec, setting: Setting, method: Method, fault: str) -> bool:
    """Whether a replay control reads ``method``'s runs in ``setting`` under ``fault``."""
    names = spec.methods_of(setting)
    return any(
        m.control == "replay"
        and m.source == method.name
        and m.name in names
        and (fault == "none" or not spec.fault_methods or m.name in spec.fault_methods)
        for m in spec.methods
    )


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
            optimizer=BASELINE.optimizer,
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
    """The AdamW runs of :func:`~train.stress.runner.choose_base_lr` for the settings without a
    fixed base LR."""
    seed = spec.seeds[0]
    return [
        Run(
            run_id=run_id(s.name, BASELINE.name, lr, "none", seed),
            stage="sweep",
            setting=s.name,
            method=BASELINE.name,
            lr_multiplier=None,
            learning_rate=lr,
            fault="none",
            seed=seed,
            config=_config(spec, s, BASELINE, lr, "none", seed),
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
                    if method.lr_multipliers and mult not in method.lr_multipliers:
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
