"""Planning cross-mesh resharding: which rank sends which box of a tensor to which rank.

Between two pipeline stages a tensor (an activation going forward, its gradient going back)
leaves the source stage's mesh with one placement and must arrive on the destination stage's
mesh with another. This module computes the transfer as plain data; `runtime.cross_mesh`
executes it with torch.distributed. Nothing here communicates.

API (names are stable; the runtime calls them):

``plan_transfer(global_shape, src_ranks, src_placements, dst_ranks, dst_placements, *,
itemsize, hosts_of=None, link_cost=None, local_all_gather=True) -> TransferPlan``

* ``src_ranks`` / ``dst_ranks``: numpy arrays of global ranks (any number of mesh axes, 2D in
  the runtime); axis ``a`` of the array is mesh axis ``a``.
* ``src_placements`` / ``dst_placements``: one DTensor placement per mesh axis, ``Shard(d)``
  or ``Replicate()``. A ``Partial()`` source must be reduced on the source mesh first
  (redistribute it to ``Replicate()`` or ``Shard(d)``: an all-reduce or reduce-scatter there);
  a transfer carries values, not summands, so a ``Partial`` on either side raises
  ``CrossMeshError``.
* ``itemsize``: bytes per element (``dtype.itemsize``).
* ``hosts_of``: rank → host id (a mapping, or a sequence indexed by rank); ``None`` puts every
  rank on one host. Senders on the receiver's host are preferred, and the cost model uses it.
* ``link_cost``: a ``LinkCost`` (``LinkCost.from_cluster(cluster)`` uses the cluster's links
  and ``hierarchical_ap.cost_model``); ``None`` is ``DEFAULT_LINK_COST``, relative units with
  the intra-host link 10x the inter-host one (Alpa's default mesh β = (1, 0.1)).
* ``local_all_gather=False`` forbids Alpa's local all-gather variant (it is on by default, as
  Alpa's ``use_local_allgather``).

``TransferPlan`` fields: ``pieces`` (``Piece(src_rank, dst_rank, box, nbytes)``; a piece with
``src_rank == dst_rank`` is a local copy), ``src_boxes`` / ``dst_boxes`` (rank → the box of the
global tensor it holds before / after), ``recv_boxes`` (rank → the box it gets by
point-to-point; equal to ``dst_boxes`` unless all-gathering), ``all_gather``
(``LocalAllGather(axes, dim)`` or ``None``), ``variant`` (``"send_recv"`` or
``"local_all_gather"``), ``link_bytes`` ((src, dst) → bytes on that link),
``all_gather_bytes`` (rank → bytes it receives in the all-gather), ``estimated_time_s``,
``candidates`` (every variant considered with its estimated time) and ``reversed()`` (the plan
of the opposite direction, e.g. the gradient of an activation). ``mesh_axis_groups(ranks,
axis)`` lists the rank groups along one mesh axis.

Boxes
-----
A box is a tuple of half-open intervals ``(start, stop)``, one per tensor dim. The box a rank at
mesh coordinate ``c`` holds follows DTensor's ``Shard`` exactly: start from the whole tensor and,
for mesh axes ``a = 0, 1, …`` in order, where ``placements[a] = Shard(d)`` replace the interval
of dim ``d`` by piece ``c[a]`` of ``torch.chunk`` into ``mesh.shape[a]`` pieces. Chunk ``i`` of
an interval of length ``n`` into ``k`` is ``[i·q, min((i+1)·q, n))`` with ``q = ceil(n / k)``
(clipped to ``n``, so trailing chunks may be short or empty: uneven sharding works).

Direct send/recv
----------------
The distinct source boxes partition the tensor (replicas share a box). Each destination rank
``r`` needs ``dst_box(r)``; its pieces are the non-empty intersections ``dst_box(r) ∩ B`` over
the distinct source boxes ``B``, so every element is received exactly once. A piece held by
several source replicas gets one sender, chosen greedily with the largest pieces first: the
receiver itself if it holds the piece (a local copy), else among the holders on the receiver's
host if any, the one with the fewest bytes assigned so far (then the lowest rank).
A rank holds one box, so a pair of ranks shares at most one piece.

Local all-gather (Alpa)
-----------------------
If the destination is ``Replicate()`` over mesh axes ``S`` (a subset of them, of sizes ``k_a``,
``K = Π k_a``), the ``K`` ranks of a replica group need the same box. Instead each member gets
only part ``p`` of it, ``p`` the row-major index of its coordinates on ``S``: the box cut into
``K`` equal slabs along the first tensor dim whose extent every destination box divides by
``K``. Then the destination mesh all-gathers over the axes of ``S``, last axis first (members
along it hold consecutive slabs, so each gather yields a contiguous slab of the next).

Cost
----
Point-to-point messages run in parallel, each device's sends one after another and likewise its
receives: with ``t(s, d) = link_cost.send_time(bytes(s, d), same_host(s, d))``,

    T_p2p = max over ranks x of max(Σ_d t(x, d), Σ_s t(s, x)).

Each all-gather step over axis ``a`` costs the slowest of its groups,
``link_cost.all_gather_time(output bytes, hosts of the group)``, steps add up, and
``T = T_p2p + Σ T_gather``. The plan takes the cheapest candidate: direct first, then each
applicable subset ``S``, a later one only if strictly cheaper.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from hierarchical_ap.cluster import Cluster, Link, MeshAxis
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import HapError

__all__ = [
    "DEFAULT_LINK_COST",
    "Box",
    "CrossMeshError",
    "LinkCost",
    "LocalAllGather",
    "Piece",
    "TransferPlan",
    "box_intersection",
    "box_numel",
    "box_shape",
    "chunk_interval",
    "mesh_axis_groups",
    "plan_transfer",
    "shard_box",
]

logger = logging.getLogger(__name__)

Interval = tuple[int, int]
Box = tuple[Interval, ...]
Placements = tuple[Placement, ...]

SEND_RECV = "send_recv"
LOCAL_ALL_GATHER = "local_all_gather"


class CrossMeshError(HapError, ValueError):
    """A cross-mesh transfer that cannot be planned or run as asked."""


# ----------------------------------------------------------------------------- boxes


def chunk_interval(start: int, stop: int, num_chunks: int, index: int) -> Interval:
    """Piece ``index`` of ``torch.chunk([start, stop), num_chunks)`` as DTensor's ``Shard``
    pads it: pieces of ``ceil(n / num_chunks)`` elements, trailing ones short or empty."""
    size = -(-(stop - start) // num_chunks)
    lo = min(start + index * size, stop)
    return lo, min(lo + size, stop)


def shard_box(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Placements,
    coords: Sequence[int],
) -> Box:
    """The box of the global tensor held at mesh coordinate ``coords`` (module docstring)."""
    box = [(0, n) for n in global_shape]
    for axis, placement in enumerate(placements):
        if isinstance(placement, Shard):
            start, stop = box[placement.dim]
            box[placement.dim] = chunk_interval(start, stop, mesh_shape[axis], coords[axis])
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def box_numel(box: Box) -> int:
    return math.prod(box_shape(box))


def box_intersection(a: Box, b: Box) -> Box | None:
    """The common box of ``a`` and ``b``, or None when it holds no element."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def mesh_axis_groups(ranks: np.ndarray, axis: int) -> list[tuple[int, ...]]:
    """The groups of ranks along mesh axis ``axis`` (ranks that differ only in that coordinate),
    each ordered by its coordinate on the axis, groups in row-major order of the others."""
    ranks = np.asarray(ranks)
    lines = np.moveaxis(ranks, axis, -1).reshape(-1, ranks.shape[axis])
    return [tuple(int(r) for r in line) for line in lines]


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class LinkCost:
    """Times of a point-to-point message and of an all-gather, from two links and the
    project's alpha-beta ``CostModel``: ``send_time = α + bytes·β`` on the intra- or inter-host
    link, ``all_gather_time`` the (hierarchical) ring all-gather of the cost model."""

    intra_host: Link
    inter_host: Link
    cost_model: CostModel = field(default_factory=CostModel)

    @classmethod
    def from_cluster(cls, cluster: Cluster) -> LinkCost:
        """The cluster's own links and cost-model efficiencies."""
        return cls(cluster.intra_host_link, cluster.inter_host_link, CostModel.for_cluster(cluster))

    def send_time(self, nbytes: float, same_host: bool) -> float:
        link = self.intra_host if same_host else self.inter_host
        return self.cost_model.send_recv_time(nbytes, link)

    def all_gather_time(self, nbytes: float, member_hosts: Sequence[Hashable]) -> float:
        """All-gather with an ``nbytes`` output among devices on the given hosts."""
        per_host = Counter(member_hosts)
        axis = MeshAxis(
            size=len(member_hosts),
            hosts=len(per_host),
            devices_per_host=max(per_host.values()),
            intra_link=self.intra_host,
            inter_link=self.inter_host,
        )
        return self.cost_model.all_gather_time(nbytes, axis)


