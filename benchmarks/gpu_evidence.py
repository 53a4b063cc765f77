"""GPU evidence in one command: the ``gpu`` stress suite and the GPU cost figures, in one folder.

    python benchmarks/gpu_evidence.py OUT_DIR            # one GPU: about 8 minutes
    python benchmarks/gpu_evidence.py OUT_DIR --smoke    # the same code paths on a CPU, micro model
    benchmarks/gpu_evidence.sh OUT_DIR                   # the same, from the checkout

Stages, in order, each within its own share of the time; the output files are rewritten after
every stage, so a run that is cut short keeps what it measured:

1. ``suite``: ``lbw-stress gpu`` (:mod:`train.gpu_suite`): probe, plan (refused before any run
   when it does not fit ``--suite-budget-s``), the runs, the report.
2. ``guard``: the wall clock of the training loop's own jitted, donated train step (0.5B,
   bf16, the suite's batch) for AdamW, clipping, the governor, the published rule and SGG in
   the scanned layout, and AdamW and the governor unrolled: steps run back to back with one
   sync per round, in interleaved rounds (the order reversed every other round); medians,
   min–max, the ratio to AdamW in the same layout with the spread of the per-round ratios, the
   bandwidth achieved (the scanned step's HLO bytes over its time) against the card's peak,
   and a ``jax.profiler`` trace of three governor steps (its kernel time; the file kept as
   ``trace.xplane.pb`` when under 20 MB).
3. ``sgg``: the optimizer step alone on the 0.5B parameter tree: AdamW, SGG-AdamW on an
   ordinary step and on a re-clustering step (interleaved), the mean over SGG's default
   500-step interval, and the train-step ratio that implies with the AdamW step of stage 2.
4. ``model_step``: ``benchmarks/model_step.py``'s train step, tokens/s for Qwen2.5-0.5B and
   1.5B-style presets, full and LoRA rank 8, bf16 compute, float32 parameters.

Stages 2–4 share ``--cost-budget-s``; a stage that would not fit what is left is skipped with
its reason; ``--stages`` runs some of them only (e.g. ``--stages model_step`` to finish what a
first run skipped). OUT_DIR receives at most eight files, no folders: ``summary.md``,
``evidence.json`` (every figure, the command, the machine, the code version), the suite's
``suite.json``, ``runs.jsonl`` and ``suite-summary.md``, ``suite-runs.tar.gz`` (the suite
folder with every run's metrics and the plots, and the probe) and ``log.txt``. The runs
themselves go to ``--work-dir`` (default: a new temporary folder). Exit status: 0, or 2 when
the suite's plan was refused, 1 when a stage failed (the others still run).
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # This checkout's packages, installed or not.
sys.path.insert(1, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lbw_optax  # noqa: E402
from lbw import models  # noqa: E402
from lbw.train import gpu_suite, stress  # noqa: E402
from lbw.train.config import TrainConfig  # noqa: E402
from lbw.train.stress import report  # noqa: E402

SGG_INTERVAL = 500  # sgg_adamw's default recluster_every, for the mean over an interval.
SGG_TIMED_INTERVAL = 4  # The timed states: a re-clustering step's work does not depend on it.
STAGES = ("suite", "guard", "sgg", "model_step")
OUTPUTS = ("summary.md", "evidence.json", "suite.json", "runs.jsonl", "suite-summary.md")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    """What differs between the GPU run and the smoke mode."""

    scale: gpu_suite.Scale
    suite_budget_s: float
    cost_budget_s: float
    guard_rounds: int
    guard_steps: int  # Timed steps per method per round.
    sgg_repeats: int
    model_presets: tuple[tuple[str, str], ...]  # (label, preset name).
    model_overrides: dict[str, Any]
    model_batch: int
    model_seq: int
    model_rounds: int
    model_steps: int


GPU_SIZES = Sizes(
    scale=gpu_suite.GPU,
    suite_budget_s=360.0,
    cost_budget_s=120.0,
    guard_rounds=6,
    guard_steps=5,
    sgg_repeats=10,
    model_presets=(("0.5B", "qwen2_5_0_5b"), ("1.5B", "qwen2_5_1_5b")),
    model_overrides={},
    model_batch=8,
    model_seq=512,
    model_rounds=3,
    model_steps=4,
)
SMOKE_SIZES = Sizes(
    scale=gpu_suite.SMOKE,
    suite_budget_s=300.0,
    cost_budget_s=150.0,
    guard_rounds=2,
    guard_steps=2,
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


def code() -> dict[str, Any]:
    """The commit when this checkout is a git repository with git installed, else ``unknown``."""
    version = stress.code_version()
    from lbw import train

    version["code_dir"] = str(Path(train.__file__).resolve().parent.parent)
    return version


# ---------------------------------------------------------------------------------------------
# Stage 1: the suite.


def stage_suite(sizes: Sizes, work: Path, out: Path, state: dict[str, Any]) -> dict[str, Any]:
    probe = gpu_suite.measure_probe(sizes.scale, work / f"{sizes.scale.name}-probe")
    state["probe"] = probe
    the_plan = gpu_suite.plan(probe, sizes.suite_budget_s, sizes.scale)
    say(f"plan: {json.dumps(the_plan.to_dict())}")
    state["plan"] = the_plan
    suite_dir = stress.run_suite(
        the_plan.spec,
        work,
        workers=1,
        progress=False,
        command=state["command"],
        machine=state["machine"]["summary"],
    )
    gpu_suite.record_plan(suite_dir, the_plan)
    report.write_report(suite_dir)
    for name, target in (
        ("suite.json", "suite.json"),
        ("runs.jsonl", "runs.jsonl"),
        ("summary.md", "suite-summary.md"),
    ):
        shutil.copyfile(suite_dir / name, out / target)
    tar_path = out / "suite-runs.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(suite_dir, arcname=suite_dir.name)
        probe_dir = work / f"{sizes.scale.name}-probe"
        if probe_dir.exists():
            tar.add(probe_dir, arcname=probe_dir.name)
    meta = json.loads((suite_dir / "suite.json").read_text())
    return {
        "plan": the_plan.to_dict(),
        "suite_dir": str(suite_dir),
        "headline": report.headline(suite_dir),
        "runs": len(stress.read_jsonl(suite_dir / "runs.jsonl")),
        "suite_wall_s": meta.get("last_invocation_s"),
        "tarball_mib": round(tar_path.stat().st_size / 2**20, 2),
    }


# ---------------------------------------------------------------------------------------------
# Stage 2: the guard's train-step cost.


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


# The guard stage's methods: (label, optimizer overrides, layouts it is timed in). The
# unrolled 0.5B model compiles for about 40 s a program on a GPU, so only AdamW and the default
# run there; the scanned one compiles in seconds.
GUARD_METHODS = (
    ("adamw", dict(optimizer="adamw"), ("scanned", "unrolled")),
    ("adamw+clip(1.0)", dict(optimizer="adamw+clip", clip_threshold=1.0), ("scanned",)),
    ("lbw(governor)", dict(optimizer="lbw", policy="governor"), ("scanned", "unrolled")),
    ("lbw(reference)", dict(optimizer="lbw", policy="reference"), ("scanned",)),
    ("sgg", dict(optimizer="sgg"), ("scanned",)),
)
TRACE_LIMIT_BYTES = 20 * 2**20


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
    as ``trace.xplane.pb`` when under 20 MB."""
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


