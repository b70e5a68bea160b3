"""Which pipeline rank each device of a plan's cluster belongs to."""

from __future__ import annotations

from hierarchical_ap.plan import ParallelPlan


def device_ranks(plan: ParallelPlan) -> list[int]:
    """``ranks[d]`` is the pipeline rank (device group) that device ``d`` runs.

    Stage ``i`` runs on rank ``i % num_ranks``; with ``virtual_stages = 1`` rank and stage are
    the same. A valid plan gives every device exactly one rank."""
    num_devices = plan.cluster["num_hosts"] * plan.cluster["devices_per_host"]
    ranks = [-1] * num_devices
    for rank, stage in enumerate(plan.stages[: plan.num_ranks]):
        for device in stage.devices:
            ranks[device] = rank
    return ranks


def rank_stages(plan: ParallelPlan, rank: int) -> list[int]:
    """The stages that run on pipeline rank ``rank``: ``rank, rank + p, rank + 2p, …``."""
    return list(range(rank, len(plan.stages), plan.num_ranks))
