"""The cluster model: devices, links, hosts, submeshes and 2D logical meshes.

A `Cluster` is `num_hosts` hosts with `devices_per_host` identical devices each. Devices of one
host talk over `intra_host_link` (NVLink on GPUs, loopback TCP between CPU workers), devices of
different hosts over `inter_host_link` (InfiniBand or Ethernet).

Units everywhere are SI base units: bytes, seconds, FLOP/s, bytes/s. A link's bandwidth is per
device and per direction, so a ring step that moves `b` bytes over it takes `latency + b /
bandwidth`. Cluster files (`Cluster.to_file`) store these base units; on input they also accept
a few human units (GB/s, Gbit/s, µs, GiB, TFLOP/s), see `Cluster.from_dict`.

Devices are numbered host-major: device `d` of host `h` has the global index
`h * devices_per_host + d`.

This module holds the core types. The datasheet presets and link constants live in
`hierarchical_ap.hardware`, cluster files in `hierarchical_ap.cluster_file` and Ray discovery in
`hierarchical_ap.cluster_ray`; the names callers import from here are re-exported.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from hierarchical_ap.cluster_ray import cluster_from_ray_nodes
from hierarchical_ap.errors import ClusterSpecError
from hierarchical_ap.hardware import (
    CPU_CORE_MEMORY_BANDWIDTH,
    CPU_CORE_PEAK_FLOPS,
    CPU_DEVICE_NAME,
    CPU_DTENSOR_DISPATCH_S,
    CPU_INTER_HOST_BANDWIDTH,
    CPU_KERNEL_OVERHEAD_S,
    DATASHEET_FP32_TFLOPS,
    ETHERNET_LATENCY_S,
    GIB,
    INFINIBAND_LATENCY_S,
    LOOPBACK_BANDWIDTH,
    LOOPBACK_LATENCY_S,
    NVLINK_LATENCY_S,
    _device_defaults,
    _preset_row,
    preset_names,
)

__all__ = [
    "BACKENDS",
    "CPU_CORE_MEMORY_BANDWIDTH",
    "CPU_CORE_PEAK_FLOPS",
    "CPU_DEVICE_NAME",
    "CPU_DTENSOR_DISPATCH_S",
    "CPU_INTER_HOST_BANDWIDTH",
    "CPU_KERNEL_OVERHEAD_S",
    "DATASHEET_FP32_TFLOPS",
    "ETHERNET_LATENCY_S",
    "EXAMPLE",
    "EXAMPLE_SPEC",
    "GIB",
    "INFINIBAND_LATENCY_S",
    "LOOPBACK_BANDWIDTH",
    "LOOPBACK_LATENCY_S",
    "NVLINK_LATENCY_S",
    "AlphaBeta",
    "Cluster",
    "Collective",
    "DeviceSpec",
    "Link",
    "LogicalMesh",
    "MeshAxis",
    "Submesh",
    "cluster_from_ray_nodes",
    "preset_names",
]

BACKENDS = ("nccl", "gloo")
EXAMPLE_SPEC = "2x8xA100-80GB"
EXAMPLE = (
    f"a valid cluster is e.g. the spec '{EXAMPLE_SPEC}' (hosts x devices per host x device type) "
    "or a YAML file such as 'spec: 2x8xA100-80GB' plus overrides like "
    "'inter_host_link: {bandwidth_gbps: 100}'"
)

_SPEC_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\S+)\s*$")


def _invalid(message: str) -> ClusterSpecError:
    """A ClusterSpecError whose message states the cause and shows a valid example."""
    return ClusterSpecError(f"{message}; {EXAMPLE}")


def _check_positive(
    owner: str, field: str, value: Any, unit: str, *, allow_zero: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise _invalid(f"{owner}.{field} must be a finite number {bound} ({unit}), got {value!r}")


def _check_count(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _invalid(f"{owner}.{field} must be an integer >= 1, got {value!r}")


class Collective(str, Enum):
    """The collectives the cost model and the probe know, by their file name."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    SEND_RECV = "send_recv"


@dataclass(frozen=True)
class AlphaBeta:
    """A fitted alpha-beta model of one collective on one link.

    `alpha` is the latency of one algorithm step (s) and `beta` the time per byte each device
    puts on the link (s/byte); see `hierarchical_ap.cost_model` for how steps and bytes on the
    link follow from the collective and the group size.
    """

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        _check_positive("AlphaBeta", "alpha", self.alpha, "seconds", allow_zero=True)
        _check_positive("AlphaBeta", "beta", self.beta, "seconds per byte", allow_zero=True)