def stage_guard(sizes: Sizes, steps: int, state: dict[str, Any], out: Path) -> dict[str, Any]:
    scale = sizes.scale
    fields = gpu_suite.train_fields(scale, steps)
    steps_fns, compile_s, bytes_per_step = {}, {}, {}
    for name, overrides, layouts in GUARD_METHODS:
        for layout in layouts:
            label = f"{name} [{layout}]"
            config = TrainConfig(
                **fields,
                model=scale.model,
                model_overrides=dict(scale.model_overrides),
                learning_rate=gpu_suite.CALM_LR,
                quiet=True,
                scan_layers=layout == "scanned",
                **overrides,
            )
            step, model, batch = loop_step(config)
            start = time.perf_counter()
            jax.block_until_ready(step(batch))
            compile_s[label] = time.perf_counter() - start
            steps_fns[label] = (step, batch)
            # The scanned programs compile in seconds: their HLO gives the bytes moved.
            if layout == "scanned":
                bytes_per_step[label] = train_step_bytes(config, model)
            if name == "adamw" and layout == "unrolled":
                state["adamw_model"] = model  # Its parameter tree is stage 3's workload.
    times: dict[str, list[float]] = {label: [] for label in steps_fns}
    rounds: list[dict[str, float]] = []
    order = list(steps_fns)
    for r in range(sizes.guard_rounds):
        this_round = {}
        for label in order if r % 2 == 0 else order[::-1]:
            step, batch = steps_fns[label]
            this_round[label] = time_back_to_back(step, batch, sizes.guard_steps)
            times[label].append(this_round[label])
        rounds.append(this_round)
    peak = state["machine"].get("memory_bandwidth_bytes_per_s")
    result = {
        "batch": [scale.batch_size, scale.seq_len],
        "model": scale.model,
        "methods": {},
        "peak_bandwidth": peak,
    }
    for label in steps_fns:
        layout = label.split("[")[1].rstrip("]")
        base = f"adamw [{layout}]"
        per_round = [r[label] / r[base] for r in rounds]
        median = statistics.median(times[label])
        result["methods"][label] = {
            **_stats(times[label]),
            "ratio": median / statistics.median(times[base]),
            "round_ratio_min": min(per_round),
            "round_ratio_max": max(per_round),
            "first_call_s": compile_s[label],
        }
        if label in bytes_per_step:
            achieved = bytes_per_step[label] / median
            result["methods"][label]["hlo_gb"] = bytes_per_step[label] / 1e9
            result["methods"][label]["achieved_gb_s"] = achieved / 1e9
            if peak:
                result["methods"][label]["of_peak"] = achieved / peak
    governor = "lbw(governor) [scanned]"
    result["trace"] = trace_steps(*steps_fns[governor], steps=3, out=out)
    kernel_ms = result["trace"].get("kernel_ms_per_step")
    if kernel_ms:
        result["trace"]["train_step_ms"] = result["methods"][governor]["median_ms"]
    result["rounds"], result["steps_per_round"] = sizes.guard_rounds, sizes.guard_steps
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


