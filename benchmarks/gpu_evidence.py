"""GPU evidence in one command: the GPU stress suites and the GPU cost figures, in one folder.

    benchmarks/gpu_evidence.sh OUT_DIR              # one GPU: at most 8 minutes, all included
    benchmarks/gpu_evidence.sh OUT_DIR --smoke      # the same code on a CPU, micro models, < 3 min
    python -m benchmarks.gpu_evidence OUT_DIR       # the same, where ``lbw`` imports already

The whole command has ``--total-budget-s`` (465 s from its start; Python's own start-up comes
on top). Stages, in order, each stopped at its budget (:class:`train.stress.gpu_plan.Deadline`)
and each writing what it has (the output files are rewritten after every stage and every part
of the cost stage):

1. ``suite``: ``lbw-stress gpu`` (:mod:`train.stress.gpu_plan`): probe, plan (×30 given up
   first, then steps; refused before any run when even that does not fit), the runs (×10 and
   ×1 and the control first, ×30 last), the report. Budget: ``--suite-budget-s`` (360 s), and
   never what the cost stage keeps (``guard_reserve_s``).
2. ``depth``: ``lbw-stress gpu-depth`` (``small_125m``, 1,000 steps, AdamW and ``lbw`` at ×10
   and ×1), only when what is left (less the cost stage's reserve) fits its probe and its plan;
   a plan that does not fit is skipped, not refused.
3. ``guard``: the cost of a train step: the training loop's own jitted, donated step (0.5B,
   bf16, the suite's batch) run back to back with one sync per round, in interleaved rounds;
   scanned: AdamW, clip 1.0, ``lbw`` (the default), the published rule and SGG; then a
   ``jax.profiler`` trace of one ``lbw`` step (its kernel time; the file kept as
   ``trace.xplane.pb`` under 16 MiB); the HLO bytes of the scanned steps (achieved GB/s against
   the card's peak); unrolled: AdamW and ``lbw``. Each part runs only if its estimate fits what
   is left, else it is recorded as skipped with the reason.
4. ``sgg`` and ``model_step`` (only with ``--stages``): SGG's optimizer step alone, and
   ``benchmarks/model_step.py`` tokens/s, when time is left.

OUT_DIR receives seven files, no folders: ``summary.md``, ``evidence.json`` (every figure and
run record, the command, the machine, the code version), ``suite-summary.md`` and
``depth-summary.md`` (the suites' reports), ``suites.tar.gz`` (both suite folders with every
run's metrics, plots and the probes), ``trace.xplane.pb`` and ``log.txt``. The runs go to
``--work-dir`` (default: a new temporary folder). Exit status: 0, or 2 when the main suite's
plan was refused, 1 when a stage failed (the others still run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lbw_optax
from lbw import models
from lbw.train import stress
from lbw.train.config import TrainConfig
from lbw.train.stress import gpu_plan, report

SGG_INTERVAL = 500  # sgg_adamw's default recluster_every, for the mean over an interval.
SGG_TIMED_INTERVAL = 4  # The timed states: a re-clustering step's work does not depend on it.
STAGES = ("suite", "depth", "guard", "sgg", "model_step")
DEFAULT_STAGES = ("suite", "depth", "guard")
OUTPUTS = (
    "summary.md",
    "evidence.json",
    "suite-summary.md",
    "depth-summary.md",
    "suites.tar.gz",
    "trace.xplane.pb",
    "log.txt",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    """What differs between the GPU run and the smoke mode.

    Attributes:
      scale, depth_scale: the two suites (:mod:`train.stress.gpu_plan`).
      total_budget_s: the whole command, from the start of :func:`main`.
      suite_budget_s: the main suite, its probe included.
      guard_reserve_s: what the suites leave for the cost stage whatever they plan.
      depth_min_s: the depth stage starts (with its probe) only when this much is left for it.
      guard_rounds, guard_steps: interleaved rounds, and donated steps per method per round.
      unrolled_compile_s: a guess of one unrolled step's compilation (the probe's is scanned),
        to decide whether the unrolled part of the cost stage fits.
      hlo_bytes_of: the scanned steps whose HLO bytes (one compilation each) are counted, in
        order: AdamW's and the default's before the unrolled part, the others after it.
    """

    scale: gpu_plan.Scale
    depth_scale: gpu_plan.Scale
    total_budget_s: float
    suite_budget_s: float
    guard_reserve_s: float
    depth_min_s: float
    guard_rounds: int
    guard_steps: int
    unrolled_compile_s: float
    hlo_bytes_of: tuple[str, ...]
    sgg_repeats: int
    model_presets: tuple[tuple[str, str], ...]  # (label, preset name).
    model_overrides: dict[str, Any]
    model_batch: int
    model_seq: int
    model_rounds: int
    model_steps: int


GPU_SIZES = Sizes(
    scale=gpu_plan.GPU,
    depth_scale=gpu_plan.DEPTH,
    total_budget_s=465.0,
    suite_budget_s=360.0,
    guard_reserve_s=75.0,
    depth_min_s=40.0,
    guard_rounds=6,
    guard_steps=5,
    unrolled_compile_s=45.0,  # 39.7 s measured for the unrolled governor on an H200.
    hlo_bytes_of=("adamw", "lbw_adamw", "adamw+clip(1.0)", "lbw(reference)", "sgg"),
    sgg_repeats=10,
    model_presets=(("0.5B", "qwen2_5_0_5b"), ("1.5B", "qwen2_5_1_5b")),
    model_overrides={},
    model_batch=8,
    model_seq=512,
    model_rounds=3,
    model_steps=4,
)
SMOKE_SIZES = Sizes(
    scale=gpu_plan.SMOKE,
    depth_scale=gpu_plan.DEPTH_SMOKE,
    total_budget_s=165.0,
    suite_budget_s=90.0,
    guard_reserve_s=45.0,
    depth_min_s=8.0,
    guard_rounds=2,
    guard_steps=2,
    unrolled_compile_s=3.0,
    hlo_bytes_of=("adamw", "lbw_adamw"),  # Each is a compilation: the CPU does the two first only.
    sgg_repeats=2,
    model_presets=(("0.5B stand-in", "tiny_qwen2_5_3b"), ("1.5B stand-in", "tiny_qwen2_5_7b")),
    model_overrides={"num_layers": 1},
    model_batch=2,
    model_seq=32,
    model_rounds=2,
    model_steps=2,
)


class _Tee:
    """Writes to a stream and to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self):
        self.log.flush()
        self.stream.flush()

    def isatty(self):
        return False


