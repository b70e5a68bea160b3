"""Gradient accumulation over micro-batches with one data-parallel reduction per step.

With ``B`` micro-batches per optimizer step, a parameter replicated along a mesh axis whose
activations are batch-sharded gets a ``Partial`` gradient from every micro-batch. Reducing
each one (what DTensor does when the gradient is redistributed to the parameter's placement)
costs ``B`` all-reduces per step; summing the local summands first and reducing the sum once
gives the same gradient for one all-reduce, since

    sum_i allreduce(g_i) = allreduce(sum_i g_i).

The cost model prices exactly this split (``intra_op.resharding.accumulated_gradient_times``):
per mesh axis, a parameter's gradient is brought every micro-batch from the placement it is
produced in, ``g``, to the *accumulation placement*

    staged[a] = stored[a]  if the parameter is sharded along axis a (ZeRO: reduce-scatter
                           every micro-batch, as FSDP does)
                g[a]       otherwise (kept as produced: a ``Partial`` stays unreduced),

accumulated locally in that placement, and brought from ``staged`` to the stored placement
once per step (``accumulation_placements``).

``StepParameter`` is the differentiable wrapping of one parameter's local shard into the
DTensor the step's micro-batches read: its backward brings each micro-batch's gradient to the
accumulation placement (recorded per parameter by the first micro-batch; the same for every
micro-batch of a program) and adds its local tensor to the step's sum (``StepGradients``, in
the gradient's dtype: the fp32 master's under bf16). ``reduce_to_stored`` then turns the
accumulated local gradients into gradients in the stored placements: gradients whose only
difference from it is a ``Partial`` sum on some axes are flattened into buckets (of about
``BUCKET_BYTES`` each, one per set of axes and dtype, as DDP's gradient buckets) and each
bucket is all-reduced once per axis, all buckets in flight together; any other difference (a
gradient sharded along an axis that replicates the parameter) is redistributed by DTensor,
once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from hierarchical_ap.errors import HapError
from intra_op.placement import Partial, Placements, Replicate, Shard, format_placements

__all__ = [
    "BUCKET_BYTES",
    "AccumulatedGradient",
    "GradientSyncError",
    "StepGradients",
    "StepParameter",
    "accumulation_placements",
    "reduce_to_stored",
    "summed_axes",
]

BUCKET_BYTES = 25 * 2**20
"""Flat all-reduce buffer size: DDP's default ``bucket_cap_mb`` (25 MiB). A bucket closes as
soon as it holds at least this many bytes, so it exceeds the cap by less than its last
gradient."""


class GradientSyncError(HapError, RuntimeError):
    """Micro-batches of one step produced a parameter's gradient in different placements."""


def accumulation_placements(grad: Placements, stored: Placements) -> Placements:
    """The placement a gradient produced in ``grad`` is accumulated in, for a parameter stored
    in ``stored``: the stored placement along the axes that shard the parameter, the produced
    one elsewhere (module docstring)."""
    return tuple(w if isinstance(w, Shard) else g for g, w in zip(grad, stored, strict=True))


@dataclass(frozen=True)
class AccumulatedGradient:
    """A parameter's local gradient summed over a step's micro-batches, in ``staged``, to be
    brought to ``stored``; ``shape`` and ``stride`` are the global ones of the gradient (the
    parameter's shape; strides of ``local``'s layout, contiguous)."""

    local: torch.Tensor
    staged: Placements
    stored: Placements
    shape: torch.Size
    stride: tuple[int, ...]


class StepGradients:
    """The gradients of one step's micro-batches, summed locally per parameter (FQN) in its
    accumulation placement, which the first micro-batch's gradient decides."""

    def __init__(self) -> None:
        self._sums: dict[str, AccumulatedGradient] = {}

    def add(self, fqn: str, grad: DTensor, stored: Placements) -> None:
        """Add one micro-batch's gradient ``grad`` of parameter ``fqn`` (stored ``stored``),
        brought to its accumulation placement (a reduce-scatter along the axes that shard the
        parameter, nothing elsewhere). Raises ``GradientSyncError`` when it would accumulate
        in another placement than the step's earlier micro-batches."""
        staged = accumulation_placements(tuple(grad.placements), stored)
        if tuple(grad.placements) != staged:
            grad = grad.redistribute(grad.device_mesh, staged)
        local = grad.to_local()
        summed = self._sums.get(fqn)
        if summed is None:
            # a copy: autograd may hand the same tensor to other consumers of the gradient
            self._sums[fqn] = AccumulatedGradient(
                local.clone(memory_format=torch.contiguous_format),
                staged,
                stored,
                grad.shape,
                _contiguous_stride(grad.shape),
            )
            return
        if summed.staged != staged:
            raise GradientSyncError(
                f"the gradient of parameter '{fqn}' would accumulate as "
                f"{format_placements(staged)} in one micro-batch and "
                f"{format_placements(summed.staged)} in another; every micro-batch of a step "
                "must run the same program (same input shapes and placements)"
            )
        summed.local.add_(local)

    def take(self) -> dict[str, AccumulatedGradient]:
        """The sums so far (FQN → sum), leaving none."""
        sums, self._sums = self._sums, {}
        return sums


