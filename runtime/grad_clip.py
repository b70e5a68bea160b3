"""Gradient clipping by the global norm, over gradients sharded on meshes and split over stages.

In one process, ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` computes

    (1)  N = ( Σ_p Σ_i g_{p,i}² )^½      over every element i of every parameter p's gradient,
    (2)  c = min(1, max_norm / (N + 1e-6)),
    (3)  g ← c · g                        for every gradient,

and returns N. Here each worker holds pieces of the gradients, some of them held by several
workers, so the workers count every element of (1) exactly once:

* a piece stored ``Shard`` on a mesh axis is distinct per coordinate of that axis; a piece
  ``Replicate`` on an axis is the same on all of them, and counts only at coordinate 0 of every
  such axis (``counts_on``);
* a parameter several stages read (a tied embedding) holds the same summed gradient in each
  stage's copy after the shared-gradient sync; only the copy of the first stage that reads it
  counts (the caller chooses which gradients count);
* the workers' partial sums are added by one all-reduce over the global group, so every worker
  has N² and scales all of its pieces, replicas and copies alike, by the same c (3): replicas
  stay equal.

Partial sums are taken per tensor in the gradient's dtype (``torch._foreach_norm``, as
``clip_grad_norm_`` does) and added in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement

CLIP_EPSILON = 1e-6
"""The ``+ 1e-6`` of (2), as in ``torch.nn.utils.clip_grad_norm_``."""


def counts_on(placements: Sequence[Placement], coordinate: Sequence[int] | None) -> bool:
    """Whether the worker at mesh ``coordinate`` counts its piece of a tensor stored in
    ``placements``: at coordinate 0 of every axis it is not sharded over. ``None`` (a worker
    outside the mesh) counts nothing. Raises ``ValueError`` for a ``Partial`` placement, whose
    pieces are addends, not elements (gradients are reduced before they are clipped)."""
    if coordinate is None:
        return False
    for axis, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(
                f"a gradient is Partial on mesh axis {axis}; reduce it to its parameter's "
                "placement before clipping"
            )
        if not placement.is_shard() and coordinate[axis] != 0:
            return False
    return True


def local_piece(grad: torch.Tensor) -> torch.Tensor:
    """The tensor this worker stores of ``grad`` (a DTensor's local tensor, no copy)."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


def square_sum(pieces: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ g² over the elements of ``pieces``, a float64 scalar on ``device`` (0 if none)."""
    if not pieces:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(list(pieces))
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]).square().sum()


@torch.no_grad()
def clip_by_global_norm(
    counted: Sequence[torch.Tensor],
    scaled: Sequence[torch.Tensor],
    max_norm: float,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Clip in place and return N (1): ``counted`` are the pieces (``local_piece``) this
    worker adds to (1), ``scaled`` the pieces of every gradient it holds (3), either possibly
    empty (a worker whose parameters
    are all frozen still joins the all-reduce); one all-reduce over ``group`` (the global
    group when ``None``; no communication outside a distributed run). A non-finite N makes every
    gradient non-finite, as ``clip_grad_norm_`` does without ``error_if_nonfinite``."""
    total = square_sum(counted, device)
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    norm = float(total.sqrt())
    coefficient = max_norm / (norm + CLIP_EPSILON)
    if scaled and not coefficient >= 1.0:  # c < 1 of (2), or NaN
        torch._foreach_mul_(list(scaled), coefficient)
    return norm