def say(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[gpu-evidence {stamp}] {message}", flush=True)


class Clock:
    """The command's budget: seconds left of the total, and what a stage may use."""

    def __init__(self, total_s: float):
        self.start, self.total_s = time.perf_counter(), total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


# ---------------------------------------------------------------------------------------------
# The record: command, machine, code.


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# Peak memory bandwidth (bytes/s) by device kind, from the vendors' data sheets.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100": 2.0e12}


def peak_bandwidth(kind: str) -> float | None:
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in kind), None)


def machine() -> dict[str, Any]:
    """Devices, versions and the host, as far as they can be read."""
    devices = []
    for d in jax.devices():
        entry = {"platform": d.platform, "kind": d.device_kind, "id": d.id}
        try:
            stats = d.memory_stats() or {}
        except Exception:  # Not every backend reports memory.
            stats = {}
        if "bytes_limit" in stats:
            entry["memory_gib"] = round(stats["bytes_limit"] / 2**30, 1)
        devices.append(entry)
    packages = (
        "jax",
        "jaxlib",
        "jax-cuda13-plugin",
        "jax-cuda13-pjrt",
        "jax-cuda12-plugin",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "numpy",
        "transformers",
        "safetensors",
        "datasets",
    )
    versions = {name: _version(name) for name in packages}
    out = {
        "backend": jax.default_backend(),
        "devices": devices,
        "versions": {k: v for k, v in versions.items() if v is not None},
        "python": platform.python_version(),
        "host": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}",
        "summary": stress.machine(),
        "memory_bandwidth_bytes_per_s": peak_bandwidth(devices[0]["kind"]) if devices else None,
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = "unavailable"  # No NVIDIA driver tool here (e.g. the CPU smoke run).
    return out


def where() -> dict[str, str]:
    """The folders our packages import from (with ``benchmarks/gpu_evidence.sh``'s links, or an
    install, they must be this checkout's)."""
    import benchmarks
    from lbw import train

    found = {"lbw.train": train, "lbw.models": models, "lbw_optax": lbw_optax}
    found["benchmarks"] = benchmarks
    return {k: str(Path(m.__file__).resolve().parent) for k, m in found.items()}


def code() -> dict[str, Any]:
    """The commit when this checkout is a git repository with git installed, else ``unknown``."""
    version = stress.code_version()
    version["code_dir"] = str(Path(where()["lbw.train"]).parent)
    version["imported_from"] = where()
    return version


# ---------------------------------------------------------------------------------------------
# Stages 1 and 2: the suites.


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


# ---------------------------------------------------------------------------------------------
# Stage 3: the cost of a train step.


