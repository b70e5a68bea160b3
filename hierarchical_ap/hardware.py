"""Datasheet hardware: the device presets of `data/hardware.csv` and the link constants.

`DeviceSpec.preset`, cluster specs ("2x8xA100-80GB"), cluster files and Ray discovery all resolve
device names here. The presets are built from the core types of `hierarchical_ap.cluster`, which
itself imports this module's constants, so those types are imported where they are used.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hierarchical_ap.cluster import DeviceSpec, Link

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
#: Host-side time of one eager aten call on one core, autograd included: a chain of scalar
#: multiplies on a 16-element tensor, forward and backward, takes ~11 µs per dispatched kernel
#: (torch 2.13, one thread, the development VM; `hap cluster probe` measures it per cluster).
CPU_KERNEL_OVERHEAD_S = 1.1e-5
#: What DTensor adds to each op it dispatches on one core (sharding propagation and wrapping):
#: `hap cluster probe --workers 2` on the 2-core development VM measured 48.6 and 57.0 µs per
#: op on top of the plain kernel (torch 2.13; 86.9 µs with four workers on the two cores).
CPU_DTENSOR_DISPATCH_S = 5e-5

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

MIB = 2**20
GIB = 2**30
# hardware.csv notes a per-host (not per-GPU) network figure as "per host shared by N GPUs".
_SHARED_NIC_RE = re.compile(r"per host shared by (\d+) GPUs")


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
    from hierarchical_ap.cluster import DeviceSpec, Link

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
    from hierarchical_ap.cluster import _invalid

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


def _device_defaults(name: str, devices_per_host: int) -> dict[str, Any]:
    """Device, links and backend for a device name (a datasheet preset or "CPU")."""
    from hierarchical_ap.cluster import DeviceSpec, Link

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