class StepParameter(torch.autograd.Function):
    """``local`` (a parameter's local shard, a leaf of the step) as the DTensor of global
    ``shape`` and ``stride`` placed ``stored`` (the parameter's placement) on ``mesh``; its
    backward adds the gradient to ``gradients`` (``StepGradients.add``) instead of handing it
    to the leaf, whose shape a gradient sharded along an axis that replicates the parameter
    would not have."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        local: torch.Tensor,
        mesh: DeviceMesh,
        stored: Placements,
        shape: torch.Size,
        stride: tuple[int, ...],
        fqn: str,
        gradients: StepGradients,
    ) -> DTensor:
        ctx.set_materialize_grads(False)
        ctx.stored, ctx.fqn, ctx.gradients = stored, fqn, gradients
        return DTensor.from_local(local, mesh, stored, run_check=False, shape=shape, stride=stride)

    @staticmethod
    def backward(ctx: Any, grad: DTensor | None) -> tuple[None, ...]:  # type: ignore[override]
        if grad is not None:
            ctx.gradients.add(ctx.fqn, grad, ctx.stored)
        return (None,) * 7


@dataclass
class _Bucket:
    """Gradients all-reduced together: the same ``axes`` to reduce, the same dtype."""

    axes: tuple[int, ...]
    names: list[str] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    """The local gradients until the bucket is flattened (then empty)."""
    nbytes: int = 0


def summed_axes(staged: Placements, stored: Placements) -> tuple[int, ...] | None:
    """The axes where ``staged`` is a ``Partial`` sum of a value ``stored`` replicates, when
    those are the only differences (an all-reduce along each brings it to ``stored``);
    ``None`` for any other difference."""
    axes = []
    for axis, (s, w) in enumerate(zip(staged, stored, strict=True)):
        if s == w:
            continue
        if not (isinstance(s, Partial) and s.reduce_op == "sum" and isinstance(w, Replicate)):
            return None
        axes.append(axis)
    return tuple(axes)


def reduce_to_stored(
    mesh: DeviceMesh, gradients: dict[str, AccumulatedGradient]
) -> dict[str, torch.Tensor]:
    """FQN → the local tensor of each gradient in its stored placement, in ``gradients``'
    order; ``gradients`` is emptied on the way, so that an accumulated local tensor nobody
    else holds is freed once it is copied into its bucket (the extra memory is then one
    bucket, not a copy of every gradient).

    Collective over ``mesh``: every rank passes the same FQNs in the same order with the same
    placements (the same program ran on each). Gradients already in their stored placement
    are returned as they are; ``Partial``-sum ones are reduced in buckets (module docstring);
    others are redistributed by DTensor."""
    order = list(gradients)
    result: dict[str, torch.Tensor] = {}
    open_buckets: dict[tuple[tuple[int, ...], torch.dtype], _Bucket] = {}
    in_flight: list[tuple[_Bucket, torch.Tensor, Any]] = []
    for fqn in order:
        gradient = gradients.pop(fqn)
        if gradient.staged == gradient.stored:
            result[fqn] = gradient.local
            continue
        axes = summed_axes(gradient.staged, gradient.stored)
        if axes is None:
            result[fqn] = (
                DTensor.from_local(
                    gradient.local,
                    mesh,
                    gradient.staged,
                    run_check=False,
                    shape=gradient.shape,
                    stride=gradient.stride,
                )
                .redistribute(mesh, gradient.stored)
                .to_local()
            )
            continue
        key = (axes, gradient.local.dtype)
        bucket = open_buckets.setdefault(key, _Bucket(axes))
        bucket.names.append(fqn)
        bucket.shapes.append(gradient.local.shape)
        bucket.tensors.append(gradient.local)
        bucket.nbytes += gradient.local.numel() * gradient.local.element_size()
        if bucket.nbytes >= BUCKET_BYTES:
            in_flight.append(_start(mesh, open_buckets.pop(key)))
        del gradient
    in_flight += [_start(mesh, bucket) for bucket in open_buckets.values()]
    for bucket, flat, work in in_flight:
        work.wait()
        pieces = flat.split([shape.numel() for shape in bucket.shapes])
        for fqn, piece, shape in zip(bucket.names, pieces, bucket.shapes, strict=True):
            result[fqn] = piece.view(shape)
    return {fqn: result[fqn] for fqn in order}


def _start(mesh: DeviceMesh, bucket: _Bucket) -> tuple[_Bucket, torch.Tensor, Any]:
    """Flatten ``bucket`` into one buffer (dropping its tensors) and start its all-reduces
    (one per axis, in axis order, each after the previous one); returns the last one's work
    handle."""
    flat = torch.cat([t.reshape(-1) for t in bucket.tensors])
    bucket.tensors = []
    work = None
    for axis in bucket.axes:
        if work is not None:
            work.wait()
        work = dist.all_reduce(flat, group=mesh.get_group(axis), async_op=True)
    return bucket, flat, work


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))