def _stats(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "n": len(times),
    }


def loop_step(config: TrainConfig):
    """The training loop's own jitted step for ``config`` (shared with the loop's runs in this
    process through its caches), its model, and one batch of the shipped data."""
    from flax import nnx

    from lbw.train import build_model, make_train_step
    from lbw.train.data import Batches, load_text, tokenize
    from lbw.train.optimizers import set_peak_learning_rate

    tokenizer = models.load_tokenizer(None)
    model, wrt = build_model(config, tokenizer.vocab_size)
    _, tx = config.optim.build(config.steps, faults=config.faults, grad_accum=config.grad_accum)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    if config.peak_lr_in_state:
        set_peak_learning_rate(optimizer.opt_state, config.learning_rate)
    tokens = tokenize(load_text(config).train, tokenizer)
    batch = Batches(tokens, seq_len=config.seq_len, batch_size=config.batch_size, seed=0).next()
    step = nnx.cached_partial(make_train_step(config, wrt), model, optimizer)
    return step, model, jnp.asarray(batch)


# The cost stage's methods: label -> optimizer overrides. ``lbw_adamw`` is the default (the
# governor over AdamW clipped at 1.0).
GUARD_METHODS = {
    "adamw": dict(optimizer="adamw"),
    "adamw+clip(1.0)": dict(optimizer="adamw+clip", clip_threshold=1.0),
    "lbw_adamw": dict(optimizer="lbw+clip", policy="governor", clip_threshold=1.0),
    "lbw(reference)": dict(optimizer="lbw", policy="reference"),
    "sgg": dict(optimizer="sgg"),
}
# The unrolled 0.5B model compiles for about 40 s a program on a GPU: AdamW and the default.
UNROLLED = ("adamw", "lbw_adamw")
TRACED = "lbw_adamw"
# Kept when under this: what the lent machine returns is at most 16 MiB a file (< 20 MB).
TRACE_LIMIT_BYTES = 16 * 2**20


def time_back_to_back(step, batch, steps: int) -> float:
    """Seconds per step of ``steps`` donated steps run back to back, with one sync at the end
    (the loop's own rhythm: a host sync per step would time the harness)."""
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step(batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def kernel_time_s(xspace: bytes) -> float | None:
    """Σ of the GPU kernels' durations in a ``jax.profiler`` trace (the device streams' events),
    or ``None`` when the trace has no GPU plane."""
    data = jax.profiler.ProfileData.from_serialized_xspace(xspace)
    total, found = 0, False
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                found = True
                total += sum(event.duration_ns for event in line.events)
    return total * 1e-9 if found else None


def trace_steps(step, batch, steps: int, out: Path) -> dict[str, Any]:
    """A ``jax.profiler`` trace of ``steps`` steps; its kernel time, and its file kept in ``out``
    as ``trace.xplane.pb`` when under :data:`TRACE_LIMIT_BYTES`."""
    folder = Path(tempfile.mkdtemp(prefix="trace-"))
    jax.block_until_ready(step(batch))
    with jax.profiler.trace(str(folder)):
        time_back_to_back(step, batch, steps)
    files = sorted(folder.rglob("*.xplane.pb"))
    if not files:
        return {"kept": False, "reason": "no trace file was written"}
    raw = files[0].read_bytes()
    kernel_s = kernel_time_s(raw)
    result = {"steps": steps, "bytes": len(raw), "kept": len(raw) <= TRACE_LIMIT_BYTES}
    if kernel_s is not None:
        result["kernel_ms_per_step"] = 1e3 * kernel_s / steps
    if result["kept"]:
        shutil.copyfile(files[0], out / "trace.xplane.pb")
    shutil.rmtree(folder, ignore_errors=True)
    return result


def train_step_bytes(config: TrainConfig, model) -> float:
    """The bytes the train step of ``config`` moves on this device, from its optimized HLO
    (``benchmarks.hlo_kernels``, compiled from abstract shapes): with the measured time, the
    bandwidth it achieves."""
    from flax import nnx

    from benchmarks import gpu_compile, hlo_kernels

    _, tx = config.optim.build(config.steps, faults=config.faults, grad_accum=config.grad_accum)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, rest))
    text = gpu_compile.train_step_text(
        tx, graphdef, *abstract, jax.devices()[0], config.batch_size, config.seq_len
    )
    return hlo_kernels.count(text, bandwidth=1.0, peak_flops=1.0).bytes


