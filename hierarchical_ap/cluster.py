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
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from hierarchical_ap.errors import ClusterSpecError

logger = logging.getLogger(__name__)

#: One-hop latency of NVLink between two GPUs of a host (NCCL's per-step latency is a few µs).
NVLINK_LATENCY_S = 5e-6
#: One-hop latency of an InfiniBand fabric (HDR/NDR, including the NCCL proxy), per step.
INFINIBAND_LATENCY_S = 10e-6
#: One-hop latency of the TCP/Ethernet network of Alpa's AWS p3.16xlarge (V100) testbed.
ETHERNET_LATENCY_S = 25e-6
#: Loopback TCP between gloo workers on one host, per worker and direction, and its per-step
#: latency: `hap cluster probe --workers 2` on a 2-core development VM fitted 1/beta ≈ 1.2 GB/s
#: and alpha ≈ 0.15–0.4 ms per step for all-reduce (gloo in Ray actors, one thread each).
LOOPBACK_BANDWIDTH = 1.2e9
LOOPBACK_LATENCY_S = 2e-4
#: Network between CPU hosts: a 10 Gbit/s Ethernet NIC.
CPU_INTER_HOST_BANDWIDTH = 1.25e9
#: Single-precision GEMM rate of one x86 core: two 256-bit FMA units at ~3 GHz ≈ 96 GFLOP/s.
CPU_CORE_PEAK_FLOPS = 1e11
#: DRAM bandwidth one core streams (a copy reaches ~8 GB/s on one core of the development VM).
CPU_CORE_MEMORY_BANDWIDTH = 1e10

#: Datasheet single-precision peaks (non-tensor-core FP32) in TFLOP/s; hardware.csv lists the
#: dense bf16/fp16 tensor-core peaks only. H100 is the SXM part.
DATASHEET_FP32_TFLOPS = {
    "V100-16GB": 15.7,
    "A100-40GB": 19.5,
    "A100-80GB": 19.5,
    "H100-80GB": 67.0,
    "H200-141GB": 67.0,
    "B200-192GB": 80.0,
}

CPU_DEVICE_NAME = "CPU"
BACKENDS = ("nccl", "gloo")
EXAMPLE_SPEC = "2x8xA100-80GB"
EXAMPLE = (
    f"a valid cluster is e.g. the spec '{EXAMPLE_SPEC}' (hosts x devices per host x device type) "
    "or a YAML file such as 'spec: 2x8xA100-80GB' plus overrides like "
    "'inter_host_link: {bandwidth_gbps: 100}'"
)

GIB = 2**30
_SPEC_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\S+)\s*$")
# hardware.csv notes a per-host (not per-GPU) network figure as "per host shared by N GPUs".
_SHARED_NIC_RE = re.compile(r"per host shared by (\d+) GPUs")


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
    """One accelerator (or CPU worker): memory (bytes), peak FLOP/s per dtype, HBM bytes/s."""

    name: str
    memory_bytes: int
    peak_flops_fp32: float
    peak_flops_bf16: float
    peak_flops_fp16: float
    hbm_bandwidth: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _invalid(f"DeviceSpec.name must be a non-empty string, got {self.name!r}")
        _check_count("DeviceSpec", "memory_bytes", self.memory_bytes)
        for field in ("peak_flops_fp32", "peak_flops_bf16", "peak_flops_fp16"):
            _check_positive("DeviceSpec", field, getattr(self, field), "FLOP/s")
        _check_positive("DeviceSpec", "hbm_bandwidth", self.hbm_bandwidth, "bytes/s")

    @property
    def is_cpu(self) -> bool:
        """True for CPU workers (gloo), which have no separate tensor-core rates."""
        return self.name.upper() == CPU_DEVICE_NAME

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
        AMX), memory bandwidth = `CPU_CORE_MEMORY_BANDWIDTH` × cores / workers. Host RAM and
        cores default to this machine's.
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
        )


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class _Preset:
    device: DeviceSpec
    intra_host_link: Link
    inter_host_link: Link