@dataclass(frozen=True)
class Link:
    """A communication link, per device and per direction.

    `bandwidth` is bytes/s, `latency` seconds per message. `fitted` holds per-collective alpha/beta
    measured by `hap cluster probe`; when present they replace the analytic `latency` and
    `1 / bandwidth` for that collective. Pass a mapping {Collective or name: AlphaBeta}; it is
    stored as (Collective, AlphaBeta) pairs in `Collective` order so that Link stays hashable.
    """

    bandwidth: float
    latency: float
    fitted: Mapping[Collective | str, AlphaBeta] | tuple[tuple[Collective, AlphaBeta], ...] = ()

    def __post_init__(self) -> None:
        _check_positive("Link", "bandwidth", self.bandwidth, "bytes/s per device and direction")
        _check_positive("Link", "latency", self.latency, "seconds", allow_zero=True)
        items = self.fitted.items() if isinstance(self.fitted, Mapping) else self.fitted
        fits: dict[Collective, AlphaBeta] = {}
        for key, value in items:
            collective = _collective(key)
            if not isinstance(value, AlphaBeta):
                raise _invalid(
                    f"Link.fitted[{collective.value}] must be an AlphaBeta, got {value!r}"
                )
            fits[collective] = value
        ordered = tuple((c, fits[c]) for c in Collective if c in fits)
        object.__setattr__(self, "fitted", ordered)

    def fit(self, collective: Collective) -> AlphaBeta | None:
        """The measured alpha/beta of `collective` on this link, or None if it was not probed."""
        return dict(self.fitted).get(collective)


