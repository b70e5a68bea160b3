"""Cross-mesh resharding between pipeline stages: running a ``TransferPlan`` on every rank.

The plan (``runtime.cross_mesh_plan``, re-exported here) says which rank sends which box of the
global tensor to which rank. Every rank of the global process group that takes part calls

``run_transfer(plan, local_src, my_rank, group=None, dst_axis_groups=None, *, dtype=None,
device=None) -> torch.Tensor | None``

* ``local_src``: this rank's local shard on the source mesh (``None`` off the source mesh);
  it must be a plain tensor of the source box's shape (``DTensor.to_local()``), with a
  ``Partial`` already reduced (see ``plan_transfer``). Autograd does not cross the transfer:
  the result is a new tensor that does not require grad.
* ``group``: the global process group holding every rank of both meshes (``None``: the default
  group); ranks in the plan are global ranks of it.
* ``dst_axis_groups``: on destination ranks, mesh axis → the process group of this rank's
  ranks along that axis (``DeviceMesh.get_group(axis)`` or ``new_mesh_axis_groups``); needed
  only for the axes the plan all-gathers over (``plan.all_gather.axes``).
* ``dtype`` / ``device``: of the received tensor on ranks without a source shard (with one,
  they are taken from it). ``device=None`` there means the current CUDA device on an NCCL
  group, else the CPU.

It returns this rank's local tensor of the destination placement (the box
``plan.dst_boxes[my_rank]``), or ``None`` on ranks outside the destination mesh.

Order of operations, the same on every rank, so nothing deadlocks:

1. point-to-point: each piece is one message (a pair of ranks shares at most one piece, since
   a rank holds one box), all posted at once with ``dist.batch_isend_irecv`` (a rank's only
   message directly with ``dist.isend`` / ``dist.irecv``, the common case between one-device
   stages) and then waited for; a piece a rank sends to itself is a local copy. What each rank
   sends, receives and copies is worked out once per plan and rank, not per transfer;
2. local all-gather (when ``plan.all_gather``): over each of its axes, last axis first, a
   ``dist.all_gather`` in that axis' group, the slabs concatenated along ``plan.all_gather.dim``
   in mesh-coordinate order.

The same call serves activations (forward, stage i → i+1) and their gradients (backward,
stage i+1 → i, with the plan of that direction, e.g. ``plan.reversed()``). On NCCL, the first
operation on ``group`` must involve all its ranks (torch's rule for ``batch_isend_irecv``): run
a barrier or any collective on the global group before the first transfer.

``start_transfer`` (same arguments) posts the messages and returns a ``PendingTransfer`` whose
``wait()`` finishes the transfer and returns the same result; ``run_transfer`` is
``start_transfer(...).wait()``. ``run_transfer`` blocks until this rank's part is done, so two
neighbours that must send to each other at once (an activation forward and a gradient back in
1F1B) would wait on each other: they start both transfers, then wait for both. Transfers that
send from one rank to another must be started in the same order on both.

``new_mesh_axis_groups(mesh_ranks, my_rank)`` creates the per-axis groups of a destination mesh;
like ``dist.new_group`` it must be called by every rank of the default group, in the same order.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from runtime.cross_mesh_plan import (
    DEFAULT_LINK_COST,
    Box,
    CrossMeshError,
    LinkCost,
    LocalAllGather,
    Piece,
    TransferPlan,
    box_shape,
    mesh_axis_groups,
    plan_transfer,
)

__all__ = [
    "DEFAULT_LINK_COST",
    "CrossMeshError",
    "LinkCost",
    "LocalAllGather",
    "Piece",
    "TransferPlan",
    "PendingTransfer",
    "new_mesh_axis_groups",
    "plan_transfer",
    "run_transfer",
    "start_transfer",
]

logger = logging.getLogger(__name__)


def new_mesh_axis_groups(
    mesh_ranks: np.ndarray, my_rank: int, *, backend: str | None = None
) -> dict[int, dist.ProcessGroup]:
    """Mesh axis → the group of ``my_rank``'s ranks along it (absent when ``my_rank`` is off
    the mesh). Collective: every rank of the default group calls it with the same mesh."""
    mesh = np.asarray(mesh_ranks)
    groups: dict[int, dist.ProcessGroup] = {}
    for axis in range(mesh.ndim):
        for ranks in mesh_axis_groups(mesh, axis):
            group = dist.new_group(list(ranks), backend=backend)
            if my_rank in ranks:
                groups[axis] = group
    return groups


def _relative(box: Box, within: Box) -> tuple[slice, ...]:
    """Index of ``box`` inside a local tensor that holds ``within``."""
    return tuple(
        slice(lo - base, hi - base) for (lo, hi), (base, _) in zip(box, within, strict=True)
    )


def _receive_device(local_src: torch.Tensor | None, device, group) -> torch.device:
    if local_src is not None:
        return local_src.device
    if device is not None:
        return torch.device(device)
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _receive_dtype(plan: TransferPlan, local_src: torch.Tensor | None, dtype) -> torch.dtype:
    if local_src is not None:
        dtype = local_src.dtype
    elif dtype is None:
        raise CrossMeshError(
            "a rank without a source shard needs the dtype of the tensor it receives: "
            "pass run_transfer(..., dtype=...)"
        )
    if dtype.itemsize != plan.itemsize:
        raise CrossMeshError(
            f"the tensor's dtype {dtype} has {dtype.itemsize} bytes per element but the plan "
            f"was made with itemsize={plan.itemsize}; plan with itemsize=dtype.itemsize"
        )
    return dtype


@dataclass(frozen=True)
class _RankSteps:
    """One rank's part of a plan, worked out once per (plan, rank) by ``_rank_steps``, so a
    transfer that runs every micro-batch does not search the plan's pieces again. An index of
    ``None`` is the whole tensor (sent or received as it is, no slicing)."""

    sends: tuple[tuple[int, tuple[slice, ...] | None], ...]
    """(destination rank, index of the piece in the local source) per message sent."""
    receives: tuple[tuple[int, tuple[slice, ...] | None, tuple[int, ...]], ...]
    """(source rank, index of the piece in the received box, the piece's shape) per message
    received; a piece that is all of the box is received into the result itself."""
    copies: tuple[tuple[tuple[slice, ...], tuple[slice, ...]], ...]
    """(index in the local source, index in the received box) per piece kept on this rank."""
    recv_shape: tuple[int, ...] | None
    """The shape of the box this rank receives (``None`` off the destination mesh)."""


_STEPS: weakref.WeakKeyDictionary[TransferPlan, dict[int, _RankSteps]] = weakref.WeakKeyDictionary()


def _rank_steps(plan: TransferPlan, rank: int) -> _RankSteps:
    """``rank``'s part of ``plan`` (cached for as long as the plan lives)."""
    by_rank = _STEPS.setdefault(plan, {})
    steps = by_rank.get(rank)
    if steps is None:
        steps = by_rank[rank] = _work_out_steps(plan, rank)
    return steps


def _work_out_steps(plan: TransferPlan, rank: int) -> _RankSteps:
    src_box = plan.src_boxes.get(rank)
    recv_box = plan.recv_boxes.get(rank) if rank in plan.dst_boxes else None

    def within(box: Box, holder: Box) -> tuple[slice, ...] | None:
        return None if tuple(box) == tuple(holder) else _relative(box, holder)

    sends = tuple(
        (p.dst_rank, within(p.box, src_box)) for p in plan.pieces_from(rank) if p.dst_rank != rank
    )
    to_me = plan.pieces_to(rank)
    receives = tuple(
        (p.src_rank, within(p.box, recv_box), box_shape(p.box)) for p in to_me if p.src_rank != rank
    )
    copies = tuple(
        (_relative(p.box, src_box), _relative(p.box, recv_box)) for p in to_me if p.src_rank == rank
    )
    return _RankSteps(sends, receives, copies, None if recv_box is None else box_shape(recv_box))


def _post(
    sends: list[tuple[int, torch.Tensor]],
    receives: list[tuple[int, torch.Tensor]],
    group: dist.ProcessGroup | None,
) -> list[dist.Work]:
    """Post the messages (peers are global ranks). A single message goes out as it is
    (``dist.isend`` / ``dist.irecv``, what ``batch_isend_irecv`` would call for it); several go
    together through ``batch_isend_irecv``, which NCCL needs to run them as one group."""
    if len(sends) + len(receives) == 1:
        if sends:
            return [dist.isend(sends[0][1], sends[0][0], group)]
        return [dist.irecv(receives[0][1], receives[0][0], group)]
    ops = [dist.P2POp(dist.isend, tensor, peer, group) for peer, tensor in sends]
    ops += [dist.P2POp(dist.irecv, tensor, peer, group) for peer, tensor in receives]
    return dist.batch_isend_irecv(ops) if ops else []


def _check_source(plan: TransferPlan, local_src: torch.Tensor | None, my_rank: int) -> None:
    box = plan.src_boxes.get(my_rank)
    if box is None:
        return
    if local_src is None:
        raise CrossMeshError(
            f"rank {my_rank} is on the source mesh but got no local tensor; pass its shard "
            "(DTensor.to_local())"
        )
    if local_src.dtype.itemsize != plan.itemsize:
        raise CrossMeshError(
            f"rank {my_rank}'s local source is {local_src.dtype} ({local_src.dtype.itemsize} "
            f"bytes per element) but the plan was made with itemsize={plan.itemsize}"
        )
    if tuple(local_src.shape) != box_shape(box):
        raise CrossMeshError(
            f"rank {my_rank}'s local source has shape {tuple(local_src.shape)} but its "
            f"placement {plan.src_placements} gives {box_shape(box)}; pass the local shard of "
            "the planned placement"
        )


@dataclass(eq=False)
class PendingTransfer:
    """A transfer whose point-to-point messages are posted on this rank; ``wait()`` finishes
    it (waits for them, places the pieces, runs the local all-gather) and returns what
    ``run_transfer`` returns. Call it once, on every rank that started the transfer."""

    plan: TransferPlan
    my_rank: int
    local_src: torch.Tensor | None
    out: torch.Tensor | None
    inbox: list[tuple[tuple[slice, ...] | None, torch.Tensor]]
    """(index in ``out``, buffer) per received piece; ``None``: the buffer is ``out``."""
    copies: tuple[tuple[tuple[slice, ...], tuple[slice, ...]], ...]
    works: list[dist.Work]
    dst_axis_groups: Mapping[int, dist.ProcessGroup] | None

    def wait(self) -> torch.Tensor | None:
        for work in self.works:
            work.wait()
        self.works = []
        out = self.out
        if out is None:
            return None
        # every tensor here is detached (the source) or fresh: placing records no autograd
        for src_index, out_index in self.copies:
            out[out_index] = self.local_src[src_index]
        for out_index, buffer in self.inbox:
            if out_index is not None:
                out[out_index] = buffer
        if self.plan.all_gather is not None:
            out = _all_gather(self.plan, out, self.my_rank, self.dst_axis_groups)
        return out


def _all_gather(
    plan: TransferPlan,
    slab: torch.Tensor,
    my_rank: int,
    dst_axis_groups: Mapping[int, dist.ProcessGroup] | None,
) -> torch.Tensor:
    """Step 2: all-gather the slab over the plan's axes, last axis first."""
    gather = plan.all_gather
    for axis in reversed(gather.axes):
        group = None if dst_axis_groups is None else dst_axis_groups.get(axis)
        if group is None:
            raise CrossMeshError(
                f"the plan all-gathers over destination mesh axis {axis} but rank {my_rank} "
                "got no group for it; pass dst_axis_groups={axis: group} "
                "(DeviceMesh.get_group(axis) or new_mesh_axis_groups)"
            )
        line = next(g for g in mesh_axis_groups(plan.dst_ranks, axis) if my_rank in g)
        members = dist.get_process_group_ranks(group)
        if sorted(members) != sorted(line):
            raise CrossMeshError(
                f"rank {my_rank}'s group for destination mesh axis {axis} holds ranks "
                f"{members}, not its ranks along that axis {list(line)}"
            )
        if slab.numel() == 0:
            size = list(slab.shape)
            size[gather.dim] *= len(line)
            slab = slab.new_empty(size)
            continue
        gathered = [torch.empty_like(slab) for _ in members]
        dist.all_gather(gathered, slab.contiguous(), group=group)
        by_rank = dict(zip(members, gathered, strict=True))
        slab = torch.cat([by_rank[r] for r in line], dim=gather.dim)
    return slab


def start_transfer(
    plan: TransferPlan,
    local_src: torch.Tensor | None,
    my_rank: int,
    group: dist.ProcessGroup | None = None,
    dst_axis_groups: Mapping[int, dist.ProcessGroup] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PendingTransfer:
    """Post this rank's messages of ``plan`` (arguments as ``run_transfer``) and return at once;
    ``.wait()`` on the result finishes the transfer. ``local_src`` must not be changed before
    then (it is sent from in place where a piece is contiguous)."""
    steps = _rank_steps(plan, my_rank)
    _check_source(plan, local_src, my_rank)
    local_src = local_src.detach() if my_rank in plan.src_boxes else None
    out = None
    if steps.recv_shape is not None:
        out = torch.empty(
            steps.recv_shape,
            dtype=_receive_dtype(plan, local_src, dtype),
            device=_receive_device(local_src, device, group),
        )
    sends = [
        (peer, (local_src if index is None else local_src[index]).contiguous())
        for peer, index in steps.sends
    ]
    inbox: list[tuple[tuple[slice, ...] | None, torch.Tensor]] = []
    receives: list[tuple[int, torch.Tensor]] = []
    for peer, index, shape in steps.receives:
        buffer = out if index is None else out.new_empty(shape)
        inbox.append((index, buffer))
        receives.append((peer, buffer))
    works = _post(sends, receives, group)
    logger.debug(
        "rank %d: cross-mesh %s, %d sends, %d receives",
        my_rank,
        plan.variant,
        len(sends),
        len(receives),
    )
    return PendingTransfer(
        plan, my_rank, local_src, out, inbox, steps.copies, works, dst_axis_groups
    )


def run_transfer(
    plan: TransferPlan,
    local_src: torch.Tensor | None,
    my_rank: int,
    group: dist.ProcessGroup | None = None,
    dst_axis_groups: Mapping[int, dist.ProcessGroup] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Run ``plan`` on this rank (module docstring) and block until this rank's part is done;
    this rank's destination local tensor, or ``None`` off the destination mesh."""
    return start_transfer(
        plan, local_src, my_rank, group, dst_axis_groups, dtype=dtype, device=device
    ).wait()