@cache
def _presets() -> dict[str, _Preset]:
    """hardware.csv as presets keyed by upper-case name.

    Memory is read as GiB (A100-80GB reports 81920 MiB), bandwidths as decimal GB/s and peaks as
    TFLOP/s. The intra-host link is NVLink per direction; the inter-host link is the per-GPU
    network figure, except where the note says the figure is per host shared by N GPUs (the V100
    testbed's 25 Gbit/s Ethernet), which is divided by N and gets the Ethernet latency.
    """
    text = (resources.files("hierarchical_ap") / "data" / "hardware.csv").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    presets: dict[str, _Preset] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row["device"]
        half = float(row["peak_tflops_bf16_or_fp16"]) * 1e12
        device = DeviceSpec(
            name=name,
            memory_bytes=int(float(row["memory_gb"]) * GIB),
            peak_flops_fp32=DATASHEET_FP32_TFLOPS[name] * 1e12,
            peak_flops_bf16=half,
            peak_flops_fp16=half,
            hbm_bandwidth=float(row["hbm_tb_s"]) * 1e12,
        )
        shared = _SHARED_NIC_RE.search(row["note"])
        sharers = int(shared.group(1)) if shared else 1
        inter = Link(
            bandwidth=float(row["typical_internode_per_gpu_gb_s"]) * 1e9 / sharers,
            latency=ETHERNET_LATENCY_S if shared else INFINIBAND_LATENCY_S,
        )
        intra = Link(
            bandwidth=float(row["nvlink_gb_s_per_direction"]) * 1e9, latency=NVLINK_LATENCY_S
        )
        presets[name.upper()] = _Preset(device, intra, inter)
    return presets


def preset_names() -> tuple[str, ...]:
    """The names `DeviceSpec.preset` and cluster specs accept, CPU included."""
    return (*(p.device.name for p in _presets().values()), CPU_DEVICE_NAME)