DEFAULT_LINK_COST = LinkCost(
    intra_host=Link(bandwidth=10.0, latency=0.0),
    inter_host=Link(bandwidth=1.0, latency=0.0),
    cost_model=CostModel(matmul_efficiency=1.0, memory_efficiency=1.0, link_efficiency=1.0),
)
"""Relative units: the intra-host link is 10x the inter-host one, latencies ignored."""


# ----------------------------------------------------------------------------- plan types


@dataclass(frozen=True)
class Piece:
    """Box ``box`` of the global tensor, sent by ``src_rank`` to ``dst_rank`` (a local copy
    when they are equal); ``nbytes`` its size."""

    src_rank: int
    dst_rank: int
    box: Box
    nbytes: int


@dataclass(frozen=True)
class LocalAllGather:
    """Each destination replica group receives slabs of its box cut along tensor dim ``dim``
    (part index row-major over the coordinates on ``axes``), then all-gathers over ``axes``,
    last axis first."""

    axes: tuple[int, ...]
    dim: int


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """How one tensor moves from the source mesh to the destination mesh (module docstring)."""

    global_shape: tuple[int, ...]
    itemsize: int
    src_ranks: np.ndarray
    src_placements: Placements
    dst_ranks: np.ndarray
    dst_placements: Placements
    src_boxes: Mapping[int, Box]
    dst_boxes: Mapping[int, Box]
    recv_boxes: Mapping[int, Box]
    pieces: tuple[Piece, ...]
    all_gather: LocalAllGather | None
    estimated_time_s: float
    candidates: tuple[tuple[str, float], ...]
    hosts: Mapping[int, Hashable]
    link_cost: LinkCost
    allow_local_all_gather: bool

    @property
    def variant(self) -> str:
        """``"send_recv"`` or ``"local_all_gather"``."""
        return SEND_RECV if self.all_gather is None else LOCAL_ALL_GATHER

    @property
    def link_bytes(self) -> dict[tuple[int, int], int]:
        """(source rank, destination rank) → bytes sent over that link (local copies left out)."""
        out: Counter[tuple[int, int]] = Counter()
        for piece in self.pieces:
            if piece.src_rank != piece.dst_rank:
                out[piece.src_rank, piece.dst_rank] += piece.nbytes
        return dict(out)

    @property
    def all_gather_bytes(self) -> dict[int, int]:
        """Destination rank → bytes it receives in the all-gather (0 without one)."""
        return {
            rank: (box_numel(box) - box_numel(self.recv_boxes[rank])) * self.itemsize
            for rank, box in self.dst_boxes.items()
        }

    def pieces_from(self, rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.src_rank == rank]

    def pieces_to(self, rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.dst_rank == rank]

    def reversed(self) -> TransferPlan:
        """The plan of the opposite direction (destination back to source, same options), e.g.
        for the gradient of a transferred activation when it has the same placements."""
        return plan_transfer(
            self.global_shape,
            self.dst_ranks,
            self.dst_placements,
            self.src_ranks,
            self.src_placements,
            itemsize=self.itemsize,
            hosts_of=self.hosts,
            link_cost=self.link_cost,
            local_all_gather=self.allow_local_all_gather,
        )