def guard_config(sizes: Sizes, steps: int, layout: str, overrides: dict[str, Any]) -> TrainConfig:
    """The suite's config of a method (its compiled step is the suite's when it ran there)."""
    scale = sizes.scale
    fields = gpu_plan.train_fields(scale, steps)
    fields["scan_layers"] = layout == "scanned"
    return TrainConfig(
        **{
            **fields,
            "model": scale.model,
            "model_overrides": dict(scale.model_overrides),
            "learning_rate": gpu_plan.CALM_LR,
            "quiet": True,
            **overrides,
        }
    )


def time_layout(
    sizes: Sizes, steps: int, layout: str, labels: tuple[str, ...], result: dict[str, Any]
) -> dict[str, tuple]:
    """Builds and times ``labels`` in ``layout``: interleaved rounds (the order reversed every
    other round), ratios against AdamW's in each round; fills ``result["methods"]``."""
    programs = {}
    for name in labels:
        config = guard_config(sizes, steps, layout, GUARD_METHODS[name])
        step, model, batch = loop_step(config)
        start = time.perf_counter()
        jax.block_until_ready(step(batch))
        programs[name] = (step, batch, config, model, time.perf_counter() - start)
    times: dict[str, list[float]] = {name: [] for name in programs}
    rounds: list[dict[str, float]] = []
    order = list(programs)
    for r in range(sizes.guard_rounds):
        this_round = {}
        for name in order if r % 2 == 0 else order[::-1]:
            step, batch = programs[name][:2]
            this_round[name] = time_back_to_back(step, batch, sizes.guard_steps)
            times[name].append(this_round[name])
        rounds.append(this_round)
    for name in programs:
        per_round = [r[name] / r["adamw"] for r in rounds]
        result["methods"][f"{name} [{layout}]"] = {
            **_stats(times[name]),
            "ratio": statistics.median(times[name]) / statistics.median(times["adamw"]),
            "round_ratio_min": min(per_round),
            "round_ratio_max": max(per_round),
            "first_call_s": programs[name][4],
        }
    return programs


def stage_guard(
    sizes: Sizes, steps: int, clock: Clock, state: dict[str, Any], out: Path, save: Callable
) -> dict[str, Any]:
    """The cost stage, part by part, each only if its estimate fits what is left; the result
    is saved after every part, so a stop at the deadline keeps what was measured."""
    scale = sizes.scale
    probe = state.get("suite_probe") or state.get("depth_probe")
    compile_s = probe.compile_s if probe else 2 * sizes.unrolled_compile_s / 3
    step_s = probe.step_s if probe else 0.1
    timing_s = sizes.guard_rounds * sizes.guard_steps * step_s
    result: dict[str, Any] = {
        "batch": [scale.batch_size, scale.seq_len],
        "model": scale.model,
        "methods": {},
        "peak_bandwidth": state["machine"].get("memory_bandwidth_bytes_per_s"),
        "rounds": sizes.guard_rounds,
        "steps_per_round": sizes.guard_steps,
        "skipped": {},
    }
    state["results"]["guard"] = result

    def fits(part: str, need: float) -> bool:
        if clock.left() >= need:
            say(f"guard: {part} (about {need:.0f} s, {clock.left():.0f} s left)")
            return True
        result["skipped"][part] = f"needs about {need:.0f} s, {clock.left():.0f} s left"
        say(f"guard: {part} skipped ({result['skipped'][part]})")
        return False

    # Compiled by the suite's runs: AdamW, clip and the default in the scanned layout.
    suite_ran = {"adamw", "adamw+clip(1.0)", "lbw_adamw"} if state.get("suite_plan") else set()
    scanned = tuple(GUARD_METHODS)
    new = [n for n in scanned if n not in suite_ran]
    need = len(new) * compile_s + len(scanned) * (2.0 + timing_s)
    programs = {}
    if fits("scanned", need):
        programs = time_layout(sizes, steps, "scanned", scanned, result)
        save()
    if TRACED in programs and fits("trace", 5.0 + 3 * step_s):
        step, batch = programs[TRACED][:2]
        result["trace"] = trace_steps(step, batch, steps=1, out=out)
        result["trace"]["method"] = f"{TRACED} [scanned]"
        if "kernel_ms_per_step" in result["trace"]:
            result["trace"]["train_step_ms"] = result["methods"][f"{TRACED} [scanned]"]["median_ms"]
        save()
    peak = result["peak_bandwidth"]

    def hlo_bytes(name: str) -> None:
        config, model = programs[name][2:4]
        m = result["methods"][f"{name} [scanned]"]
        m["hlo_gb"] = train_step_bytes(config, model) / 1e9
        m["achieved_gb_s"] = m["hlo_gb"] / (1e-3 * m["median_ms"])
        if peak:
            m["of_peak"] = 1e9 * m["achieved_gb_s"] / peak
        save()

    first, later = sizes.hlo_bytes_of[:2], sizes.hlo_bytes_of[2:]
    for name in first:
        if name in programs and fits(f"HLO bytes of {name}", compile_s):
            hlo_bytes(name)
    kept = {n: programs[n] for n in later if n in programs}
    del programs
    gc.collect()
    # Never below the probe's (scanned) compilation: a slow machine compiles slowly.
    unrolled_compile_s = max(sizes.unrolled_compile_s, compile_s)
    need = len(UNROLLED) * (unrolled_compile_s + 2.0 + timing_s)
    if fits("unrolled", need):
        unrolled = time_layout(sizes, steps, "unrolled", UNROLLED, result)
        del unrolled
        gc.collect()
        save()
    programs = kept
    for name in later:
        if name in programs and fits(f"HLO bytes of {name}", compile_s):
            hlo_bytes(name)
    return result


