"""What-if changes to a cluster: ``hap advise --what-if KEY=VALUE[,KEY=VALUE…]``.

Each ``--what-if`` is one scenario; its comma-separated changes apply together, in order:

    cluster=SPEC           another cluster (a spec such as 32x8xH100-80GB, or a cluster file)
    device=NAME            the same hosts with another datasheet device, and its NVLink and
                           network figures (``data/hardware.csv``)
    hosts=N                N hosts of the same kind
    inter-host-gbps=G      the network at G Gbit/s per device and direction (latency kept)
    intra-host-gbps=G      the links inside a host at G Gbit/s per device and direction
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import PlannerOptionError
from stage_partitioner.model_planning import cluster_from_text

EXAMPLE = "--what-if device=B200-192GB or --what-if cluster=32x8xH100-80GB,inter-host-gbps=400"


@dataclass(frozen=True)
class WhatIf:
    """One scenario: the changes as the user wrote them, parsed."""

    text: str
    changes: tuple[tuple[str, str], ...]


def parse_what_if(text: str) -> WhatIf:
    """``KEY=VALUE[,KEY=VALUE…]`` → a ``WhatIf``; unknown keys or bad values are errors."""
    changes = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise PlannerOptionError(f"what-if {item!r} is not KEY=VALUE; e.g. {EXAMPLE}")
        if key not in _CHANGES:
            raise PlannerOptionError(
                f"unknown what-if key {key!r}; known keys: {', '.join(_CHANGES)}; e.g. {EXAMPLE}"
            )
        if key.endswith("gbps") or key == "hosts":
            _positive(key, value)
        changes.append((key, value))
    return WhatIf(text, tuple(changes))


def apply_what_if(cluster: Cluster, what_if: WhatIf) -> Cluster:
    """The cluster with the scenario's changes applied."""
    for key, value in what_if.changes:
        cluster = _CHANGES[key](cluster, value)
    return cluster


def describe(cluster: Cluster) -> str:
    """``192x8xA100-80GB`` (hosts × devices per host × device)."""
    return f"{cluster.num_hosts}x{cluster.devices_per_host}x{cluster.device.name}"


def _positive(key: str, value: str) -> None:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or (key == "hosts" and not number.is_integer()):
        kind = "a whole number" if key == "hosts" else "a number"
        raise PlannerOptionError(f"what-if {key}={value}: expected {kind} > 0; e.g. {EXAMPLE}")


def _cluster(_: Cluster, value: str) -> Cluster:
    return cluster_from_text(value)


def _device(cluster: Cluster, value: str) -> Cluster:
    return Cluster.from_spec(f"{cluster.num_hosts}x{cluster.devices_per_host}x{value}")


def _hosts(cluster: Cluster, value: str) -> Cluster:
    return dataclasses.replace(cluster, num_hosts=int(float(value)))


def _link_bandwidth(field: str) -> Callable[[Cluster, str], Cluster]:
    def change(cluster: Cluster, value: str) -> Cluster:
        bandwidth = float(value) * 1e9 / 8
        link = dataclasses.replace(getattr(cluster, field), bandwidth=bandwidth, fitted=())
        return dataclasses.replace(cluster, **{field: link})

    return change


_CHANGES: dict[str, Callable[[Cluster, str], Cluster]] = {
    "cluster": _cluster,
    "device": _device,
    "hosts": _hosts,
    "inter-host-gbps": _link_bandwidth("inter_host_link"),
    "intra-host-gbps": _link_bandwidth("intra_host_link"),
}
