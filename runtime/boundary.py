"""Moving boundary tensors (activations forward, their gradients backward) between stages.

This is the one place that decides how a value leaves one stage's mesh and enters the next's.
A value travels as pieces, by ``runtime.cross_mesh``: each receiving worker gets only the box
of the global tensor its placement needs, from the sending workers that hold it.

* leaving: the sending stage redistributes the value to its *boundary placement*
  (``boundary_placements``: ``Shard(0)`` on mesh axis 0 where dim 0 splits evenly over it,
  replicated on every other axis; a ``Partial`` is reduced there), recorded by autograd, so the
  gradient that comes back in that placement flows back through the redistribution. A 0-dim
  value (a loss) leaves as its full tensor. Both sides compute the boundary placement from the
  value's shape and the sending mesh's shape alone, so the transfer plan is static;
* travelling: ``transfer_plan`` plans the resharding from the sending mesh in the boundary
  placement to the receiving mesh in the placement the receiving stage wants its input in
  (the reverse plan for the gradient); every worker of both stages calls ``start`` with its
  local piece (``DTensor.to_local()``) or nothing, and the receiving workers ``finish`` it
  (the waits use the process group's timeout);
* entering: the received local piece becomes a DTensor on the receiving mesh in the placement
  that was planned (``DTensor.from_local``); on a one-device mesh it stays the plain full
  tensor (the stage runs plain there), as does a 0-dim value.

Messages are not tagged (NCCL does not match tags): each (kind, boundary) direction gets its
own process group, and on it both sides post their transfers in micro-batch order, value by
value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from runtime.cross_mesh import PendingTransfer, TransferPlan, plan_transfer, start_transfer

ACTIVATION = 0
GRADIENT = 1


@dataclass(frozen=True)
class MeshSide:
    """One side of a boundary: the stage's workers as its logical mesh, and the placement the
    value has there."""

    ranks: np.ndarray
    placements: tuple[Placement, ...]

    @property
    def plain(self) -> bool:
        """A one-device mesh: the stage runs plain tensors, not DTensors."""
        return self.ranks.size == 1


def boundary_placements(shape: Sequence[int], mesh_shape: Sequence[int]) -> tuple[Placement, ...]:
    """The placement a value leaves its stage in: ``Shard(0)`` on mesh axis 0 when that axis
    has more than one device and divides dim 0, else replicated; replicated on other axes."""
    rows = mesh_shape[0]
    split = rows > 1 and len(shape) > 0 and shape[0] % rows == 0
    first: Placement = Shard(0) if split else Replicate()
    return (first, *(Replicate() for _ in mesh_shape[1:]))


def leaving(value: DTensor) -> torch.Tensor:
    """The tensor to send for ``value``, still in the autograd graph: ``value`` in its boundary
    placement (its full tensor when it is 0-dim)."""
    if value.ndim == 0:
        return value.full_tensor()
    wanted = boundary_placements(value.shape, value.device_mesh.shape)
    if tuple(value.placements) == wanted:
        return value
    return value.redistribute(value.device_mesh, wanted)


def entering(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """A received value as the receiving stage reads it: a DTensor already placed on ``mesh``
    as is; a plain full tensor as a replicated DTensor leaf on ``mesh``."""
    if isinstance(tensor, DTensor):
        return tensor
    return DTensor.from_local(tensor, mesh, (Replicate(),) * mesh.ndim, run_check=False)


def transfer_plan(
    shape: Sequence[int], dtype: torch.dtype, src: MeshSide, dst: MeshSide
) -> TransferPlan:
    """The cross-mesh plan moving a value of ``shape`` from ``src`` to ``dst``."""
    return plan_transfer(
        tuple(shape),
        src.ranks,
        src.placements,
        dst.ranks,
        dst.placements,
        itemsize=dtype.itemsize,
    )


def local_piece(tensor: torch.Tensor, side: MeshSide) -> torch.Tensor:
    """This worker's piece of a value it sends: the local tensor of a DTensor in ``side``'s
    placement (redistributed there if it is not), or a plain full tensor as it is."""
    if not isinstance(tensor, DTensor):
        return tensor.detach()
    if tuple(tensor.placements) != side.placements:
        tensor = tensor.redistribute(tensor.device_mesh, side.placements)
    return tensor.to_local().detach()


def start(
    plan: TransferPlan,
    piece: torch.Tensor | None,
    rank: int,
    group,
    dst_axis_groups: Mapping[int, object] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> PendingTransfer:
    """Post this worker's messages of ``plan`` (its local piece on the sending side)."""
    return start_transfer(plan, piece, rank, group, dst_axis_groups, dtype=dtype, device=device)


def finish(pending: PendingTransfer, dst: MeshSide, mesh: DeviceMesh) -> torch.Tensor:
    """Wait for a transfer on a receiving worker; the value in ``dst``'s placement (a plain
    full tensor on a one-device mesh, and for a 0-dim value, which leaves its stage as its full
    tensor and enters as one)."""
    local = pending.wait()
    assert local is not None
    if dst.plain or local.ndim == 0:
        return local
    return DTensor.from_local(local, mesh, dst.placements, run_check=False)