# ----------------------------------------------------------------------------- validation


def _check_mesh(ranks: np.ndarray, role: str) -> np.ndarray:
    mesh = np.asarray(ranks)
    if mesh.ndim == 0 or mesh.size == 0 or not np.issubdtype(mesh.dtype, np.integer):
        raise CrossMeshError(
            f"the {role} mesh must be a non-empty integer array of global ranks "
            f"(e.g. np.array([[0, 1], [2, 3]])), got {ranks!r}"
        )
    if (mesh < 0).any() or len(np.unique(mesh)) != mesh.size:
        raise CrossMeshError(
            f"the {role} mesh {mesh.tolist()} must hold distinct non-negative ranks"
        )
    return mesh.astype(np.int64)


def _check_placements(
    placements: Sequence[Placement], mesh: np.ndarray, ndim: int, role: str
) -> Placements:
    placements = tuple(placements)
    if len(placements) != mesh.ndim:
        raise CrossMeshError(
            f"the {role} placements {placements} name {len(placements)} mesh axes but the "
            f"{role} mesh has {mesh.ndim}; give one Shard(d) or Replicate() per mesh axis"
        )
    out: list[Placement] = []
    for axis, p in enumerate(placements):
        if isinstance(p, Partial):
            fix = (
                "reduce it on the source mesh first (redistribute the DTensor to Replicate() "
                "or Shard(d) on that axis) and transfer the result"
                if role == "source"
                else "a transfer delivers values, so ask for Replicate() or Shard(d)"
            )
            raise CrossMeshError(f"the {role} placement on mesh axis {axis} is Partial: {fix}")
        if type(p) is Shard:
            dim = p.dim + ndim if p.dim < 0 else p.dim
            if not 0 <= dim < ndim:
                raise CrossMeshError(
                    f"the {role} placement Shard({p.dim}) on mesh axis {axis} names a dim the "
                    f"{ndim}-dim tensor lacks; use a dim in 0..{ndim - 1}"
                )
            out.append(Shard(dim))
        elif isinstance(p, Replicate):
            out.append(p)
        else:
            raise CrossMeshError(
                f"the {role} placement {p!r} on mesh axis {axis} is not supported; "
                "use Shard(d) or Replicate()"
            )
    return tuple(out)