def _preset_row(name: str) -> _Preset:
    """Resolve a device name: exact (case-insensitive), then a unique family ("H100" for
    "H100-80GB"); an ambiguous family ("A100") or an unknown name is an error listing choices."""
    presets = _presets()
    key = name.strip().upper()
    if key in presets:
        return presets[key]
    family = [p for k, p in presets.items() if k.rsplit("-", 1)[0] == key]
    if len(family) == 1:
        return family[0]
    if family:
        choices = ", ".join(p.device.name for p in family)
        raise _invalid(f"device {name!r} is ambiguous: be specific, one of {choices}")
    raise _invalid(f"unknown device {name!r}; known devices: {', '.join(preset_names())}")


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
        import ray

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

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Cluster:
        """Read a cluster from a YAML (.yaml/.yml) or JSON (.json) file; see `from_dict`."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise _invalid(f"cannot read cluster file {str(path)!r}: {exc.strerror}") from exc
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(text)
            elif suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                raise _invalid(f"cluster file {str(path)!r} must end in .yaml, .yml or .json")
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise _invalid(
                f"cluster file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}"
            ) from exc
        try:
            return cls.from_dict(data)
        except ClusterSpecError as exc:
            raise ClusterSpecError(f"cluster file {str(path)!r}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cluster:
        """Build a cluster from plain data (a parsed file). Every field is optional given a base:

        - `spec`: a spec string giving defaults for all fields (see `from_spec`);
        - `num_hosts`, `devices_per_host`: integers;
        - `device`: a device name (its datasheet links become the defaults too), or a mapping with
          `name`, `memory_bytes` | `memory_gib`, `peak_flops_{fp32,bf16,fp16}` |
          `peak_tflops_{fp32,bf16,fp16}`, `hbm_bandwidth` | `hbm_gb_s`, overriding the named
          preset or the spec's device (all fields needed for a custom device without either);
        - `intra_host_link`, `inter_host_link`: `bandwidth` (bytes/s) | `bandwidth_gb_s`
          (GB/s) | `bandwidth_gbps` (Gbit/s), `latency` (s) | `latency_us`, and `collectives`:
          {all_reduce: {alpha: s, beta: s/byte}, …} as fitted by `hap cluster probe`;
        - `backend`: "nccl" or "gloo" (default: gloo for CPU devices, else nccl).
        """
        if not isinstance(data, Mapping):
            raise _invalid(
                f"a cluster description is a mapping of fields, got {type(data).__name__}"
            )
        _check_keys(data, _CLUSTER_KEYS, "cluster")
        defaults: dict[str, Any] = {}
        if "spec" in data:
            spec = cls.from_spec(data["spec"])
            defaults = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        fields = {}
        for key in ("num_hosts", "devices_per_host"):
            fields[key] = _integer(data[key], key) if key in data else defaults.get(key)
            if fields[key] is None:
                raise _invalid(f"missing {key!r} (or a 'spec' to take it from)")
        device_name = _device_name(data.get("device"))
        if device_name is not None:
            defaults.update(_device_defaults(device_name, fields["devices_per_host"]))
        fields["device"] = _device_from(data.get("device"), defaults.get("device"))
        for key in ("intra_host_link", "inter_host_link"):
            fields[key] = _link_from(data.get(key), defaults.get(key), key)
        backend = data.get("backend", defaults.get("backend"))
        fields["backend"] = backend if backend is not None else _default_backend(fields["device"])
        return cls(**fields)

    # ----------------------------------------------------------------------------- output

    def to_dict(self) -> dict[str, Any]:
        """All fields in SI base units; `Cluster.from_dict(c.to_dict()) == c`."""
        return {
            "num_hosts": self.num_hosts,
            "devices_per_host": self.devices_per_host,
            "backend": self.backend,
            "device": dataclasses.asdict(self.device),
            "intra_host_link": _link_to_dict(self.intra_host_link),
            "inter_host_link": _link_to_dict(self.inter_host_link),
        }

    def to_file(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as YAML (.yaml/.yml) or JSON (.json); returns the path."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            raise _invalid(f"cluster file {str(path)!r} must end in .yaml, .yml or .json")
        path.write_text(text)
        return path

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


# --------------------------------------------------------------------------------- file fields

_CLUSTER_KEYS = frozenset(
    {
        "spec",
        "num_hosts",
        "devices_per_host",
        "device",
        "intra_host_link",
        "inter_host_link",
        "backend",
    }
)
# canonical field -> {accepted key: exact scale to SI base units}
_DEVICE_UNITS = {
    "memory_bytes": {"memory_bytes": Fraction(1), "memory_gib": Fraction(GIB)},
    "peak_flops_fp32": {"peak_flops_fp32": Fraction(1), "peak_tflops_fp32": Fraction(10**12)},
    "peak_flops_bf16": {"peak_flops_bf16": Fraction(1), "peak_tflops_bf16": Fraction(10**12)},
    "peak_flops_fp16": {"peak_flops_fp16": Fraction(1), "peak_tflops_fp16": Fraction(10**12)},
    "hbm_bandwidth": {"hbm_bandwidth": Fraction(1), "hbm_gb_s": Fraction(10**9)},
}
_LINK_UNITS = {
    "bandwidth": {
        "bandwidth": Fraction(1),
        "bandwidth_gb_s": Fraction(10**9),
        "bandwidth_gbps": Fraction(10**9, 8),
    },
    "latency": {"latency": Fraction(1), "latency_us": Fraction(1, 10**6)},
}
_FIT_KEYS = frozenset({"alpha", "beta"})


def _check_keys(data: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise _invalid(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _number(value: Any, where: str) -> float:
    """A number; numeric strings are accepted because YAML reads `25e9` as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _invalid(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _invalid(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _invalid(f"{where} must be a finite number, got {value!r}")
    return number


def _integer(value: Any, where: str) -> int:
    number = _number(value, where)
    if not number.is_integer():
        raise _invalid(f"{where} must be an integer, got {value!r}")
    return int(number)


def _quantities(
    data: Mapping[str, Any], units: dict[str, dict[str, Fraction]], where: str
) -> dict[str, float]:
    """Canonical field -> value in SI units (correctly rounded), for the fields `data` gives in
    any accepted unit."""
    values = {}
    for field, aliases in units.items():
        given = [key for key in aliases if key in data]
        if len(given) > 1:
            raise _invalid(f"{where} gives {field} twice ({', '.join(given)}); keep one")
        if given:
            key = given[0]
            values[field] = float(Fraction(_number(data[key], f"{where}.{key}")) * aliases[key])
    return values


def _device_defaults(name: str, devices_per_host: int) -> dict[str, Any]:
    """Device, links and backend for a device name (a datasheet preset or "CPU")."""
    if name.strip().upper() == CPU_DEVICE_NAME:
        return {
            "device": DeviceSpec.cpu(devices_per_host),
            "intra_host_link": Link(LOOPBACK_BANDWIDTH, LOOPBACK_LATENCY_S),
            "inter_host_link": Link(CPU_INTER_HOST_BANDWIDTH, ETHERNET_LATENCY_S),
            "backend": "gloo",
        }
    row = _preset_row(name)
    return {
        "device": row.device,
        "intra_host_link": row.intra_host_link,
        "inter_host_link": row.inter_host_link,
        "backend": "nccl",
    }


def _default_backend(device: DeviceSpec) -> str:
    return "gloo" if device.is_cpu else "nccl"


def _is_known_device(name: str) -> bool:
    return name.strip().upper() in {n.upper() for n in preset_names()}


def _device_name(data: Any) -> str | None:
    """The preset a `device` entry names (a string, or a mapping's known `name`), if any."""
    if isinstance(data, str):
        return data
    if (
        isinstance(data, Mapping)
        and isinstance(data.get("name"), str)
        and _is_known_device(data["name"])
    ):
        return data["name"]
    return None


def _device_from(data: Any, default: DeviceSpec | None) -> DeviceSpec:
    if data is None or isinstance(data, str):
        if default is None:
            raise _invalid("missing 'device' (or a 'spec' to take it from)")
        return default
    if not isinstance(data, Mapping):
        raise _invalid(f"device must be a device name or a mapping of fields, got {data!r}")
    _check_keys(
        data, {"name", *(k for aliases in _DEVICE_UNITS.values() for k in aliases)}, "device"
    )
    values: dict[str, Any] = _quantities(data, _DEVICE_UNITS, "device")
    if "memory_bytes" in values:
        values["memory_bytes"] = int(values["memory_bytes"])
    if "name" in data:
        values["name"] = data["name"]
    if default is None:
        missing = [f.name for f in dataclasses.fields(DeviceSpec) if f.name not in values]
        if missing:
            raise _invalid(f"custom device {data.get('name', '?')!r} is missing {missing}")
    try:
        return (
            dataclasses.replace(default, **values) if default is not None else DeviceSpec(**values)
        )
    except ClusterSpecError as exc:
        raise ClusterSpecError(f"device: {exc}") from None


def _link_from(data: Any, default: Link | None, where: str) -> Link:
    if data is None:
        if default is None:
            raise _invalid(f"missing {where!r} (or a 'spec' or device preset to take it from)")
        return default
    if not isinstance(data, Mapping):
        raise _invalid(f"{where} must be a mapping with bandwidth and latency, got {data!r}")
    _check_keys(
        data, {"collectives", *(k for aliases in _LINK_UNITS.values() for k in aliases)}, where
    )
    values: dict[str, Any] = _quantities(data, _LINK_UNITS, where)
    if "collectives" in data:
        values["fitted"] = _fits_from(data["collectives"], f"{where}.collectives")
    if default is None:
        missing = [f for f in _LINK_UNITS if f not in values]
        if missing:
            raise _invalid(f"{where} is missing {missing}")
    try:
        return dataclasses.replace(default, **values) if default is not None else Link(**values)
    except ClusterSpecError as exc:
        raise ClusterSpecError(f"{where}: {exc}") from None


def _fits_from(data: Any, where: str) -> dict[Collective, AlphaBeta]:
    if not isinstance(data, Mapping):
        raise _invalid(f"{where} must map collective names to {{alpha, beta}}, got {data!r}")
    fits = {}
    for name, fit in data.items():
        if not isinstance(fit, Mapping) or set(fit) != _FIT_KEYS:
            raise _invalid(
                f"{where}.{name} must be a mapping with exactly alpha and beta, got {fit!r}"
            )
        fits[_collective(name)] = AlphaBeta(
            _number(fit["alpha"], f"{where}.{name}.alpha"),
            _number(fit["beta"], f"{where}.{name}.beta"),
        )
    return fits


def _link_to_dict(link: Link) -> dict[str, Any]:
    out: dict[str, Any] = {"bandwidth": link.bandwidth, "latency": link.latency}
    if link.fitted:
        out["collectives"] = {c.value: dataclasses.asdict(fit) for c, fit in link.fitted}
    return out


# --------------------------------------------------------------------------------- Ray

_RAY_ACCELERATOR_PREFIX = "accelerator_type:"


def cluster_from_ray_nodes(nodes: Sequence[Mapping[str, Any]]) -> Cluster:
    """The cluster described by `ray.nodes()`: alive nodes with GPUs are hosts of their
    `accelerator_type` (mapped to a datasheet preset); without GPUs, every alive node with CPUs
    is a host of one CPU worker per CPU, sharing the node's Ray memory."""
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
