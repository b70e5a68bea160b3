"""Moving boundary tensors (activations forward, their gradients backward) between stages.

This is the one place that decides how a value leaves one stage's mesh and enters the next's;
``runtime.cross_mesh`` (slice-wise resharding between the two meshes' placements) replaces it.
The present scheme is the simplest correct one:

* leaving: the sending stage gathers the value to its full tensor (``DTensor.full_tensor``,
  recorded by autograd, so the gradient that comes back is scattered to the value's placement);
* travelling: each sending worker sends the full tensor to its receiving workers (pairing in
  ``runtime.instructions``) with ``isend``; each receiving worker receives it with ``irecv``
  and waits, with the process group's timeout;
* entering: the full tensor becomes a replicated DTensor leaf on the receiving mesh; the
  stage program redistributes it to the placement its first reader wants, and the gradient
  of the leaf comes back replicated, i.e. full, on every receiving worker.

Messages carry a tag naming (kind, micro-batch, sending stage, value), so that receives match
their sends in any order (gloo matches by tag).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

ACTIVATION = 0
GRADIENT = 1
MAX_VALUES_PER_BOUNDARY = 256


def message_tag(kind: int, microbatch: int, from_stage: int, num_stages: int, value: int) -> int:
    """A tag unique to one boundary tensor of one micro-batch within a step."""
    if not 0 <= value < MAX_VALUES_PER_BOUNDARY:
        raise ValueError(f"a stage boundary carries at most {MAX_VALUES_PER_BOUNDARY} values")
    return ((microbatch * num_stages + from_stage) * 2 + kind) * MAX_VALUES_PER_BOUNDARY + value


def leaving(value: DTensor) -> torch.Tensor:
    """The tensor to send for ``value``: its full tensor, still in the autograd graph."""
    return value.full_tensor()


def entering(tensor: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """A received full tensor as a replicated DTensor on ``mesh`` (gradients flow to it)."""
    return DTensor.from_local(tensor, mesh, (Replicate(),) * mesh.ndim, run_check=False)


def send(
    tensors: Sequence[torch.Tensor], peers: Sequence[int], tags: Sequence[int]
) -> list[tuple[Any, torch.Tensor]]:
    """Post non-blocking sends of every tensor to every peer; returns (work, buffer) pairs:
    keep each buffer alive until its work has been waited on."""
    pending = []
    for tensor, tag in zip(tensors, tags, strict=True):
        buffer = tensor.detach().contiguous()
        for peer in peers:
            pending.append((dist.isend(buffer, peer, tag=tag), buffer))
    return pending


def receive(
    metas: Sequence[tuple[torch.Size, torch.dtype]],
    peer: int,
    tags: Sequence[int],
    timeout: timedelta,
    device: torch.device,
) -> list[torch.Tensor]:
    """Receive one tensor of each (shape, dtype) from ``peer``; raises on timeout or a
    vanished peer."""
    buffers = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in metas]
    works = [dist.irecv(b, peer, tag=tag) for b, tag in zip(buffers, tags, strict=True)]
    for work in works:
        work.wait(timeout)
    return buffers