def _host_map(
    hosts_of: Mapping[int, Hashable] | Sequence[Hashable] | None, ranks: set[int]
) -> dict[int, Hashable]:
    if hosts_of is None:
        return dict.fromkeys(ranks, 0)
    out = {}
    for rank in sorted(ranks):
        try:
            out[rank] = hosts_of[rank]
        except (KeyError, IndexError):
            raise CrossMeshError(
                f"hosts_of has no host for rank {rank}; give a host id for every rank of "
                "both meshes (or hosts_of=None for one host)"
            ) from None
    return out


def _boxes(shape: tuple[int, ...], mesh: np.ndarray, placements: Placements) -> dict[int, Box]:
    return {
        int(mesh[coords]): shard_box(shape, mesh.shape, placements, coords)
        for coords in np.ndindex(*mesh.shape)
    }


# ----------------------------------------------------------------------------- planning


def _source_tiles(src_boxes: Mapping[int, Box]) -> list[tuple[Box, tuple[int, ...]]]:
    """Distinct non-empty source boxes with the ranks holding each."""
    holders: dict[Box, list[int]] = defaultdict(list)
    for rank, box in sorted(src_boxes.items()):
        if box_numel(box):
            holders[box].append(rank)
    return sorted((box, tuple(ranks)) for box, ranks in holders.items())


