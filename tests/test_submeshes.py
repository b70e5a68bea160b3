"""Alpa's submesh shapes tile the cluster (Theorem 1), checked on random multisets."""

from __future__ import annotations

import numpy as np
import pytest

from hierarchical_ap.cluster import Cluster
from stage_partitioner.submeshes import logical_mesh_shapes, place_submeshes, submesh_shapes


def test_shapes_of_a_4x8_cluster():
    assert submesh_shapes(4, 8) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (3, 8), (4, 8)]
    assert submesh_shapes(1, 6) == [(1, 1), (1, 2), (1, 4), (1, 6)]


def test_logical_meshes_of_sixteen_devices():
    assert logical_mesh_shapes(16) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]


def random_multiset(rng: np.random.Generator, hosts: int, per_host: int) -> list[tuple[int, int]]:
    """Random Alpa shapes whose devices add up to the cluster's."""
    shapes = submesh_shapes(hosts, per_host)
    while True:
        chosen, total = [], 0
        while total < hosts * per_host:
            n, m = shapes[rng.integers(len(shapes))]
            if total + n * m <= hosts * per_host:
                chosen.append((n, m))
                total += n * m
        if total == hosts * per_host:
            return chosen


@pytest.mark.parametrize("seed", range(30))
def test_any_multiset_of_alpa_shapes_tiles_the_cluster(seed):
    rng = np.random.default_rng(seed)
    hosts, per_host = int(rng.integers(1, 5)), int(rng.choice([1, 2, 4, 8]))
    cluster = Cluster.from_spec(f"{hosts}x{per_host}xA100-80GB")
    shapes = random_multiset(rng, hosts, per_host)
    placed = place_submeshes(shapes, cluster)
    devices = [d for submesh in placed for d in submesh.device_ids]
    assert sorted(devices) == list(range(cluster.num_devices))
    for submesh, (n, m) in zip(placed, shapes, strict=True):
        assert (submesh.num_hosts, submesh.num_devices_per_host) == (n, m)


def test_shapes_that_do_not_add_up_are_rejected():
    cluster = Cluster.from_spec("2x8xA100-80GB")
    with pytest.raises(ValueError, match="use 8 devices, the cluster has 16"):
        place_submeshes([(1, 8)], cluster)
    with pytest.raises(ValueError, match="must be among"):
        place_submeshes([(2, 4), (1, 8)], cluster)
