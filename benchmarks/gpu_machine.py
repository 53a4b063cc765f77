"""The GPU evidence's log, clock and record: the log file's tee, timestamped messages, the
command's budget, and the machine (devices, versions, peak bandwidth) and code it ran on
(:mod:`benchmarks.gpu_evidence`)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import jax

import lbw_optax
from lbw import models
from lbw.train import stress


class Tee:
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
