"""Cross-mesh transfers on 6 real gloo processes: every destination rank's local tensor must be
exactly the slice of the full reference tensor that its placement names (DTensor's definition,
``reference_local``), for forward activations and for gradients sent back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.placement_types import Replicate, Shard

from runtime.cross_mesh import new_mesh_axis_groups, plan_transfer, run_transfer, start_transfer
from tests.distributed import DistributedError, DistributedWorkers
from tests.test_cross_mesh_plan import reference_local

WORLD = 6
R = Replicate()
SRC = np.array([0, 1])
DST_2X2 = np.array([[2, 3], [4, 5]])
APART = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 1}
"""Source ranks on one host, destination ranks on another: the local all-gather pays."""

CASES: dict[str, dict[str, Any]] = {
    "S0->RS1-local-all-gather": dict(
        shape=(4, 6),
        src=SRC,
        src_pl=(Shard(0),),
        dst=DST_2X2,
        dst_pl=(R, Shard(1)),
        hosts=APART,
        variant="local_all_gather",
    ),
    "S0->RS1-send-recv": dict(
        shape=(4, 6),
        src=SRC,
        src_pl=(Shard(0),),
        dst=DST_2X2,
        dst_pl=(R, Shard(1)),
        hosts=APART,
        local_all_gather=False,
        variant="send_recv",
    ),
    "R->S0-int64": dict(
        shape=(8, 3),
        src=SRC,
        src_pl=(R,),
        dst=np.array([2, 3, 4, 5]),
        dst_pl=(Shard(0),),
        dtype=torch.int64,
        variant="send_recv",
    ),
    "S1->S0R-ranks-not-in-mesh-order": dict(
        shape=(4, 6),
        src=SRC,
        src_pl=(Shard(1),),
        dst=np.array([[3, 2], [5, 4]]),
        dst_pl=(Shard(0), R),
        hosts=APART,
        variant="local_all_gather",
    ),
    "S0->RR-two-axis-gather": dict(
        shape=(4, 6),
        src=SRC,
        src_pl=(Shard(0),),
        dst=DST_2X2,
        dst_pl=(R, R),
        hosts=APART,
        variant="local_all_gather",
    ),
    "S0->S0-uneven": dict(
        shape=(5, 3),
        src=SRC,
        src_pl=(Shard(0),),
        dst=np.array([2, 3, 4, 5]),
        dst_pl=(Shard(0),),
        variant="send_recv",
    ),
    "RS1->S0-gradient-back": dict(
        shape=(4, 6),
        src=SRC,
        src_pl=(Shard(0),),
        dst=DST_2X2,
        dst_pl=(R, Shard(1)),
        hosts=APART,
        backward=True,
        dtype=torch.float64,
    ),
    "S0S1->R-2d-source": dict(
        shape=(4, 6),
        src=np.array([[0, 1], [2, 3]]),
        src_pl=(Shard(0), Shard(1)),
        dst=np.array([4, 5]),
        dst_pl=(R,),
        hosts={0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1},
        variant="local_all_gather",
    ),
    "S0->S1R-overlapping-meshes": dict(
        shape=(4, 6),
        src=SRC,
        src_pl=(Shard(0),),
        dst=np.array([[1, 2], [3, 4]]),
        dst_pl=(Shard(1), R),
    ),
}


def _plan(case: dict[str, Any]):
    dtype = case.get("dtype", torch.float32)
    plan = plan_transfer(
        case["shape"],
        case["src"],
        case["src_pl"],
        case["dst"],
        case["dst_pl"],
        itemsize=dtype.itemsize,
        hosts_of=case.get("hosts"),
        local_all_gather=case.get("local_all_gather", True),
    )
    return plan.reversed() if case.get("backward") else plan


def _full(case: dict[str, Any]) -> torch.Tensor:
    shape = case["shape"]
    dtype = case.get("dtype", torch.float32)
    return torch.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) * 3 - 7


def run_case(case: dict[str, Any], with_groups: bool = True) -> dict[str, Any]:
    """On one rank: plan, take this rank's reference source shard, run the transfer."""
    rank = dist.get_rank()
    plan = _plan(case)
    groups = new_mesh_axis_groups(plan.dst_ranks, rank) if with_groups else None
    local_src = None
    if rank in plan.src_boxes:
        local_src = reference_local(_full(case), plan.src_ranks, plan.src_placements, rank)
    out = run_transfer(plan, local_src, rank, None, groups, dtype=_full(case).dtype)
    return {"out": out, "variant": plan.variant}


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(CASES))
def test_each_destination_rank_gets_its_exact_slice(workers, name):
    case = CASES[name]
    plan = _plan(case)
    if "variant" in case:
        assert plan.variant == case["variant"]
    full = _full(case)
    results = workers.run(run_case, case, timeout_s=60)
    for rank, result in enumerate(results):
        if rank in plan.dst_boxes:
            want = reference_local(full, plan.dst_ranks, plan.dst_placements, rank)
            assert result["out"].dtype == want.dtype
            assert torch.equal(result["out"], want), f"rank {rank}: {result['out']} != {want}"
        else:
            assert result["out"] is None


@pytest.mark.timeout(180)
def test_missing_all_gather_group_fails_on_the_receivers_without_a_hang(workers):
    with pytest.raises(DistributedError, match="pass dst_axis_groups") as raised:
        workers.run(run_case, CASES["S0->RS1-local-all-gather"], False, timeout_s=60)
    assert "did not finish in time" not in str(raised.value)
    assert "--- rank 0 ---" not in str(raised.value)  # the senders completed


def run_exchange(case: dict[str, Any]) -> dict[str, Any]:
    """On one rank: an activation goes forward while a gradient comes back. Each side starts
    its send first and its receive second, then waits for both."""
    rank = dist.get_rank()
    forward = _plan(case)
    backward = forward.reversed()
    groups = {
        "forward": new_mesh_axis_groups(forward.dst_ranks, rank),
        "backward": new_mesh_axis_groups(backward.dst_ranks, rank),
    }
    full = _full(case)
    gradient = -full
    order = ["forward", "backward"] if rank in forward.src_boxes else ["backward", "forward"]
    plans = {"forward": forward, "backward": backward}
    values = {"forward": full, "backward": gradient}
    pending = {}
    for name in order:
        plan = plans[name]
        local = None
        if rank in plan.src_boxes:
            local = reference_local(values[name], plan.src_ranks, plan.src_placements, rank)
        pending[name] = start_transfer(plan, local, rank, None, groups[name], dtype=full.dtype)
    return {name: pending[name].wait() for name in order}


@pytest.mark.timeout(180)
def test_activation_and_gradient_cross_at_once(workers):
    case = CASES["S0->RS1-local-all-gather"]
    forward = _plan(case)
    backward = forward.reversed()
    full = _full(case)
    results = workers.run(run_exchange, case, timeout_s=60)
    for rank, result in enumerate(results):
        for name, plan, value in (("forward", forward, full), ("backward", backward, -full)):
            if rank in plan.dst_boxes:
                want = reference_local(value, plan.dst_ranks, plan.dst_placements, rank)
                assert torch.equal(result[name], want), f"rank {rank} {name}"
            else:
                assert result[name] is None
