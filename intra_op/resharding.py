"""Cost of turning one placement of a tensor into another (DTensor ``redistribute``).

Each mesh axis changes by one of these steps, on the bytes a device holds when the step runs
(``B`` = the full tensor divided by how far the *other* axes shard it at that moment):

    same → same           free
    R → S(d), R → P       free (local slice / keep one summand)
    S(d) → R, S(d) → P    all-gather of B
    S(d) → S(e)           all-to-all of the local shard B / n
    P → R                 all-reduce of B
    P → S(d)              reduce-scatter of B

Axes are changed one at a time; every order of the axes is tried and the cheapest sequence is
the cost. The gradient of a value flows the other way: ``gradient_placements`` says what
placement the gradient of a value must take to reach its producer.

A parameter's gradient, accumulated over the micro-batches of a step, splits into two phases
(``accumulated_gradient_times``). With the gradient produced in placement ``g`` and the
parameter stored in ``w``, the *staged* placement takes ``w``'s ``Shard`` on every axis that
shards the storage and keeps ``g``'s placement on every axis that replicates it:

    every micro-batch   g → staged      (reduce-scatter into ZeRO shards, all-to-all)
    once per step       staged → w      (the data-parallel all-reduce, an all-gather)

When the step's phase only sums a Partial gradient (P → R on every axis that changes), the
runtime all-reduces it flattened into DDP-style buckets of ``BUCKET_BYTES``
(``intra_op.gradient_sync``), axis by axis: the tensor pays the bandwidth of its own bytes
and its share of each bucket's latency (``CostModel.bucketed_all_reduce_time``), not one
all-reduce's latency of its own.

The staged gradient is never larger per device than the stored one (on the axes left for the
step, ``w`` is replicated, so ``g`` holds at most a full copy), so accumulating it costs no
memory beyond the gradient storage the memory model already counts.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import permutations

from hierarchical_ap.cluster import LogicalMesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.profile import TensorMeta
from intra_op.gradient_sync import BUCKET_BYTES
from intra_op.placement import REPLICATE, Partial, Placements, Replicate, Shard, shard_factor


def gradient_placements(placements: Placements) -> Placements:
    """Placement the gradient of a value with ``placements`` must have at its producer: the
    gradient of a Partial value is replicated; Shard and Replicate stay as they are."""
    return tuple(REPLICATE if isinstance(p, Partial) else p for p in placements)


def reshard_time(
    meta: TensorMeta, src: Placements, dst: Placements, mesh: LogicalMesh, cost: CostModel
) -> float:
    """Seconds to redistribute a tensor from ``src`` to ``dst`` placements on ``mesh``."""
    if src == dst:
        return 0.0
    return _reshard_time(meta.nbytes, src, dst, mesh, cost)


def accumulated_gradient_times(
    meta: TensorMeta, grad: Placements, stored: Placements, mesh: LogicalMesh, cost: CostModel
) -> tuple[float, float]:
    """``(every micro-batch, once per step)`` seconds to bring a parameter's gradient from the
    placement it is produced in (``grad``) to the parameter's storage placement (``stored``)
    when it is accumulated over micro-batches (module docstring): ``grad → staged`` and
    ``staged → stored``."""
    staged = tuple(w if isinstance(w, Shard) else g for g, w in zip(grad, stored, strict=True))
    return (
        reshard_time(meta, grad, staged, mesh, cost),
        _step_sync_time(meta, staged, stored, mesh, cost),
    )


def _step_sync_time(
    meta: TensorMeta, staged: Placements, stored: Placements, mesh: LogicalMesh, cost: CostModel
) -> float:
    """``staged → stored`` once per step: bucketed all-reduces when it only sums Partial
    axes, each on the bytes a device holds (``stored``'s shards on the other axes), else
    ``reshard_time`` (module docstring)."""
    changing = [axis for axis in range(len(staged)) if staged[axis] != stored[axis]]
    summed_only = all(
        isinstance(staged[axis], Partial) and isinstance(stored[axis], Replicate)
        for axis in changing
    )
    if not changing or not summed_only:
        return reshard_time(meta, staged, stored, mesh, cost)
    local = meta.nbytes / shard_factor(stored, tuple(mesh.shape))
    return sum(
        cost.bucketed_all_reduce_time(local, mesh.axes[axis], BUCKET_BYTES) for axis in changing
    )


@lru_cache(maxsize=1 << 16)
def _reshard_time(
    nbytes: int, src: Placements, dst: Placements, mesh: LogicalMesh, cost: CostModel
) -> float:
    changing = [axis for axis in range(len(src)) if src[axis] != dst[axis]]
    return min(
        _sequence_time(nbytes, src, dst, order, mesh, cost) for order in permutations(changing)
    )


def _sequence_time(
    nbytes: int,
    src: Placements,
    dst: Placements,
    order: tuple[int, ...],
    mesh: LogicalMesh,
    cost: CostModel,
) -> float:
    current = list(src)
    total = 0.0
    for axis in order:
        others = tuple(p for a, p in enumerate(current) if a != axis)
        other_shape = tuple(s for a, s in enumerate(mesh.shape) if a != axis)
        local = nbytes / shard_factor(others, other_shape)
        total += _axis_step_time(current[axis], dst[axis], local, mesh, axis, cost)
        current[axis] = dst[axis]
    return total


def _axis_step_time(
    src: object, dst: object, nbytes: float, mesh: LogicalMesh, axis: int, cost: CostModel
) -> float:
    mesh_axis = mesh.axes[axis]
    if src == dst or isinstance(src, Replicate):
        return 0.0
    if isinstance(src, Shard):
        if isinstance(dst, Shard):
            return cost.all_to_all_time(nbytes / mesh_axis.size, mesh_axis)
        return cost.all_gather_time(nbytes, mesh_axis)
    # src is Partial
    if isinstance(dst, Shard):
        return cost.reduce_scatter_time(nbytes, mesh_axis)
    return cost.all_reduce_time(nbytes, mesh_axis)