# ---------------------------------------------------------------------------------------------
# Stage 4: SGG's optimizer step.


def stage_sgg(sizes: Sizes, state: dict[str, Any]) -> dict[str, Any]:
    from flax import nnx

    config = models.get_config(sizes.scale.model, **sizes.scale.model_overrides)
    model = models.Decoder(config, rngs=nnx.Rngs(0))  # The unrolled 0.5B parameter tree.
    params = nnx.state(model, nnx.Param).to_pure_dict()
    del model
    n_params = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    lr = gpu_plan.CALM_LR
    txs = {
        "adamw": optax.adamw(lr),
        "sgg_adamw": lbw_optax.sgg_adamw(lr, recluster_every=SGG_TIMED_INTERVAL),
    }

    def update(tx):
        def step(grads, opt_state, params):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.jit(step)

    timers, compile_s = {}, {}
    for name, tx in txs.items():
        fn = update(tx)
        opt_state = tx.init(params)
        start = time.perf_counter()
        _, after_one = jax.block_until_ready(fn(grads, opt_state, params))
        compile_s[name] = time.perf_counter() - start
        if name == "adamw":
            timers["adamw"] = (fn, after_one)
            continue
        timers["sgg_adamw ordinary step"] = (fn, after_one)  # Update 2: no re-clustering.
        s = after_one
        for _ in range(SGG_TIMED_INTERVAL - 1):
            _, s = fn(grads, s, params)
        timers["sgg_adamw re-clustering step"] = (fn, jax.block_until_ready(s))
    times: dict[str, list[float]] = {name: [] for name in timers}
    for r in range(sizes.sgg_repeats):
        for name in timers if r % 2 == 0 else list(timers)[::-1]:
            fn, opt_state = timers[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(grads, opt_state, params))
            times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {"parameters": n_params, "steps": {}}
    base = statistics.median(times["adamw"])
    for name, ts in times.items():
        result["steps"][name] = {**_stats(ts), "ratio": statistics.median(ts) / base}
    ordinary = statistics.median(times["sgg_adamw ordinary step"])
    recluster = statistics.median(times["sgg_adamw re-clustering step"])
    mean = ((SGG_INTERVAL - 1) * ordinary + recluster) / SGG_INTERVAL
    result["mean_over_interval"] = {
        "interval": SGG_INTERVAL,
        "median_ms": 1e3 * mean,
        "ratio": mean / base,
    }
    guard = state["results"].get("guard", {}).get("methods", {}).get("adamw [unrolled]")
    if guard:  # The whole train step: AdamW's, plus SGG's extra optimizer time.
        train_ms = guard["median_ms"]
        extra_ms = 1e3 * (mean - base)
        result["implied_train_step_ratio"] = (train_ms + extra_ms) / train_ms
    result["first_call_s"] = compile_s
    return result


# ---------------------------------------------------------------------------------------------
# Stage 5: tokens/s of model_step.py's train step.