def _collective(key: Any) -> Collective:
    try:
        return Collective(key)
    except ValueError:
        known = ", ".join(c.value for c in Collective)
        raise _invalid(f"unknown collective {key!r}; known collectives: {known}") from None


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or CPU worker): memory (bytes), peak FLOP/s per dtype, HBM bytes/s,
    and the fixed host-side seconds each kernel costs on top of its roofline time.

    `kernel_overhead_s` is what eager execution pays per aten call it dispatches (Python,
    dispatcher and autograd bookkeeping; on a CPU worker this runs on the same core as the
    maths, so it adds to it). 0 leaves it out: the GPU presets do, since their launches
    overlap the kernels already queued and the calibrated matmul efficiency stands for what
    gaps remain (`cost_model.GPU_MATMUL_EFFICIENCY`).

    `cache_bandwidth` and `cache_bytes` add a second memory tier: a kernel whose own working
    set (the bytes it reads and writes) is at most `cache_bytes` streams at `cache_bandwidth`
    instead of `hbm_bandwidth` (`memory_bandwidth`). On a CPU worker a parameter's optimizer
    kernels and the small activations of a micro-batch run from the core's caches, faster
    than from DRAM (1.5× on the 2-core development VM with four workers busy). Both 0 (the
    default, and the GPU presets) leave the tier out.

    `dtensor_dispatch_s` is what DTensor adds to every op it dispatches (sharding
    propagation and wrapping, on the host), on top of `kernel_overhead_s`: a stage on several
    devices that does not run as plain data parallelism (`intra_op.local_execution`) pays it
    per op, forward and backward. 0 (the default, and the GPU presets, whose host work
    overlaps the kernels queued) leaves it out; CPU workers (`DeviceSpec.cpu`) default to
    `CPU_DTENSOR_DISPATCH_S` and `hap cluster probe` measures it on them.

    `compute_scale` multiplies every op time the cost model derives from the fields above
    (`CostModel.op_time`): the measured over the modelled time of a reference transformer
    block's forward and backward on this device beside busy neighbours (one busy worker per
    core), which `hap cluster probe` measures on CPU workers (`probe.REFERENCE_BLOCK`), where
    the micro-benchmarks' rates miss what a real block's mix of small GEMMs, normalisations
    and activations loses to the neighbours sharing the host's caches and memory. 1 (the
    default, and the GPU presets) leaves the times as modelled.
    """

    name: str
    memory_bytes: int
    peak_flops_fp32: float
    peak_flops_bf16: float
    peak_flops_fp16: float
    hbm_bandwidth: float
    kernel_overhead_s: float = 0.0
    cache_bandwidth: float = 0.0
    cache_bytes: int = 0
    dtensor_dispatch_s: float = 0.0
    compute_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _invalid(f"DeviceSpec.name must be a non-empty string, got {self.name!r}")
        _check_count("DeviceSpec", "memory_bytes", self.memory_bytes)
        for field in ("peak_flops_fp32", "peak_flops_bf16", "peak_flops_fp16"):
            _check_positive("DeviceSpec", field, getattr(self, field), "FLOP/s")
        _check_positive("DeviceSpec", "hbm_bandwidth", self.hbm_bandwidth, "bytes/s")
        _check_positive(
            "DeviceSpec", "kernel_overhead_s", self.kernel_overhead_s, "s", allow_zero=True
        )
        _check_positive(
            "DeviceSpec", "cache_bandwidth", self.cache_bandwidth, "bytes/s", allow_zero=True
        )
        _check_positive(
            "DeviceSpec", "dtensor_dispatch_s", self.dtensor_dispatch_s, "s", allow_zero=True
        )
        _check_positive("DeviceSpec", "compute_scale", self.compute_scale, "a ratio")
        if not isinstance(self.cache_bytes, int) or isinstance(self.cache_bytes, bool):
            raise _invalid(f"DeviceSpec.cache_bytes must be an integer, got {self.cache_bytes!r}")
        _check_positive("DeviceSpec", "cache_bytes", self.cache_bytes, "bytes", allow_zero=True)
        if (self.cache_bandwidth == 0) != (self.cache_bytes == 0):
            raise _invalid(
                "DeviceSpec.cache_bandwidth and cache_bytes go together, got "
                f"{self.cache_bandwidth!r} bytes/s and {self.cache_bytes!r} bytes; give both "
                "(as `hap cluster probe` measures them) or neither"
            )

    @property
    def is_cpu(self) -> bool:
        """True for CPU workers (gloo), which have no separate tensor-core rates."""
        return self.name.upper() == CPU_DEVICE_NAME

    def memory_bandwidth(self, working_set_bytes: float) -> float:
        """Bytes/s of a kernel that reads and writes `working_set_bytes` in all:
        max(cache_bandwidth, hbm_bandwidth) if 0 < working_set_bytes ≤ cache_bytes (never
        slower than streaming from device memory), else hbm_bandwidth."""
        if 0 < working_set_bytes <= self.cache_bytes:
            return max(self.cache_bandwidth, self.hbm_bandwidth)
        return self.hbm_bandwidth

    def peak_flops(self, dtype: torch.dtype) -> float:
        """Peak FLOP/s for `dtype`: bf16 and fp16 at their tensor-core rates, anything else
        (fp32, and the rare fp64/integer op) at the fp32 rate."""
        if dtype == torch.bfloat16:
            return self.peak_flops_bf16
        if dtype == torch.float16:
            return self.peak_flops_fp16
        return self.peak_flops_fp32

    @classmethod
    def preset(cls, name: str) -> DeviceSpec:
        """The datasheet device `name` (case-insensitive; a unique family such as "H100" also
        works), or "CPU" for the whole of this host as one worker (`DeviceSpec.cpu()`)."""
        if name.strip().upper() == CPU_DEVICE_NAME:
            return cls.cpu()
        return _preset_row(name).device

    @classmethod
    def cpu(
        cls,
        workers: int = 1,
        *,
        host_memory_bytes: int | None = None,
        host_cores: int | None = None,
    ) -> DeviceSpec:
        """One of `workers` CPU workers sharing a host.

        Each worker gets an equal share of the host: memory = host RAM / workers, FLOP/s =
        `CPU_CORE_PEAK_FLOPS` × cores / workers (fp32; bf16/fp16 run no faster on CPUs without
        AMX), memory bandwidth = `CPU_CORE_MEMORY_BANDWIDTH` × cores / workers. Dispatching a
        kernel runs on one thread, so its cost only grows when workers outnumber cores:
        `CPU_KERNEL_OVERHEAD_S` × max(1, workers / cores), and DTensor's dispatch per op likewise
        `CPU_DTENSOR_DISPATCH_S` × max(1, workers / cores). Host RAM and cores default to this
        machine's; `hap cluster probe` measures all of these instead.
        """
        _check_count("DeviceSpec.cpu", "workers", workers)
        memory = host_memory_bytes if host_memory_bytes is not None else _host_memory_bytes()
        cores = host_cores if host_cores is not None else (os.cpu_count() or 1)
        flops = CPU_CORE_PEAK_FLOPS * cores / workers
        return cls(
            name=CPU_DEVICE_NAME,
            memory_bytes=int(memory) // workers,
            peak_flops_fp32=flops,
            peak_flops_bf16=flops,
            peak_flops_fp16=flops,
            hbm_bandwidth=CPU_CORE_MEMORY_BANDWIDTH * cores / workers,
            kernel_overhead_s=CPU_KERNEL_OVERHEAD_S * max(1.0, workers / cores),
            dtensor_dispatch_s=CPU_DTENSOR_DISPATCH_S * max(1.0, workers / cores),
        )


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MeshAxis:
    """One axis of a logical mesh, seen by a collective among the devices of one axis group.

    `size` devices per group; each group spans `hosts` hosts with at most `devices_per_host` of
    its devices on one host. Groups that split evenly across hosts have `hosts ×
    devices_per_host == size` (see `splits_evenly`).
    """

    size: int
    hosts: int
    devices_per_host: int
    intra_link: Link
    inter_link: Link

    def __post_init__(self) -> None:
        for field in ("size", "hosts", "devices_per_host"):
            _check_count("MeshAxis", field, getattr(self, field))
        if self.hosts * self.devices_per_host < self.size:
            raise _invalid(
                f"MeshAxis of size {self.size} cannot fit in {self.hosts} host(s) x "
                f"{self.devices_per_host} device(s)"
            )

    @property
    def spans_hosts(self) -> bool:
        """True when a group's collective crosses the inter-host link."""
        return self.hosts > 1

    @property
    def splits_evenly(self) -> bool:
        """True when every host holds the same number of a group's devices."""
        return self.hosts * self.devices_per_host == self.size

    @classmethod
    def combine(cls, axes: Sequence[MeshAxis]) -> MeshAxis:
        """The group of a collective over several axes of one mesh (e.g. the whole mesh).

        Sizes, hosts and devices per host multiply; this is exact when the axes split evenly
        across hosts (always so for meshes of whole hosts whose axis sizes divide or are multiples
        of devices_per_host), otherwise the result does not split evenly and costs fall back to
        a flat ring over the slower link.
        """
        if not axes:
            raise _invalid("MeshAxis.combine needs at least one axis")
        links = {(a.intra_link, a.inter_link) for a in axes}
        if len(links) != 1:
            raise _invalid("MeshAxis.combine got axes of different clusters")
        return cls(
            size=math.prod(a.size for a in axes),
            hosts=math.prod(a.hosts for a in axes),
            devices_per_host=math.prod(a.devices_per_host for a in axes),
            intra_link=axes[0].intra_link,
            inter_link=axes[0].inter_link,
        )