# ---------------------------------------------------------------------------------------------
# Stage 3: SGG's optimizer step.


def stage_sgg(sizes: Sizes, state: dict[str, Any]) -> dict[str, Any]:
    from flax import nnx

    model = state.pop("adamw_model", None)
    if model is None:
        from flax import nnx as _nnx

        config = models.get_config(sizes.scale.model, **sizes.scale.model_overrides)
        model = models.Decoder(config, rngs=_nnx.Rngs(0))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    del model
    n_params = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    lr = gpu_suite.CALM_LR
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
    guard = state["results"].get("guard")
    if guard:  # The whole train step: AdamW's, plus SGG's extra optimizer time.
        train_ms = guard["methods"]["adamw [unrolled]"]["median_ms"]
        extra_ms = 1e3 * (mean - base)
        result["implied_train_step_ratio"] = (train_ms + extra_ms) / train_ms
    result["first_call_s"] = compile_s
    return result


# ---------------------------------------------------------------------------------------------
# Stage 4: tokens/s of model_step.py's train step.


def stage_model_step(sizes: Sizes, label: str, preset: str) -> dict[str, Any]:
    import model_step

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


def summary_md(state: dict[str, Any]) -> str:
    ev = state["evidence"]
    res = state["results"]
    lines = [
        f"# GPU evidence{' (smoke mode: CPU, micro model)' if ev['smoke'] else ''}",
        "",
        f"- command: `{ev['command']}`",
        f"- started {ev['started']}, wall clock {_f(ev.get('wall_s'), 0)} s, exit status "
        f"{ev.get('exit_status', 'running')}",
        f"- machine: {ev['machine']['summary']}; devices: "
        + ", ".join(
            f"{d['kind']}" + (f" {d['memory_gib']} GiB" if "memory_gib" in d else "")
            for d in ev["machine"]["devices"]
        ),
        f"- versions: {', '.join(f'{k} {v}' for k, v in ev['machine']['versions'].items())}",
        f"- code: commit {ev['code']['git_commit']}"
        + (f", uncommitted: {ev['code']['uncommitted']}" if ev["code"].get("uncommitted") else ""),
        "",
        "| stage | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, st in ev["stages"].items():
        lines.append(
            f"| {name} | {st['status']} | {_f(st.get('seconds'), 1)} | {st.get('reason', '')} |"
        )
    suite = res.get("suite")
    if suite:
        p = suite["plan"]
        lines += [
            "",
            "## LR-stress suite",
            "",
            f"{suite['runs']} runs of {p['steps']} steps (floor {p['floor_steps']}), "
            f"{p['compilations']} compilations; estimated {p['estimate_s']} s (× {p['margin']}) "
            f"of {p['available_s']} s left by the probe in a {p['budget_s']} s budget; the runs "
            f"took {suite['suite_wall_s']} s. Probe: {json.dumps(p['probe'])}. Full report: "
            "`suite-summary.md`; every run's metrics: `suite-runs.tar.gz`.",
            "",
            suite["headline"],
        ]
    guard = res.get("guard")
    if guard:
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
            achieved = m.get("achieved_gb_s")
            lines.append(
                f"| {name} | {m['median_ms']:.2f} ({m['min_ms']:.2f}–{m['max_ms']:.2f}) | "
                f"{m['ratio']:.4f} | {m['round_ratio_min']:.4f}–{m['round_ratio_max']:.4f} | "
                f"{_f(m.get('hlo_gb'))} | {_f(achieved, 0)} | {_f(m.get('of_peak'))} |"
            )
        trace = guard.get("trace", {})
        if "kernel_ms_per_step" in trace:
            lines += [
                "",
                f"Profiler trace of {trace['steps']} governor steps (scanned): "
                f"{trace['kernel_ms_per_step']:.2f} ms of kernels per step against "
                f"{trace['train_step_ms']:.2f} ms of wall clock"
                + (" (`trace.xplane.pb`)." if trace.get("kept") else " (over 20 MB, not kept)."),
            ]
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
        if "implied_train_step_ratio" in sgg:
            lines += [
                "",
                "Whole train step, AdamW's plus SGG's extra optimizer time (mean over the "
                f"interval): {sgg['implied_train_step_ratio']:.4f}× AdamW's.",
            ]
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the output folder (created; our files are replaced)")
    parser.add_argument("--smoke", action="store_true", help="CPU, micro model, about a minute")
    parser.add_argument("--work-dir", help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--suite-budget-s", type=float, help="the suite's budget, probe included")
    parser.add_argument("--cost-budget-s", type=float, help="the budget of stages 2-4 together")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run, of: %(default)s (a re-run can finish what a first "
        "run skipped)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    stages = [x for x in args.stages.split(",") if x]
    if set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; known: {STAGES}")
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    if args.suite_budget_s is not None:
        sizes = dataclasses.replace(sizes, suite_budget_s=args.suite_budget_s)
    if args.cost_budget_s is not None:
        sizes = dataclasses.replace(sizes, cost_budget_s=args.cost_budget_s)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUTS, "suite-runs.tar.gz", "log.txt", "trace.xplane.pb"):
        (out / name).unlink(missing_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-evidence-"))
    work.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("a")
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)

    start = time.perf_counter()
    command = "python benchmarks/gpu_evidence.py " + shlex.join(argv)
    state: dict[str, Any] = {"command": command, "results": {}}
    state["machine"] = machine()
    state["evidence"] = {
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": state["machine"],
        "code": code(),
        "work_dir": str(work),
        "budgets": {"suite_s": sizes.suite_budget_s, "cost_s": sizes.cost_budget_s},
        "stages": {},
    }
    say(f"{command}; work dir {work}; {state['machine']['summary']}")
    exit_status = 0

    def run_stage(name: str, fn, *fn_args) -> None:
        nonlocal exit_status
        say(f"stage {name} ...")
        t0 = time.perf_counter()
        record: dict[str, Any] = {}
        try:
            state["results"][name] = fn(*fn_args)
            record["status"] = "done"
        except gpu_suite.BudgetError as e:
            record.update(status="refused", reason=str(e))
            exit_status = max(exit_status, 2)
            print(f"gpu-evidence: error: {e}", file=sys.stderr)
        except Exception as e:  # Record it and go on with the next stage.
            record.update(status="failed", reason=f"{type(e).__name__}: {e}")
            exit_status = exit_status or 1
            traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        state["evidence"]["stages"][name] = record
        state["evidence"]["wall_s"] = round(time.perf_counter() - start, 1)
        write_outputs(out, state)
        say(f"stage {name}: {record['status']} in {record['seconds']} s")

    def skip(name: str, reason: str) -> None:
        state["evidence"]["stages"][name] = {"status": "skipped", "reason": reason}
        write_outputs(out, state)
        say(f"stage {name}: skipped ({reason})")

    if "suite" in stages:
        run_stage("suite", stage_suite, sizes, work, out, state)
    plan, probe = state.get("plan"), state.get("probe")
    steps = plan.steps if plan is not None else sizes.scale.floor_steps
    if probe is not None:  # The probe's first compilation: the unit of the estimates below.
        compile_guess = probe.compile_s
    else:  # No suite this time: a guess (a 0.5B train step on one H200; a micro one on a CPU).
        compile_guess = 5.0 if args.smoke else 40.0
    cost_start = time.perf_counter()

    def left() -> float:
        return sizes.cost_budget_s - (time.perf_counter() - cost_start)

    # Estimates (seconds) of each cost stage before it starts; compilations dominate.
    reused = plan is not None  # The suite compiled the loop steps stage 2 times.
    # Scanned programs compile in a fraction of the unrolled ones (the probe's is unrolled).
    guard_need = 2 * compile_guess + (0 if reused else 5 * 0.25 * compile_guess) + 40.0

    def cost_stage(name: str, stage: str, need: float, fn, *fn_args) -> None:
        """Runs a selected cost stage if its estimate fits what is left, else records why not."""
        if stage not in stages:
            return
        if left() >= need:
            run_stage(name, fn, *fn_args)
        else:
            skip(name, f"needs about {need:.0f} s, {left():.0f} s left")

    cost_stage("guard", "guard", guard_need, stage_guard, sizes, steps, state, out)
    cost_stage("sgg", "sgg", 0.5 * compile_guess + 10.0, stage_sgg, sizes, state)
    state.pop("adamw_model", None)
    gc.collect()
    for i, (label, preset) in enumerate(sizes.model_presets):
        name = f"model_step {label}"
        factor = 1.0 if i == 0 else 1.5  # The larger preset compiles and steps longer.
        need = factor * 2 * compile_guess * (0.1 if args.smoke else 1.0)
        cost_stage(name, "model_step", need, stage_model_step, sizes, label, preset)

    ev = state["evidence"]
    ev["wall_s"] = round(time.perf_counter() - start, 1)
    ev["exit_status"] = exit_status
    ev["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_outputs(out, state)
    say(f"done in {ev['wall_s']} s, exit status {exit_status}; outputs in {out}")
    sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
    log.close()
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
