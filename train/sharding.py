"""Sharded training on a JAX mesh: one device, many local devices, or many hosts.

JAX's own sharding is the distributed engine. A run with ``mesh="data=D,fsdp=F"`` (``lbw-train
--mesh data=D,fsdp=F``) builds a ``jax.sharding.Mesh`` of ``D × F`` devices with the axes
``("data", "fsdp")`` and places:

* parameters and optimizer state with FSDP (:func:`param_sharding`): every tensor of at least
  :data:`FSDP_MIN_SIZE` elements is split over ``"fsdp"`` along its largest dimension that the
  ``fsdp`` size divides; smaller tensors, tensors with no such dimension, and scalars (step
  counters, the guard's state, telemetry) are replicated. The moments of AdamW and SGG's cluster
  ids have the shapes of the parameters, so they are sharded like them;
* batches over both axes (:func:`batch_sharding`): the batch dimension is split over
  ``("data", "fsdp")``, so every device holds ``B / (D × F)`` distinct sequences. The ``fsdp``
  devices gather each weight for the forward pass and reduce-scatter its gradient; ``data``
  replicas hold the same shards and all-reduce the gradients.

The train step is traced with these shardings on its inputs (committed arrays) and pins them on
the updated state with ``jax.lax.with_sharding_constraint``, so every step keeps the layout.
Everything in ``lbw_optax`` reduces over whole arrays inside jit: under GSPMD the guard's
statistics, SGG's per-tensor clustering of ``|m|`` and the telemetry are global (computed on the
whole tensor, not per shard), and the results match one device up to float summation order.

Several processes (hosts): :func:`initialize_distributed` calls ``jax.distributed.initialize``
before any device is used; every process draws the same global batch sequence and contributes
only its own rows (:func:`global_batch`), assembled with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
# Tensors with fewer elements are replicated: biases, norms, and small weights, whose shards
# would cost more in collectives than they save in memory.
FSDP_MIN_SIZE = 1024


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}``; a missing axis has size 1.

    Raises:
      ValueError: an unknown axis, a repeated axis, or a size that is not a positive int.
    """
    spec = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES or name in seen:
            raise ValueError(
                f"Bad mesh {text!r}: expected AXIS=SIZE pairs over {MESH_AXES}, "
                "each at most once (e.g. 'data=4,fsdp=2')."
            )
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"Bad mesh {text!r}: the size of {name!r} must be an int >= 1.")
        spec[name] = size
        seen.add(name)
    return spec


def make_mesh(spec: dict[str, int] | str, devices: Any = None) -> Mesh:
    """The ``("data", "fsdp")`` mesh of ``spec`` over ``devices`` (default: all devices, of all
    processes, in ``jax.devices()`` order, so each process's devices are contiguous).

    Raises:
      ValueError: the mesh does not use exactly the available devices.
    """
    if isinstance(spec, str):
        spec = parse_mesh(spec)
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(spec[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"The mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices; there are {len(devices)} ({jax.process_count()} process(es))."
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """The FSDP partition of a tensor of ``shape``: its largest dimension divisible by ``fsdp``
    (the first of equal ones) over ``"fsdp"``; replicated when small or indivisible."""
    if fsdp == 1 or not shape or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def param_sharding(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """A ``NamedSharding`` per array leaf of ``tree`` (params, optimizer state or both)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, leaf_spec(tuple(np.shape(x)), fsdp, min_size)), tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches ``[B, ...]``: the batch dimension over ``("data", "fsdp")``."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def shard(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed with :func:`param_sharding` (works across processes: every process holds
    the same values, initialised from the same seed, and keeps its own shards)."""
    shardings = param_sharding(tree, mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )


def constrain(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: pins :func:`param_sharding` on ``tree``."""
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_sharding(tree, mesh))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raises ``ValueError`` unless the batch splits evenly over the devices and processes."""
    devices = mesh.size
    if batch_size % devices or batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the mesh's {devices} devices "
            f"(and of the {jax.process_count()} processes)."
        )


def global_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch array from the full host ``batch`` [B, ...], every device getting its
    rows: in one process by ``device_put``; with N processes, process i contributes only rows
    ``[i·B/N, (i+1)·B/N)`` through ``jax.make_array_from_process_local_data``."""
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    if n == 1:
        return jax.device_put(batch, sharding)
    rows = batch.shape[0] // n
    i = jax.process_index()
    local = batch[i * rows : (i + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, batch.shape)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run is asked for, by arguments
    or by the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``); call it before JAX uses any device. Returns whether it initialised.

    On CPU the processes exchange data through JAX's CPU collectives (gloo).
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            "A multi-process run needs the coordinator address, the number of processes and "
            "this process's id (--coordinator, --num-processes, --process-id or "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True
