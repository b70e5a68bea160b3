"""Ray actors: one per device, placed host by host, joined into one torch.distributed group.

Each host of the plan's cluster becomes a ``STRICT_PACK`` placement group of one bundle per
device (``{"CPU": 1}``, plus ``{"GPU": 1}`` on GPU clusters), so device ``d`` — host ``d //
devices_per_host``, local slot ``d % devices_per_host`` — is actor ``d``, and a stage's submesh
(whole hosts, or a block of one host) lands on the hosts it was planned for. Worker 0 names the
rendezvous address (its node's IP and a free port); every actor then joins the global group
(gloo on CPU, NCCL on GPU) with the given timeout. The actors run at normal CPU priority
(``cluster_ray.WORKER_RUNTIME_ENV``; Ray's default for workers is niceness 15).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.cluster_ray import WORKER_RUNTIME_ENV
from hierarchical_ap.errors import WorkerFailedError
from runtime.worker import PipelineWorker

logger = logging.getLogger(__name__)


class RayPipelineWorker(PipelineWorker):
    """``PipelineWorker`` as a Ray actor (plus the rendezvous address)."""

    def __init__(self, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        import torch

        torch.set_num_threads(1)
        super().__init__(rank, world_size, backend, timeout_s)

    def rendezvous(self) -> str:
        """``tcp://ip:port`` on this actor's node, with a port free right now."""
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def pid(self) -> int:
        return os.getpid()


def ensure_ray(cluster: Cluster) -> bool:
    """Start a local Ray instance with a logical CPU per device when none is running;
    returns whether it was started here (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    ray.init(
        num_cpus=max(cluster.num_devices, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    return True


def start_actors(cluster: Cluster, timeout_s: float) -> tuple[list[Any], list[PlacementGroup]]:
    """One joined actor per device of ``cluster``; on failure nothing is left behind."""
    gpu = cluster.backend == "nccl"
    bundle = {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}
    groups = [
        placement_group([dict(bundle)] * cluster.devices_per_host, strategy="STRICT_PACK")
        for _ in range(cluster.num_hosts)
    ]
    actors: list[Any] = []
    try:
        ready = ray.get([g.ready() for g in groups], timeout=timeout_s)
        assert len(ready) == len(groups)
        remote = ray.remote(RayPipelineWorker)
        for device in range(cluster.num_devices):
            host, slot = divmod(device, cluster.devices_per_host)
            actors.append(
                remote.options(
                    num_cpus=1,
                    num_gpus=1 if gpu else 0,
                    runtime_env=WORKER_RUNTIME_ENV,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=groups[host], placement_group_bundle_index=slot
                    ),
                ).remote(device, cluster.num_devices, cluster.backend, timeout_s)
            )
        address = ray.get(actors[0].rendezvous.remote(), timeout=timeout_s)
        ray.get([a.join.remote(address) for a in actors], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        stop_actors(actors, groups)
        raise WorkerFailedError(
            f"{cluster.num_devices} runtime workers did not start within {timeout_s:g} s; check "
            f"that Ray can place {cluster.num_devices} workers of {bundle} (`ray status`)"
        ) from exc
    except BaseException:
        stop_actors(actors, groups)
        raise
    return actors, groups


def stop_actors(actors: list[Any], groups: list[PlacementGroup]) -> None:
    """Kill every actor and remove the placement groups (safe to call twice)."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead or Ray gone: nothing left to free
            logger.debug("actor already gone", exc_info=True)
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # as above
            logger.debug("placement group already removed", exc_info=True)
