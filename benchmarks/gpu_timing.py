"""The GPU evidence's stages 3 to 5, what a step costs: the training loop's step timed back to
back in interleaved rounds, its profiler kernel time and trace, its HLO bytes (the bandwidth
it achieves); SGG's optimizer step alone; ``benchmarks/model_step.py``'s tokens/s
(:mod:`benchmarks.gpu_evidence`)."""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lbw_optax
from benchmarks.gpu_machine import Clock, say
from benchmarks.gpu_sizes import Sizes
from lbw import models
from lbw.train.config import TrainConfig
from lbw.train.stress import gpu_plan

SGG_INTERVAL = 500  # sgg_adamw's default recluster_every, for the mean over an interval.
SGG_TIMED_INTERVAL = 4  # The timed states: a re-clustering step's work does not depend on it.


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
