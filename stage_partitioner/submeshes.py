"""Submesh shapes a stage may take, their logical meshes, and their placement on the cluster.

Alpa (§5.2) restricts a stage's submesh of an ``N × M`` cluster (N hosts, M devices each) to

    (1, 1), (1, 2), (1, 4), …, (1, 2^k ≤ M)   inside one host, and
    (n, M) for n = 2..N                        whole hosts,

and proves that any multiset of such shapes whose devices add up to ``N·M`` tiles the cluster
(Theorem 1). ``place_submeshes`` builds such a tiling: whole-host shapes take whole hosts first,
then in-host shapes are packed largest first into the hosts left, each at an offset that is a
multiple of its size (a buddy allocation, which never fragments powers of two).
"""

from __future__ import annotations

from collections.abc import Sequence

from hierarchical_ap.cluster import Cluster, Submesh


def submesh_shapes(num_hosts: int, devices_per_host: int) -> list[tuple[int, int]]:
    """Alpa's submesh shapes ``(hosts, devices per host)`` for an ``N × M`` cluster.

    In-host shapes are the powers of two up to M, and M itself when M is not a power of two.
    """
    inside = []
    size = 1
    while size <= devices_per_host:
        inside.append((1, size))
        size *= 2
    if inside[-1][1] != devices_per_host:
        inside.append((1, devices_per_host))
    return inside + [(n, devices_per_host) for n in range(2, num_hosts + 1)]


def logical_mesh_shapes(num_devices: int) -> list[tuple[int, int]]:
    """Every 2D view ``(rows, cols)`` with ``rows · cols = num_devices``."""
    return [
        (rows, num_devices // rows) for rows in range(1, num_devices + 1) if num_devices % rows == 0
    ]


def place_submeshes(shapes: Sequence[tuple[int, int]], cluster: Cluster) -> list[Submesh]:
    """Disjoint submeshes of ``cluster`` for ``shapes`` (in the given order), covering it.

    Raises ``ValueError`` when the shapes do not use exactly the cluster's devices or are not
    Alpa shapes.
    """
    hosts, per_host = cluster.num_hosts, cluster.devices_per_host
    allowed = set(submesh_shapes(hosts, per_host))
    if any(tuple(s) not in allowed for s in shapes):
        raise ValueError(f"submesh shapes must be among {sorted(allowed)}, got {list(shapes)}")
    if sum(n * m for n, m in shapes) != hosts * per_host:
        raise ValueError(
            f"submeshes {list(shapes)} use {sum(n * m for n, m in shapes)} devices, "
            f"the cluster has {hosts * per_host}"
        )
    placed: dict[int, Submesh] = {}
    next_host = 0
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0], -shapes[i][1]))
    for index in order:
        n, _ = shapes[index]
        if n > 1:
            placed[index] = cluster.submesh(n, per_host, host_start=next_host)
            next_host += n
    free = {host: [0] * per_host for host in range(next_host, hosts)}
    for index in order:
        n, m = shapes[index]
        if n > 1:
            continue
        host, start = _first_aligned_gap(free, m)
        for d in range(start, start + m):
            free[host][d] = 1
        placed[index] = cluster.submesh(1, m, host_start=host, device_start=start)
    return [placed[i] for i in range(len(shapes))]


def _first_aligned_gap(free: dict[int, list[int]], size: int) -> tuple[int, int]:
    for host, used in free.items():
        for start in range(0, len(used) - size + 1, size):
            if not any(used[start : start + size]):
                return host, start
    raise ValueError(f"no room left for a 1x{size} submesh")
