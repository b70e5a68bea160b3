"""Placements of a tensor on a logical mesh, in DTensor's own terms.

A tensor's placement on a mesh with k axes is a tuple of k DTensor placements, one per mesh
axis: ``Shard(d)`` (split along tensor dim d over that axis), ``Replicate()`` or ``Partial()``
(each device holds a summand of the value). ``format_placements`` gives Alpa's compact display
form (``S0R`` is Shard(0) on axis 0, Replicate on axis 1; ``P`` is Partial).

A tensor dim sharded over several axes is split over the product of their sizes; a placement
is *valid* for a shape when every sharded dim is divisible by that product (uneven sharding is
not used by the planner).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from hierarchical_ap.profile import TensorMeta

Placements = tuple[Placement, ...]

REPLICATE = Replicate()
PARTIAL = Partial()

__all__ = [
    "PARTIAL",
    "REPLICATE",
    "Partial",
    "Placement",
    "Placements",
    "Replicate",
    "Shard",
    "format_placements",
    "is_valid",
    "local_bytes",
    "normalize",
    "replicated",
    "shard_factor",
    "sharded_dims",
]


def replicated(mesh_ndim: int) -> Placements:
    return (REPLICATE,) * mesh_ndim


def normalize(placements: Iterable[Placement], ndim: int) -> Placements:
    """Turn negative ``Shard`` dims into their positive index for a tensor of ``ndim`` dims."""
    out = []
    for p in placements:
        if isinstance(p, Shard) and p.dim < 0:
            p = Shard(p.dim + ndim)
        out.append(p)
    return tuple(out)


def sharded_dims(placements: Placements) -> dict[int, list[int]]:
    """Tensor dim → the mesh axes that shard it."""
    dims: dict[int, list[int]] = {}
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            dims.setdefault(p.dim, []).append(axis)
    return dims


def shard_factor(placements: Placements, mesh_shape: Sequence[int], dim: int | None = None) -> int:
    """How many pieces the tensor (or only tensor dim ``dim``) is split into."""
    return math.prod(
        mesh_shape[axis]
        for axis, p in enumerate(placements)
        if isinstance(p, Shard) and (dim is None or p.dim == dim)
    )


def is_valid(shape: Sequence[int], placements: Placements, mesh_shape: Sequence[int]) -> bool:
    """True when every sharded dim exists and splits evenly over its axes."""
    for dim, axes in sharded_dims(placements).items():
        if not 0 <= dim < len(shape):
            return False
        if shape[dim] % math.prod(mesh_shape[a] for a in axes):
            return False
    return True


def local_bytes(meta: TensorMeta, placements: Placements, mesh_shape: Sequence[int]) -> float:
    """Bytes one device holds: the full size divided by the shard factor (a Partial or a
    Replicate axis keeps a full-size local tensor)."""
    return meta.nbytes / shard_factor(placements, mesh_shape)


def format_placements(placements: Placements) -> str:
    """Compact display form: ``S0R``, ``RS1``, ``PR``."""
    parts = []
    for p in placements:
        if isinstance(p, Shard):
            parts.append(f"S{p.dim}")
        elif isinstance(p, Partial):
            parts.append("P")
        else:
            parts.append("R")
    return "".join(parts)
