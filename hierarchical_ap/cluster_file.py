"""Cluster files: reading and writing `Cluster`s as YAML/JSON files and plain dicts.

`Cluster.from_file`, `Cluster.from_dict`, `Cluster.to_dict` and `Cluster.to_file` delegate here.
Files store SI base units; on input a few human units are accepted too (GB/s, Gbit/s, µs, GiB,
TFLOP/s), each converted exactly (see `_DEVICE_UNITS` and `_LINK_UNITS`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from hierarchical_ap.cluster import (
    AlphaBeta,
    Cluster,
    Collective,
    DeviceSpec,
    Link,
    _collective,
    _invalid,
)
from hierarchical_ap.errors import ClusterSpecError
from hierarchical_ap.hardware import GIB, MIB, _device_defaults, preset_names


def cluster_from_file(cls: type[Cluster], path: str | os.PathLike[str]) -> Cluster:
    """`Cluster.from_file`: read a cluster of type `cls` from a YAML (.yaml/.yml) or JSON
    (.json) file; see `cluster_from_dict`."""
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


def cluster_from_dict(cls: type[Cluster], data: Mapping[str, Any]) -> Cluster:
    """`Cluster.from_dict`: build a cluster of type `cls` from plain data (a parsed file);
    the accepted fields are listed in `Cluster.from_dict`."""
    if not isinstance(data, Mapping):
        raise _invalid(f"a cluster description is a mapping of fields, got {type(data).__name__}")
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


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    """`Cluster.to_dict`: all fields in SI base units; `Cluster.from_dict(c.to_dict()) == c`."""
    return {
        "num_hosts": cluster.num_hosts,
        "devices_per_host": cluster.devices_per_host,
        "backend": cluster.backend,
        "device": dataclasses.asdict(cluster.device),
        "intra_host_link": _link_to_dict(cluster.intra_host_link),
        "inter_host_link": _link_to_dict(cluster.inter_host_link),
    }


def cluster_to_file(cluster: Cluster, path: str | os.PathLike[str]) -> Path:
    """`Cluster.to_file`: write `cluster.to_dict()` as YAML (.yaml/.yml) or JSON (.json);
    returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(cluster.to_dict(), indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(cluster.to_dict(), sort_keys=False)
    else:
        raise _invalid(f"cluster file {str(path)!r} must end in .yaml, .yml or .json")
    path.write_text(text)
    return path


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
    "kernel_overhead_s": {
        "kernel_overhead_s": Fraction(1),
        "kernel_overhead_us": Fraction(1, 10**6),
    },
    "cache_bandwidth": {"cache_bandwidth": Fraction(1), "cache_gb_s": Fraction(10**9)},
    "cache_bytes": {"cache_bytes": Fraction(1), "cache_mib": Fraction(MIB)},
    "dtensor_dispatch_s": {
        "dtensor_dispatch_s": Fraction(1),
        "dtensor_dispatch_us": Fraction(1, 10**6),
    },
    "compute_scale": {"compute_scale": Fraction(1)},
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
    for field in ("memory_bytes", "cache_bytes"):
        if field in values:
            values[field] = int(values[field])
    if "name" in data:
        values["name"] = data["name"]
    if default is None:
        missing = [
            f.name
            for f in dataclasses.fields(DeviceSpec)
            if f.name not in values and f.default is dataclasses.MISSING
        ]
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