@dataclass(frozen=True)
class Submesh:
    """A block of the cluster: hosts `host_start …+num_hosts` × devices `device_start
    …+num_devices_per_host` of each. Either inside one host (1 × k) or whole hosts (n × M)."""

    cluster: Cluster
    host_start: int
    num_hosts: int
    device_start: int
    num_devices_per_host: int

    def __post_init__(self) -> None:
        _check_count("Submesh", "num_hosts", self.num_hosts)
        _check_count("Submesh", "num_devices_per_host", self.num_devices_per_host)
        for field in ("host_start", "device_start"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _invalid(f"Submesh.{field} must be an integer >= 0, got {value!r}")
        c = self.cluster
        if self.host_start + self.num_hosts > c.num_hosts:
            raise _invalid(
                f"submesh hosts {self.host_start}..{self.host_start + self.num_hosts - 1} "
                f"exceed the cluster's {c.num_hosts} host(s)"
            )
        if self.device_start + self.num_devices_per_host > c.devices_per_host:
            raise _invalid(
                f"submesh devices {self.device_start}..{self.device_start + self.num_devices_per_host - 1} "
                f"exceed the {c.devices_per_host} devices per host"
            )
        if self.num_hosts > 1 and self.num_devices_per_host != c.devices_per_host:
            raise _invalid(
                f"a submesh over {self.num_hosts} hosts must use whole hosts "
                f"({c.devices_per_host} devices each), got {self.num_devices_per_host} per host"
            )

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.num_devices_per_host

    @property
    def device_ids(self) -> tuple[int, ...]:
        """Global device indices, host-major."""
        per_host = self.cluster.devices_per_host
        return tuple(
            h * per_host + d
            for h in range(self.host_start, self.host_start + self.num_hosts)
            for d in range(self.device_start, self.device_start + self.num_devices_per_host)
        )

    def logical_mesh(self, shape: tuple[int, int]) -> LogicalMesh:
        """A (rows, cols) view of this submesh's devices in row-major order."""
        return LogicalMesh(self, shape)


def _mesh_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2 or any(
        not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape
    ):
        raise _invalid(f"a logical mesh shape is two integers >= 1 (rows, cols), got {shape!r}")
    return shape


@dataclass(frozen=True)
class LogicalMesh:
    """A 2D (rows, cols) view of a submesh: device `r * cols + c` of the submesh's host-major
    device list sits at (r, c). Axis 1 groups are consecutive devices (a row), axis 0 groups
    stride by `cols` (a column). A 1D mesh is (1, n) or (n, 1)."""

    submesh: Submesh
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        shape = _mesh_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        if shape[0] * shape[1] != self.submesh.num_devices:
            raise _invalid(
                f"logical mesh {shape} has {shape[0] * shape[1]} devices but the submesh has "
                f"{self.submesh.num_devices}"
            )

    @property
    def num_devices(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device_ids(self) -> list[list[int]]:
        """Global device indices as a rows × cols nested list."""
        flat = self.submesh.device_ids
        rows, cols = self.shape
        return [list(flat[r * cols : (r + 1) * cols]) for r in range(rows)]

    @cached_property
    def axes(self) -> tuple[MeshAxis, MeshAxis]:
        """(axis 0, axis 1), each derived from the hosts its groups cross."""
        ids = self.device_ids
        columns = [list(col) for col in zip(*ids, strict=True)]
        return (self._axis(columns), self._axis(ids))

    def _axis(self, groups: list[list[int]]) -> MeshAxis:
        cluster = self.submesh.cluster
        per_group = [Counter(i // cluster.devices_per_host for i in group) for group in groups]
        return MeshAxis(
            size=len(groups[0]),
            hosts=max(len(hosts) for hosts in per_group),
            devices_per_host=max(max(hosts.values()) for hosts in per_group),
            intra_link=cluster.intra_host_link,
            inter_link=cluster.inter_host_link,
        )


@dataclass(frozen=True)
class Cluster:
    """`num_hosts` hosts × `devices_per_host` identical devices, their links and the
    torch.distributed backend ("nccl" for GPUs, "gloo" for CPU workers)."""

    num_hosts: int
    devices_per_host: int
    device: DeviceSpec
    intra_host_link: Link
    inter_host_link: Link
    backend: str = "nccl"

    def __post_init__(self) -> None:
        _check_count("Cluster", "num_hosts", self.num_hosts)
        _check_count("Cluster", "devices_per_host", self.devices_per_host)
        if not isinstance(self.device, DeviceSpec):
            raise _invalid(f"Cluster.device must be a DeviceSpec, got {self.device!r}")
        for field in ("intra_host_link", "inter_host_link"):
            if not isinstance(getattr(self, field), Link):
                raise _invalid(f"Cluster.{field} must be a Link, got {getattr(self, field)!r}")
        if self.backend not in BACKENDS:
            raise _invalid(f"Cluster.backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.devices_per_host

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_spec(cls, spec: str) -> Cluster:
        """Parse "HOSTSxDEVICESxTYPE", e.g. "16x8xA100-80GB" or "1x4xCPU", with datasheet links:
        NVLink per direction inside a host, the per-GPU network figure between hosts (loopback
        TCP and 10 Gbit/s Ethernet for CPU workers)."""
        if not isinstance(spec, str):
            raise _invalid(f"a cluster spec is a string, got {spec!r}")
        match = _SPEC_RE.match(spec)
        if match is None:
            raise _invalid(f"cluster spec {spec!r} does not parse as HOSTSxDEVICESxTYPE")
        hosts, per_host, device = int(match.group(1)), int(match.group(2)), match.group(3)
        if hosts < 1 or per_host < 1:
            raise _invalid(f"cluster spec {spec!r} needs at least 1 host and 1 device per host")
        return cls(hosts, per_host, **_device_defaults(device, per_host))

    @classmethod
    def local_cpu(cls, num_workers: int) -> Cluster:
        """One host of `num_workers` CPU workers (gloo over loopback), each with an equal share
        of this machine (`DeviceSpec.cpu`)."""
        _check_count("Cluster.local_cpu", "num_workers", num_workers)
        return cls(1, num_workers, **_device_defaults(CPU_DEVICE_NAME, num_workers))

    @classmethod
    def from_ray(cls, address: str = "auto") -> Cluster:
        """The cluster of a running Ray instance (connecting to `address` if Ray is not
        initialised in this process): alive nodes with GPUs become hosts of datasheet GPUs; a
        CPU-only Ray cluster gives one CPU worker per Ray CPU."""
        from hierarchical_ap.cluster_ray import cluster_from_ray

        return cluster_from_ray(address)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Cluster:
        """Read a cluster from a YAML (.yaml/.yml) or JSON (.json) file; see `from_dict`."""
        from hierarchical_ap.cluster_file import cluster_from_file

        return cluster_from_file(cls, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cluster:
        """Build a cluster from plain data (a parsed file). Every field is optional given a base:

        - `spec`: a spec string giving defaults for all fields (see `from_spec`);
        - `num_hosts`, `devices_per_host`: integers;
        - `device`: a device name (its datasheet links become the defaults too), or a mapping with
          `name`, `memory_bytes` | `memory_gib`, `peak_flops_{fp32,bf16,fp16}` |
          `peak_tflops_{fp32,bf16,fp16}`, `hbm_bandwidth` | `hbm_gb_s`, and optionally
          `kernel_overhead_s` | `kernel_overhead_us`, `cache_bandwidth` | `cache_gb_s`,
          `cache_bytes` | `cache_mib` and `dtensor_dispatch_s` | `dtensor_dispatch_us` (all
          default 0) and `compute_scale` (default 1), overriding the named preset
          or the spec's device (all but the optional fields needed for a custom device without
          either);
        - `intra_host_link`, `inter_host_link`: `bandwidth` (bytes/s) | `bandwidth_gb_s`
          (GB/s) | `bandwidth_gbps` (Gbit/s), `latency` (s) | `latency_us`, and `collectives`:
          {all_reduce: {alpha: s, beta: s/byte}, …} as fitted by `hap cluster probe`;
        - `backend`: "nccl" or "gloo" (default: gloo for CPU devices, else nccl).
        """
        from hierarchical_ap.cluster_file import cluster_from_dict

        return cluster_from_dict(cls, data)

    # ----------------------------------------------------------------------------- output

    def to_dict(self) -> dict[str, Any]:
        """All fields in SI base units; `Cluster.from_dict(c.to_dict()) == c`."""
        from hierarchical_ap.cluster_file import cluster_to_dict

        return cluster_to_dict(self)

    def to_file(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as YAML (.yaml/.yml) or JSON (.json); returns the path."""
        from hierarchical_ap.cluster_file import cluster_to_file

        return cluster_to_file(self, path)

    # ----------------------------------------------------------------------------- meshes

    def submesh(
        self, num_hosts: int, num_devices_per_host: int, host_start: int = 0, device_start: int = 0
    ) -> Submesh:
        """The block of `num_hosts` hosts × `num_devices_per_host` devices at the given offsets."""
        return Submesh(self, host_start, num_hosts, device_start, num_devices_per_host)

    def logical_mesh(self, shape: tuple[int, int]) -> LogicalMesh:
        """A (rows, cols) mesh over the first rows × cols devices, which must fit in one host or
        be a whole number of hosts."""
        rows, cols = shape = _mesh_shape(shape)
        n = rows * cols
        if n <= self.devices_per_host:
            return self.submesh(1, n).logical_mesh(shape)
        if n % self.devices_per_host == 0 and n // self.devices_per_host <= self.num_hosts:
            return self.submesh(n // self.devices_per_host, self.devices_per_host).logical_mesh(
                shape
            )
        raise _invalid(
            f"logical mesh {shape} has {n} devices: it must use at most "
            f"{self.devices_per_host} devices (one host) or a multiple of {self.devices_per_host} "
            f"up to {self.num_devices} (whole hosts) of this {self.num_hosts}x"
            f"{self.devices_per_host}x{self.device.name} cluster"
        )
