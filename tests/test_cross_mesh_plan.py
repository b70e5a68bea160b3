"""Cross-mesh transfer plans against brute force and hand-derived bytes and costs.

The reference for what a rank holds is DTensor's own definition, written independently of the
planner's interval arithmetic: per mesh axis in order, a ``Shard(d)`` keeps chunk ``c[a]`` of
``torch.chunk`` along ``d`` (an empty tensor where torch.chunk makes fewer chunks). A plan is
checked by executing it on one process: every piece is cut from its sender's reference shard,
written into its receiver's buffer (each element exactly once), the local all-gather is replayed
by concatenation, and every destination rank must end with its reference shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from hierarchical_ap.cluster import Cluster, Link
from hierarchical_ap.cost_model import CostModel
from runtime.cross_mesh_plan import (
    CrossMeshError,
    LinkCost,
    LocalAllGather,
    TransferPlan,
    mesh_axis_groups,
    plan_transfer,
)

R = Replicate()


def reference_local(
    full: torch.Tensor, mesh: np.ndarray, placements: Sequence, rank: int
) -> torch.Tensor:
    """The local shard of ``full`` at ``rank`` of ``mesh`` as DTensor defines it."""
    coords = tuple(int(i) for i in np.argwhere(mesh == rank)[0])
    local = full
    for axis, placement in enumerate(placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(local, mesh.shape[axis], dim=placement.dim)
            if coords[axis] < len(chunks):
                local = chunks[coords[axis]]
            else:
                local = local.narrow(placement.dim, local.shape[placement.dim], 0)
    return local


def _inside(box, within) -> tuple[slice, ...]:
    for (lo, hi), (base_lo, base_hi) in zip(box, within, strict=True):
        assert base_lo <= lo < hi <= base_hi, f"{box} is not inside {within}"
    return tuple(slice(lo - b, hi - b) for (lo, hi), (b, _) in zip(box, within, strict=True))


def execute_on_one_process(plan: TransferPlan, full: torch.Tensor) -> dict[int, torch.Tensor]:
    """Destination rank → its local tensor after running ``plan`` (see module docstring)."""
    src = {r: reference_local(full, plan.src_ranks, plan.src_placements, r) for r in plan.src_boxes}
    received = {r: torch.full(_shape(b), float("nan")) for r, b in plan.recv_boxes.items()}
    counts = {r: torch.zeros(_shape(b), dtype=torch.int64) for r, b in plan.recv_boxes.items()}
    pairs = [(p.src_rank, p.dst_rank) for p in plan.pieces]
    assert len(pairs) == len(set(pairs)), "two pieces between one pair of ranks"
    for piece in plan.pieces:
        values = src[piece.src_rank][_inside(piece.box, plan.src_boxes[piece.src_rank])]
        index = _inside(piece.box, plan.recv_boxes[piece.dst_rank])
        received[piece.dst_rank][index] = values
        counts[piece.dst_rank][index] += 1
        assert piece.nbytes == values.numel() * plan.itemsize
    for rank, count in counts.items():
        assert bool((count == 1).all()), f"rank {rank}: elements received {count.tolist()} times"
    if plan.all_gather is not None:
        for axis in reversed(plan.all_gather.axes):
            step = {}
            for line in mesh_axis_groups(plan.dst_ranks, axis):
                joined = torch.cat([received[r] for r in line], dim=plan.all_gather.dim)
                step.update(dict.fromkeys(line, joined))
            received = step
    return received


def _shape(box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def assert_plan_delivers(plan: TransferPlan) -> None:
    full = torch.arange(float(np.prod(plan.global_shape))).reshape(plan.global_shape)
    got = execute_on_one_process(plan, full)
    assert set(got) == {int(r) for r in plan.dst_ranks.flat}
    for rank, local in got.items():
        want = reference_local(full, plan.dst_ranks, plan.dst_placements, rank)
        assert torch.equal(local, want), f"rank {rank}: {local} != {want}"


# ---------------------------------------------------------------- brute force

MESH_PAIRS = [
    (np.array([0, 1]), np.array([[2, 3], [4, 5]])),
    (np.array([[0, 1], [2, 3]]), np.array([4, 5, 6])),
    (np.array([[0, 1], [2, 3]]), np.array([[5, 4], [7, 6]])),  # destination ranks not in order
    (np.array([0, 1]), np.array([[1, 2], [3, 4]])),  # rank 1 on both meshes (local copies)
]
SHAPES = [(4, 6), (5, 3), (2, 4, 6)]


def _placements(ndim: int, tensor_ndim: int) -> list[tuple]:
    options = [R, *(Shard(d) for d in range(tensor_ndim))]
    return list(itertools.product(options, repeat=ndim))


def _host_layouts(src: np.ndarray, dst: np.ndarray) -> list[dict[int, int] | None]:
    ranks = sorted({int(r) for r in (*src.flat, *dst.flat)})
    apart = {r: 0 if r in src else 1 for r in ranks}
    by_row = {r: int(np.argwhere(dst == r)[0][0]) if r in dst else 0 for r in ranks}
    return [None, apart, by_row]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("meshes", MESH_PAIRS, ids=lambda m: f"{m[0].shape}->{m[1].shape}")
def test_every_plan_delivers_each_element_once_from_a_holder(meshes, shape):
    src, dst = meshes
    variants = set()
    for src_pl, dst_pl in itertools.product(
        _placements(src.ndim, len(shape)), _placements(dst.ndim, len(shape))
    ):
        for hosts in _host_layouts(src, dst):
            plan = plan_transfer(shape, src, src_pl, dst, dst_pl, itemsize=4, hosts_of=hosts)
            assert_plan_delivers(plan)
            assert plan.estimated_time_s == min(t for _, t in plan.candidates)
            variants.add(plan.variant)
    # on 2-wide axes no (5, 3) box splits evenly, and all-gathers need equal slabs
    uneven = shape == (5, 3) and 3 not in dst.shape
    assert variants == ({"send_recv"} if uneven else {"send_recv", "local_all_gather"})


def test_forbidding_the_local_all_gather_plans_direct_sends():
    src, dst = MESH_PAIRS[0]
    for src_pl, dst_pl in itertools.product(_placements(1, 2), _placements(2, 2)):
        plan = plan_transfer((4, 6), src, src_pl, dst, dst_pl, itemsize=2, local_all_gather=False)
        assert plan.variant == "send_recv" and len(plan.candidates) == 1
        assert plan.recv_boxes == plan.dst_boxes
        assert_plan_delivers(plan)


def test_reversed_plan_carries_the_gradient_back():
    src, dst = MESH_PAIRS[0]
    forward = plan_transfer((4, 6), src, (Shard(0),), dst, (R, Shard(1)), itemsize=4)
    backward = forward.reversed()
    assert np.array_equal(backward.src_ranks, dst) and np.array_equal(backward.dst_ranks, src)
    assert backward.src_placements == (R, Shard(1)) and backward.dst_placements == (Shard(0),)
    assert_plan_delivers(backward)


# ---------------------------------------------------------------- hand-checked bytes and costs

SRC = np.array([0, 1])
DST = np.array([[2, 3], [4, 5]])
APART = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 1}


def test_s0_to_rs1_bytes_and_costs_by_hand():
    """(4, 6) fp32, S0 on 2 ranks → RS1 on 2×2. Destination (i, j) needs all 4 rows of columns
    3j..3j+2 (48 B): 2 rows × 3 columns = 24 B from each source. Direct: 8 links × 24 B; each
    source sends 4 × 24 B. Local all-gather over axis 0 (its replicas), split along rows:
    (i, j) receives rows 2i, 2i+1 from source i only (4 links × 24 B), then gathers 24 B.
    Default links: 10 B/s inside a host, 1 B/s across; all-gather of 48 B over 2 ranks on one
    host = 1/2 · 48 / 10 = 2.4 s."""
    one_host = plan_transfer((4, 6), SRC, (Shard(0),), DST, (R, Shard(1)), itemsize=4)
    direct = plan_transfer(
        (4, 6), SRC, (Shard(0),), DST, (R, Shard(1)), itemsize=4, local_all_gather=False
    )
    assert direct.link_bytes == {(s, d): 24 for s in (0, 1) for d in (2, 3, 4, 5)}
    assert direct.all_gather_bytes == dict.fromkeys((2, 3, 4, 5), 0)
    assert direct.estimated_time_s == pytest.approx(4 * 24 / 10)

    assert one_host.all_gather == LocalAllGather(axes=(0,), dim=0)
    assert one_host.link_bytes == {(0, 2): 24, (0, 3): 24, (1, 4): 24, (1, 5): 24}
    assert one_host.all_gather_bytes == dict.fromkeys((2, 3, 4, 5), 24)
    assert one_host.recv_boxes[4] == ((2, 4), (0, 3))
    assert dict(one_host.candidates) == pytest.approx(
        {"send_recv": 9.6, "local_all_gather(axes=(0,), dim=0)": 2 * 24 / 10 + 2.4}
    )

    apart = plan_transfer((4, 6), SRC, (Shard(0),), DST, (R, Shard(1)), itemsize=4, hosts_of=APART)
    assert apart.variant == "local_all_gather"
    assert dict(apart.candidates) == pytest.approx(
        {"send_recv": 4 * 24 / 1, "local_all_gather(axes=(0,), dim=0)": 2 * 24 / 1 + 2.4}
    )


def test_two_axis_all_gather_when_the_destination_is_fully_replicated():
    """(4, 6) fp32 = 96 B, S0 → RR on another host. Direct: each source sends its 48 B to 4
    ranks (192 s). Gathering over one axis: each source sends 48 B to 2 ranks (96 s), plus
    1/2 · 96 / 10 = 4.8 s. Over both: rows cut in 4, each rank gets one row (24 B), each source
    sends 2 rows (48 s); gathers of 48 B over axis 1 (2.4 s) then 96 B over axis 0 (4.8 s)."""
    plan = plan_transfer((4, 6), SRC, (Shard(0),), DST, (R, R), itemsize=4, hosts_of=APART)
    assert dict(plan.candidates) == pytest.approx(
        {
            "send_recv": 192.0,
            "local_all_gather(axes=(0,), dim=0)": 96 + 4.8,
            "local_all_gather(axes=(1,), dim=0)": 96 + 4.8,
            "local_all_gather(axes=(0, 1), dim=0)": 48 + 2.4 + 4.8,
        }
    )
    assert plan.all_gather == LocalAllGather(axes=(0, 1), dim=0)
    assert {r: plan.recv_boxes[r][0] for r in (2, 3, 4, 5)} == {
        2: (0, 1),
        3: (1, 2),
        4: (2, 3),
        5: (3, 4),
    }
    assert_plan_delivers(plan)


def test_direct_sends_win_when_the_gather_would_cross_hosts():
    """(4,) fp32 = 16 B, R on ranks of hosts 0, 1 → R on ranks of hosts 0, 1: each receiver
    copies from its host's replica (1.6 s); gathering would move 8 B inside each host (0.8 s)
    and then all-gather 16 B across hosts (1/2 · 16 / 1 = 8 s)."""
    hosts = {0: 0, 1: 1, 2: 0, 3: 1}
    plan = plan_transfer((4,), SRC, (R,), np.array([2, 3]), (R,), itemsize=4, hosts_of=hosts)
    assert plan.variant == "send_recv"
    assert plan.link_bytes == {(0, 2): 16, (1, 3): 16}
    assert dict(plan.candidates) == pytest.approx(
        {"send_recv": 1.6, "local_all_gather(axes=(0,), dim=0)": 0.8 + 8.0}
    )


def test_link_cost_from_cluster_links():
    """One 40 B message across hosts: latency 1 s + 40 B / 10 B/s = 5 s."""
    cost = LinkCost(
        intra_host=Link(bandwidth=100.0, latency=0.5),
        inter_host=Link(bandwidth=10.0, latency=1.0),
        cost_model=CostModel(link_efficiency=1.0),
    )
    plan = plan_transfer(
        (10,),
        np.array([0]),
        (R,),
        np.array([1]),
        (R,),
        itemsize=4,
        hosts_of=[0, 1],
        link_cost=cost,
    )
    assert plan.estimated_time_s == pytest.approx(5.0)
    cluster = Cluster.from_spec("2x2xA100-80GB")
    from_cluster = LinkCost.from_cluster(cluster)
    assert from_cluster.inter_host == cluster.inter_host_link
    link = cluster.inter_host_link
    expected = link.latency + 40 / (link.bandwidth * CostModel.for_cluster(cluster).link_efficiency)
    assert from_cluster.send_time(40, same_host=False) == pytest.approx(expected)


def test_replicas_share_the_sending_and_same_host_senders_come_first():
    shape = (8, 3)  # 4 rows of 3 fp32 = 48 B... per destination: 2 rows = 24 B
    spread = plan_transfer(shape, SRC, (R,), np.array([2, 3, 4, 5]), (Shard(0),), itemsize=4)
    sent = {s: sum(b for (src, _), b in spread.link_bytes.items() if src == s) for s in (0, 1)}
    assert sent == {0: 48, 1: 48}

    hosts = {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    local = plan_transfer(
        shape, SRC, (R,), np.array([2, 3, 4, 5]), (Shard(0),), itemsize=4, hosts_of=hosts
    )
    assert {src for src, _ in local.link_bytes} == {1}

    overlap = plan_transfer(shape, SRC, (R,), np.array([1, 2]), (Shard(0),), itemsize=4)
    copies = [p for p in overlap.pieces if p.src_rank == p.dst_rank]
    assert [(p.dst_rank, p.nbytes) for p in copies] == [(1, 48)]
    assert overlap.link_bytes == {(0, 2): 48}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"src_placements": (Partial(),)}, "reduce it on the source mesh first"),
        ({"dst_placements": (Partial(), R)}, "delivers values"),
        ({"src_placements": (R, R)}, "name 2 mesh axes but the source mesh has 1"),
        ({"dst_placements": (R, Shard(2))}, "Shard.2. on mesh axis 1 names a dim"),
        ({"dst_ranks": np.array([[2, 3], [3, 4]])}, "distinct non-negative ranks"),
        ({"hosts_of": {0: 0, 1: 0}}, "no host for rank 2"),
        ({"itemsize": 0}, "itemsize must be a positive int"),
    ],
)
def test_bad_input_names_the_cause_and_the_fix(kwargs, message):
    args = {
        "src_ranks": SRC,
        "src_placements": (Shard(0),),
        "dst_ranks": DST,
        "dst_placements": (R, Shard(1)),
        "itemsize": 4,
    } | kwargs
    with pytest.raises(CrossMeshError, match=message):
        plan_transfer((4, 6), **args)
