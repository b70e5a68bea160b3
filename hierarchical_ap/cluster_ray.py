"""Ray discovery: the `Cluster` of a running Ray instance (`Cluster.from_ray`).

`hierarchical_ap.cluster` re-exports `cluster_from_ray_nodes` and imports this module at load
time, so the core types are imported where they are used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hierarchical_ap.errors import ClusterSpecError
from hierarchical_ap.hardware import CPU_DEVICE_NAME, _device_defaults, _preset_row, _presets

if TYPE_CHECKING:
    from hierarchical_ap.cluster import Cluster

# Logged under the name this code had before it moved out of hierarchical_ap.cluster.
logger = logging.getLogger("hierarchical_ap.cluster")

_RAY_ACCELERATOR_PREFIX = "accelerator_type:"

WORKER_RUNTIME_ENV: dict[str, Any] = {"env_vars": {"RAY_worker_niceness": "0"}}
"""The ``runtime_env`` of every actor that trains or measures: Ray starts worker processes at
niceness 15 (so that background tasks yield to the driver), which on a shared host lets any
normal-priority process (Ray's own daemons included) take the CPU from a training step. These
actors run at normal priority, as Ray's job supervisor does (the same variable); Ray merges
``env_vars`` with the job's own."""


def cluster_from_ray(address: str = "auto") -> Cluster:
    """`Cluster.from_ray`: the cluster of a running Ray instance, connecting to `address` if Ray
    is not initialised in this process; see `cluster_from_ray_nodes`."""
    import ray

    from hierarchical_ap.cluster import EXAMPLE_SPEC

    if not ray.is_initialized():
        try:
            ray.init(address=address, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterSpecError(
                f"cannot connect to a Ray cluster at {address!r} ({exc}); start one with "
                f"`ray start --head`, or describe the cluster with Cluster.from_spec("
                f"'{EXAMPLE_SPEC}') / Cluster.from_file(path)"
            ) from exc
    return cluster_from_ray_nodes(ray.nodes())


def cluster_from_ray_nodes(nodes: Sequence[Mapping[str, Any]]) -> Cluster:
    """The cluster described by `ray.nodes()`: alive nodes with GPUs are hosts of their
    `accelerator_type` (mapped to a datasheet preset); without GPUs, every alive node with CPUs
    is a host of one CPU worker per CPU, sharing the node's Ray memory."""
    from hierarchical_ap.cluster import EXAMPLE_SPEC, Cluster, DeviceSpec, _host_memory_bytes

    alive = [n for n in nodes if n.get("Alive")]
    gpu_nodes = [n for n in alive if n.get("Resources", {}).get("GPU", 0) > 0]
    fix = (
        f"describe the cluster with Cluster.from_spec('{EXAMPLE_SPEC}') or Cluster.from_file(path)"
    )
    if gpu_nodes:
        counts = sorted({int(n["Resources"]["GPU"]) for n in gpu_nodes})
        if len(counts) != 1:
            raise ClusterSpecError(f"Ray nodes have different GPU counts {counts}; {fix}")
        types = sorted(
            {
                key[len(_RAY_ACCELERATOR_PREFIX) :]
                for n in gpu_nodes
                for key in n["Resources"]
                if key.startswith(_RAY_ACCELERATOR_PREFIX)
            }
        )
        if len(types) != 1:
            found = f"GPU types {types}" if types else "no accelerator_type resource"
            raise ClusterSpecError(
                f"Ray reports {found} for its GPU nodes, need exactly one; {fix}"
            )
        name = _ray_accelerator_preset(types[0], fix)
        logger.info("Ray cluster: %d host(s) x %d %s", len(gpu_nodes), counts[0], name)
        return Cluster(len(gpu_nodes), counts[0], **_device_defaults(name, counts[0]))
    cpu_nodes = [n for n in alive if n.get("Resources", {}).get("CPU", 0) >= 1]
    if not cpu_nodes:
        raise ClusterSpecError(f"the Ray cluster has no alive node with GPUs or CPUs; {fix}")
    counts = sorted({int(n["Resources"]["CPU"]) for n in cpu_nodes})
    if len(counts) != 1:
        raise ClusterSpecError(f"Ray nodes have different CPU counts {counts}; {fix}")
    workers = counts[0]
    memory = min(int(n["Resources"].get("memory", _host_memory_bytes())) for n in cpu_nodes)
    logger.info("Ray cluster: %d host(s) x %d CPU workers", len(cpu_nodes), workers)
    defaults = _device_defaults(CPU_DEVICE_NAME, workers)
    defaults["device"] = DeviceSpec.cpu(workers, host_memory_bytes=memory, host_cores=workers)
    return Cluster(len(cpu_nodes), workers, **defaults)


def _ray_accelerator_preset(ray_type: str, fix: str) -> str:
    """Map Ray's accelerator type ("A100-80G", "H100", "V100") to a preset name."""
    for candidate in (ray_type, ray_type + "B"):
        if candidate.upper() in _presets():
            return _presets()[candidate.upper()].device.name
    try:
        return _preset_row(ray_type).device.name
    except ClusterSpecError as exc:
        raise ClusterSpecError(f"Ray GPU type {ray_type!r}: {exc}; or {fix}") from None