def _assign_senders(
    recv_boxes: Mapping[int, Box],
    tiles: list[tuple[Box, tuple[int, ...]]],
    hosts: Mapping[int, Hashable],
    itemsize: int,
) -> tuple[Piece, ...]:
    """Greedy load balance (module docstring): largest pieces first, the receiver itself if
    it holds the piece, else the least-loaded holder, same-host holders first."""
    requests = []
    for dst, need in sorted(recv_boxes.items()):
        for tile, holders in tiles:
            box = box_intersection(need, tile)
            if box is not None:
                requests.append((box_numel(box), dst, box, holders))
    requests.sort(key=lambda r: (-r[0], r[1], r[2]))
    load: Counter[int] = Counter()
    pieces = []
    for numel, dst, box, holders in requests:
        if dst in holders:
            sender = dst
        else:
            pool = [h for h in holders if hosts[h] == hosts[dst]] or list(holders)
            sender = min(pool, key=lambda h: (load[h], h))
            load[sender] += numel
        pieces.append(Piece(sender, dst, box, numel * itemsize))
    return tuple(sorted(pieces, key=lambda p: (p.src_rank, p.dst_rank, p.box)))


def _split_dim(dst_boxes: Mapping[int, Box], parts: int) -> int | None:
    """The first tensor dim along which every destination box splits into ``parts`` slabs."""
    for dim in range(len(next(iter(dst_boxes.values())))):
        extents = [hi - lo for lo, hi in (box[dim] for box in dst_boxes.values())]
        if max(extents) > 0 and all(e % parts == 0 for e in extents):
            return dim
    return None


def _slab_boxes(
    dst_boxes: Mapping[int, Box], mesh: np.ndarray, gather: LocalAllGather
) -> dict[int, Box]:
    """Each destination rank's slab: part p (row-major over its coordinates on the gather
    axes) of its box cut into K equal slabs along ``gather.dim``."""
    sizes = [mesh.shape[a] for a in gather.axes]
    parts = math.prod(sizes)
    out = {}
    for coords in np.ndindex(*mesh.shape):
        rank = int(mesh[coords])
        part = int(np.ravel_multi_index([coords[a] for a in gather.axes], sizes))
        box = list(dst_boxes[rank])
        lo, hi = box[gather.dim]
        step = (hi - lo) // parts
        box[gather.dim] = (lo + part * step, lo + (part + 1) * step)
        out[rank] = tuple(box)
    return out


def _p2p_time(pieces: Sequence[Piece], hosts: Mapping[int, Hashable], link_cost: LinkCost) -> float:
    link_bytes: Counter[tuple[int, int]] = Counter()
    for p in pieces:
        if p.src_rank != p.dst_rank:
            link_bytes[p.src_rank, p.dst_rank] += p.nbytes
    sending: Counter[int] = Counter()
    receiving: Counter[int] = Counter()
    for (src, dst), nbytes in link_bytes.items():
        t = link_cost.send_time(nbytes, hosts[src] == hosts[dst])
        sending[src] += t
        receiving[dst] += t
    return max([*sending.values(), *receiving.values()], default=0.0)


def _gather_time(
    dst_boxes: Mapping[int, Box],
    mesh: np.ndarray,
    gather: LocalAllGather,
    hosts: Mapping[int, Hashable],
    link_cost: LinkCost,
    itemsize: int,
) -> float:
    """Σ over the gather steps (last axis first) of the slowest group's all-gather."""
    parts = math.prod(mesh.shape[a] for a in gather.axes)
    gathered = 1
    total = 0.0
    for axis in reversed(gather.axes):
        gathered *= mesh.shape[axis]
        step = 0.0
        for group in mesh_axis_groups(mesh, axis):
            nbytes = box_numel(dst_boxes[group[0]]) * itemsize * gathered / parts
            if nbytes:
                step = max(step, link_cost.all_gather_time(nbytes, [hosts[r] for r in group]))
        total += step
    return total