def stage_model_step(sizes: Sizes, label: str, preset: str) -> dict[str, Any]:
    from benchmarks import model_step

    args = argparse.Namespace(batch=sizes.model_batch, seq=sizes.model_seq, warmup=2)
    config = models.get_config(preset, dtype=jnp.bfloat16, **sizes.model_overrides)
    runs = [model_step.Run(config, mode, args) for mode in ("full", "lora")]
    for _ in range(sizes.model_rounds):
        for run in runs:
            run.time_steps(sizes.model_steps)
    out = {}
    for run in runs:
        tokens = run.tokens_per_step
        out[run.mode] = {
            "preset": preset,
            "label": label,
            "parameters": models.count_params(config),
            "tokens_per_s_median": tokens / statistics.median(run.times),
            "tokens_per_s_min": tokens / max(run.times),
            "tokens_per_s_max": tokens / min(run.times),
            "compile_s": run.compile_s,
            "batch": [sizes.model_batch, sizes.model_seq],
        }
    del runs
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------
# Writing.


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def suite_lines(title: str, result: dict[str, Any], file: str) -> list[str]:
    """A suite's plan, what it ran, its final perplexities, its times to target and its runs'
    wall clock against the plan's estimate."""
    p = result["plan"]
    dropped = "; ".join(p["dropped"]) or "nothing"
    stopped = " It was stopped at its budget." if result["stopped_at_budget"] else ""
    lines = [
        "",
        f"## {title}",
        "",
        f"Plan: {p['runs']} runs of {p['steps']} steps at "
        + ", ".join(f"×{m:g}" for m in sorted(p["multipliers"]))
        + f", {p['compilations']} compilations; estimated {p['estimate_s']} s (× {p['margin']}) "
        f"of the {p['available_s']} s its probe ({result['probe_s']} s) left in a "
        f"{p['budget_s']:.0f} s budget; given up to fit: {dropped}. {result['runs_finished']} of "
        f"{result['runs_planned']} runs finished in {result['suite_wall_s']} s.{stopped} Probe: "
        f"{json.dumps(p['probe'])}. Full report: `{file}`; every run's metrics: "
        "`suites.tar.gz`.",
        "",
        result["headline"],
    ]
    records = result["records"]
    if records:
        target = next((r["target_ppl"] for r in records if r.get("target_ppl")), None)
        lines += [
            "",
            f"Time to the target perplexity ({_f(target, 2)}: 1.10 × AdamW's best final "
            "perplexity over the learning rates run), first evaluation at or below it:",
            "",
            "| method | LR | final ppl | steps to target | time to target (s) | wall (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(records, key=lambda r: (r["method"], r["lr_multiplier"])):
            lines.append(
                f"| {r['method']} | ×{r['lr_multiplier']:g} | {_f(r['final_eval_ppl'], 2)} | "
                f"{r['steps_to_target'] if r['steps_to_target'] is not None else '–'} | "
                f"{_f(r['time_to_target_s'], 1)} | {_f(r['wall_time_s'], 1)} |"
            )
        lines += [
            "",
            "Wall clock of a run, estimated from the probe before the runs, and measured (the "
            "first run of a method compiles):",
            "",
            "| method | estimated s (first run) | measured s, each run | compilation s, each run |",
            "|---|---|---|---|",
        ]
        for name, m in result["per_method"].items():
            lines.append(
                f"| {name} | {m['estimated_run_s']:.1f} ({m['estimated_first_run_s']:.1f}) | "
                + ", ".join(_f(x, 1) for x in m["measured_run_s"])
                + " | "
                + ", ".join(_f(x, 1) for x in m["compile_s"])
                + " |"
            )
    return lines


def summary_md(state: dict[str, Any]) -> str:
    ev = state["evidence"]
    res = state["results"]
    lines = [
        f"# GPU evidence{' (smoke mode: CPU, micro models)' if ev['smoke'] else ''}",
        "",
        f"- command: `{ev['command']}`",
        f"- started {ev['started']}, wall clock {_f(ev.get('wall_s'), 0)} s of a "
        f"{ev['budgets']['total_s']:.0f} s budget, exit status {ev.get('exit_status', 'running')}",
        f"- machine: {ev['machine']['summary']}; devices: "
        + ", ".join(
            f"{d['kind']}" + (f" {d['memory_gib']} GiB" if "memory_gib" in d else "")
            for d in ev["machine"]["devices"]
        ),
        f"- versions: {', '.join(f'{k} {v}' for k, v in ev['machine']['versions'].items())}",
        f"- code: commit {ev['code']['git_commit']}"
        + (f", uncommitted: {ev['code']['uncommitted']}" if ev["code"].get("uncommitted") else "")
        + f"; imported from {ev['code']['code_dir']}",
        "",
        "| stage | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, st in ev["stages"].items():
        lines.append(
            f"| {name} | {st['status']} | {_f(st.get('seconds'), 1)} | {st.get('reason', '')} |"
        )
    for key, title, file in (
        ("suite", "LR-stress suite", "suite-summary.md"),
        ("depth", "Depth suite", "depth-summary.md"),
    ):
        if res.get(key):
            r = res[key]
            heading = f"{title} ({r['model']}, {r['plan']['steps']} steps)"
            lines += suite_lines(heading, r, file)
    guard = res.get("guard")
    if guard and guard["methods"]:
        lines += [
            "",
            f"## Train-step cost ({guard['model']}, batch "
            f"{guard['batch'][0]}×{guard['batch'][1]}, donated steps back to back, "
            f"{guard['rounds']} interleaved rounds of {guard['steps_per_round']} steps, one sync "
            "per round; ratios against AdamW in the same layout)",
            "",
            "| method [layout] | median ms (min–max) | × adamw | per-round ratio min–max "
            "| HLO GB | achieved GB/s | of peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in guard["methods"].items():
            lines.append(
                f"| {name} | {m['median_ms']:.2f} ({m['min_ms']:.2f}–{m['max_ms']:.2f}) | "
                f"{m['ratio']:.4f} | {m['round_ratio_min']:.4f}–{m['round_ratio_max']:.4f} | "
                f"{_f(m.get('hlo_gb'))} | {_f(m.get('achieved_gb_s'), 0)} | "
                f"{_f(m.get('of_peak'))} |"
            )
        trace = guard.get("trace", {})
        if trace.get("steps"):
            kernel = trace.get("kernel_ms_per_step")
            lines += [
                "",
                f"Profiler trace of {trace['steps']} {trace['method']} step: "
                + (
                    f"{kernel:.2f} ms of kernels against {trace['train_step_ms']:.2f} ms of wall "
                    "clock per step"
                    if kernel
                    else "no GPU kernels in it (no GPU)"
                )
                + (
                    " (`trace.xplane.pb`)."
                    if trace.get("kept")
                    else f" ({trace['bytes'] / 2**20:.1f} MiB, not kept)."
                ),
            ]
        for part, why in guard.get("skipped", {}).items():
            lines.append(f"- skipped: {part} ({why})")
    sgg = res.get("sgg")
    if sgg:
        lines += [
            "",
            f"## SGG's optimizer step ({sgg['parameters']:,} parameters)",
            "",
            "| step | median ms (min–max) | × adamw |",
            "|---|---|---|",
        ]
        for name, m in sgg["steps"].items():
            lines.append(
                f"| {name} | {m['median_ms']:.2f} ({m['min_ms']:.2f}–{m['max_ms']:.2f}) | "
                f"{m['ratio']:.3f} |"
            )
        mean = sgg["mean_over_interval"]
        lines.append(
            f"| mean over {mean['interval']} steps | {mean['median_ms']:.2f} | "
            f"{mean['ratio']:.3f} |"
        )
    steps = [v for k, v in res.items() if k.startswith("model_step")]
    if steps:
        lines += [
            "",
            "## Train-step throughput (`benchmarks/model_step.py`, bf16 compute, AdamW)",
            "",
            "| preset | mode | parameters | tokens/s, median (min–max) | first step s |",
            "|---|---|---|---|---|",
        ]
        for entry in steps:
            for mode, m in entry.items():
                lines.append(
                    f"| {m['preset']} ({m['label']}) | {mode} | {m['parameters']:,} | "
                    f"{m['tokens_per_s_median']:,.0f} ({m['tokens_per_s_min']:,.0f}–"
                    f"{m['tokens_per_s_max']:,.0f}) | {m['compile_s']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, state: dict[str, Any]) -> None:
    ev = state["evidence"]
    ev["results"] = state["results"]
    tmp = out / "evidence.json.tmp"
    tmp.write_text(json.dumps(ev, indent=2, default=str) + "\n")
    os.replace(tmp, out / "evidence.json")
    (out / "summary.md").write_text(summary_md(state))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_evidence", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "out_dir", nargs="?", help="the output folder (created; our files are replaced)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, micro models, under 3 minutes")
    parser.add_argument("--work-dir", help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--total-budget-s", type=float, help="the whole command's budget")
    parser.add_argument("--suite-budget-s", type=float, help="the main suite's, probe included")
    parser.add_argument(
        "--guard-reserve-s", type=float, help="what the suites leave for the cost stage"
    )
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated stages to run, in this order, of: {', '.join(STAGES)} (default: "
        "%(default)s; a re-run can finish what a first run skipped)",
    )
    parser.add_argument(
        "--where",
        action="store_true",
        help="print the folders our packages import from, as JSON, and exit",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.where:
        print(json.dumps(where()))
        return 0
    if args.out_dir is None:
        parser.error("give the output folder OUT_DIR")
    stages = [x for x in args.stages.split(",") if x]
    if set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; known: {STAGES}")
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    for name in ("total_budget_s", "suite_budget_s", "guard_reserve_s"):
        if getattr(args, name) is not None:
            sizes = dataclasses.replace(sizes, **{name: getattr(args, name)})
    clock = Clock(sizes.total_budget_s)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUTS, "suite.json", "runs.jsonl", "suite-runs.tar.gz"):
        (out / name).unlink(missing_ok=True)  # This script's files, of this and older versions.
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-evidence-"))
    work.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("a")
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)

    command = "python -m benchmarks.gpu_evidence " + shlex.join(argv)
    state: dict[str, Any] = {"command": command, "results": {}}
    state["machine"] = machine()
    state["evidence"] = {
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": state["machine"],
        "code": code(),
        "work_dir": str(work),
        "budgets": {
            "total_s": sizes.total_budget_s,
            "suite_s": sizes.suite_budget_s,
            "guard_reserve_s": sizes.guard_reserve_s,
        },
        "stages": {},
    }
    say(f"{command}; work dir {work}; {state['machine']['summary']}")
    exit_status = 0

    def save() -> None:
        state["evidence"]["wall_s"] = round(clock.elapsed(), 1)
        write_outputs(out, state)

    def run_stage(name: str, budget_s: float, fn, *fn_args, optional: bool = False) -> None:
        """Runs ``fn`` within ``budget_s``; records how it ended; writes the outputs."""
        nonlocal exit_status
        say(f"stage {name} (budget {budget_s:.0f} s) ...")
        t0 = time.perf_counter()
        record: dict[str, Any] = {"status": "running", "budget_s": round(budget_s, 1)}
        state["evidence"]["stages"][name] = record
        try:
            with gpu_plan.Deadline(budget_s) as deadline:
                state["results"][name] = fn(*fn_args)
            if deadline.stopped:
                record.update(status="stopped", reason=f"stopped at its {budget_s:.0f} s budget")
            else:
                record["status"] = "done"
                if deadline.expired:
                    record["reason"] = f"over its {budget_s:.0f} s budget"
        except gpu_plan.BudgetError as e:
            if optional:
                record.update(status="skipped", reason=str(e))
            else:
                record.update(status="refused", reason=str(e))
                exit_status = max(exit_status, 2)
                print(f"gpu-evidence: error: {e}", file=sys.stderr)
        except Exception as e:  # Record it and go on with the next stage.
            record.update(status="failed", reason=f"{type(e).__name__}: {e}")
            exit_status = exit_status or 1
            traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        if name in ("suite", "depth"):
            pack_suites(out, work, state)
        save()
        say(f"stage {name}: {record['status']} in {record['seconds']} s")

    def skip(name: str, reason: str) -> None:
        state["evidence"]["stages"][name] = {"status": "skipped", "reason": reason}
        save()
        say(f"stage {name}: skipped ({reason})")

    reserve = sizes.guard_reserve_s if "guard" in stages else 0.0
    for name in stages:
        left = clock.left()
        if name == "suite":
            budget = min(sizes.suite_budget_s, left - reserve)
            run_stage(
                name, budget, stage_suite, sizes.scale, budget, work, state, "suite", optional=False
            )
        elif name == "depth":
            budget = left - reserve
            if budget < sizes.depth_min_s:
                skip(name, f"{max(budget, 0):.0f} s left for it, it needs {sizes.depth_min_s:.0f}")
                continue
            run_stage(
                name,
                budget,
                stage_suite,
                sizes.depth_scale,
                budget,
                work,
                state,
                "depth",
                optional=True,
            )
        elif name == "guard":
            plan = state.get("suite_plan")
            steps = plan.steps if plan is not None else sizes.scale.steps
            run_stage(name, left, stage_guard, sizes, steps, clock, state, out, save)
        elif name == "sgg":
            guess = 2 * sizes.unrolled_compile_s
            if left < guess:
                skip(name, f"needs about {guess:.0f} s, {left:.0f} s left")
                continue
            run_stage(name, left, stage_sgg, sizes, state)
        else:
            for i, (label, preset) in enumerate(sizes.model_presets):
                need = (1.0 if i == 0 else 1.5) * 2 * sizes.unrolled_compile_s
                if clock.left() < need:
                    skip(
                        f"model_step {label}",
                        f"needs about {need:.0f} s, {clock.left():.0f} s left",
                    )
                    continue
                run_stage(
                    f"model_step {label}", clock.left(), stage_model_step, sizes, label, preset
                )
        gc.collect()

    ev = state["evidence"]
    ev["exit_status"] = exit_status
    ev["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save()
    say(f"done in {ev['wall_s']} s, exit status {exit_status}; outputs in {out}")
    sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
    log.close()
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
