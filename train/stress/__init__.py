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
again when ``runs/`` is absent, so a fresh clone resumes). :mod:`train.stress.report` turns
them into ``summary.md`` and plots.

Definitions (also written into ``summary.md``):

* **loss spike**: after warm-up, a logged training loss (the mean over the suite's log interval)
  above ``spike_factor`` (1.5) × the lowest logged loss so far, or a non-finite one; counted
  once per excursion (the excursion ends at the first logged loss back under the threshold).
* **target perplexity** of a setting and fault: ``target_factor`` (1.10) × the best mean (over
  seeds) final perplexity of AdamW over the learning rates run. Steps and time to target are
  those of the first evaluation at or below it.
* **mean scale**: the mean over steps of the guard's applied scale (0 on a held step),
  ``1 − control_energy / steps`` (exact because the scale never exceeds 1).

The package's modules, each importing only those above it: :mod:`~train.stress.spec` (the
dataclasses and the roles the report reads), :mod:`~train.stress.expand`,
:mod:`~train.stress.records`, :mod:`~train.stress.report`, :mod:`~train.stress.runner`,
:mod:`~train.stress.gpu_plan` (the GPU suites' budget: probe, plan, deadline),
:mod:`~train.stress.suites` and :mod:`~train.stress.cli` (``lbw-stress``).
"""

from __future__ import annotations

from lbw.train.stress import report
from lbw.train.stress.cli import machine, main
from lbw.train.stress.expand import (
    PRETRAIN,
    expand,
    expand_pretrain,
    expand_sweep,
    pretrain_id,
    run_id,
    time_constants,
)
from lbw.train.stress.records import (
    FINISHED,
    add_targets,
    collect,
    count_loss_spikes,
    mean_scale,
    read_jsonl,
    read_summary,
    run_record,
    scale_trace,
)
from lbw.train.stress.runner import BASE_MODEL, choose_base_lr, code_version, run_suite
from lbw.train.stress.spec import (
    BASELINE,
    CONTROLS,
    SPIKE_FACTOR,
    TARGET_FACTOR,
    Method,
    Roles,
    Run,
    Setting,
    SuiteSpec,
)
from lbw.train.stress.suites import (
    FULL_FAULTS,
    FULL_TRAIN,
    GOVERNOR,
    LADDER_METHODS,
    LR_FREE,
    QUICK_TRAIN,
    REFERENCE,
    SUITES,
    TIME_CONSTANTS,
    full,
    gpu,
    gpu_depth,
    paper,
    quick,
)

__all__ = [
    "BASELINE",
    "BASE_MODEL",
    "CONTROLS",
    "FINISHED",
    "FULL_FAULTS",
    "FULL_TRAIN",
    "GOVERNOR",
    "LADDER_METHODS",
    "LR_FREE",
    "PRETRAIN",
    "QUICK_TRAIN",
    "REFERENCE",
    "SPIKE_FACTOR",
    "SUITES",
    "TARGET_FACTOR",
    "TIME_CONSTANTS",
    "Method",
    "Roles",
    "Run",
    "Setting",
    "SuiteSpec",
    "add_targets",
    "choose_base_lr",
    "code_version",
    "collect",
    "count_loss_spikes",
    "expand",
    "expand_pretrain",
    "expand_sweep",
    "full",
    "gpu",
    "gpu_depth",
    "machine",
    "main",
    "mean_scale",
    "paper",
    "pretrain_id",
    "quick",
    "read_jsonl",
    "read_summary",
    "report",
    "run_id",
    "run_record",
    "run_suite",
    "scale_trace",
    "time_constants",
]