def _gather_candidates(
    dst_boxes: Mapping[int, Box], mesh: np.ndarray, placements: Placements
) -> list[LocalAllGather]:
    replicated = [
        a for a, p in enumerate(placements) if isinstance(p, Replicate) and mesh.shape[a] > 1
    ]
    out = []
    for count in range(1, len(replicated) + 1):
        for axes in itertools.combinations(replicated, count):
            dim = _split_dim(dst_boxes, math.prod(mesh.shape[a] for a in axes))
            if dim is not None:
                out.append(LocalAllGather(axes, dim))
    return out


def _describe(gather: LocalAllGather | None) -> str:
    if gather is None:
        return SEND_RECV
    return f"{LOCAL_ALL_GATHER}(axes={gather.axes}, dim={gather.dim})"


def plan_transfer(
    global_shape: Sequence[int],
    src_ranks: np.ndarray,
    src_placements: Sequence[Placement],
    dst_ranks: np.ndarray,
    dst_placements: Sequence[Placement],
    *,
    itemsize: int,
    hosts_of: Mapping[int, Hashable] | Sequence[Hashable] | None = None,
    link_cost: LinkCost | None = None,
    local_all_gather: bool = True,
) -> TransferPlan:
    """The cheapest transfer of a ``global_shape`` tensor from the source mesh and placements
    to the destination ones (module docstring: boxes, sender choice, variants, cost)."""
    shape = tuple(int(n) for n in global_shape)
    if any(n < 0 for n in shape):
        raise CrossMeshError(f"global_shape {shape} has a negative size")
    if not isinstance(itemsize, int) or itemsize < 1:
        raise CrossMeshError(f"itemsize must be a positive int (dtype.itemsize), got {itemsize!r}")
    src_mesh = _check_mesh(src_ranks, "source")
    dst_mesh = _check_mesh(dst_ranks, "destination")
    src_pl = _check_placements(src_placements, src_mesh, len(shape), "source")
    dst_pl = _check_placements(dst_placements, dst_mesh, len(shape), "destination")
    hosts = _host_map(hosts_of, {int(r) for r in (*src_mesh.flat, *dst_mesh.flat)})
    cost = DEFAULT_LINK_COST if link_cost is None else link_cost

    src_boxes = _boxes(shape, src_mesh, src_pl)
    dst_boxes = _boxes(shape, dst_mesh, dst_pl)
    tiles = _source_tiles(src_boxes)
    gathers: list[LocalAllGather | None] = [None]
    if local_all_gather:
        gathers += _gather_candidates(dst_boxes, dst_mesh, dst_pl)

    best = None
    candidates = []
    for gather in gathers:
        recv = dst_boxes if gather is None else _slab_boxes(dst_boxes, dst_mesh, gather)
        pieces = _assign_senders(recv, tiles, hosts, itemsize)
        time = _p2p_time(pieces, hosts, cost)
        if gather is not None:
            time += _gather_time(dst_boxes, dst_mesh, gather, hosts, cost, itemsize)
        candidates.append((_describe(gather), time))
        if best is None or time < best[0]:
            best = (time, gather, recv, pieces)
    assert best is not None
    time, gather, recv, pieces = best
    logger.debug("cross-mesh transfer of %s: %s, %.3g s", shape, _describe(gather), time)
    return TransferPlan(
        global_shape=shape,
        itemsize=itemsize,
        src_ranks=src_mesh,
        src_placements=src_pl,
        dst_ranks=dst_mesh,
        dst_placements=dst_pl,
        src_boxes=src_boxes,
        dst_boxes=dst_boxes,
        recv_boxes=recv,
        pieces=pieces,
        all_gather=gather,
        estimated_time_s=time,
        candidates=tuple(candidates),
        hosts=hosts,
        link_cost=cost,
        allow_local_all_gather=local_all_gather,
    )
