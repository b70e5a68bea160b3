"""``runtime.grad_clip`` against ``torch.nn.utils.clip_grad_norm_`` on the full tensors.

Four gloo processes hold gradients as DTensors on a 2×2 mesh in every kind of placement
(sharded on one axis or both, replicated, unevenly split), plus one plain tensor that only
rank 0 counts; the global norm they compute together, and the gradients they clip, must equal
``clip_grad_norm_`` over the same full tensors in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

from runtime import grad_clip
from tests.distributed import DistributedWorkers

WORLD = 4
PLACEMENTS = [
    (Shard(0), Replicate()),
    (Replicate(), Shard(1)),
    (Replicate(), Replicate()),
    (Shard(0), Shard(1)),
    (Shard(0), Shard(0)),  # 7 rows over 4 pieces: uneven
]
SHAPES = [(4, 6), (3, 8), (5,), (6, 4), (7, 3)]


def _full_gradients(scale: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [scale * torch.randn(shape, generator=generator) for shape in SHAPES]


def _clip_on_rank(scale: float, max_norm: float) -> tuple[float, list[torch.Tensor]]:
    mesh = init_device_mesh("cpu", (2, 2))
    full = _full_gradients(scale)
    grads = [
        distribute_tensor(t, mesh, placements, src_data_rank=None)
        for t, placements in zip(full, PLACEMENTS, strict=True)
    ]
    plain = full[0].clone()  # a one-device stage's gradient: counted on rank 0 only
    counted = [
        grad_clip.local_piece(g)
        for g in grads
        if grad_clip.counts_on(g.placements, mesh.get_coordinate())
    ]
    if dist.get_rank() == 0:
        counted.append(plain)
    norm = grad_clip.clip_by_global_norm(
        counted, [*(grad_clip.local_piece(g) for g in grads), plain], max_norm, torch.device("cpu")
    )
    return norm, [g.full_tensor() for g in grads] + [plain]


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "within-bound"])
def test_the_global_norm_and_the_clipped_gradients_equal_one_process(workers, max_norm):
    expected = [t.clone().requires_grad_() for t in _full_gradients(2.0)]
    expected.append(_full_gradients(2.0)[0].requires_grad_())
    for t in expected:
        t.grad = t.detach().clone()
    reference_norm = torch.nn.utils.clip_grad_norm_(expected, max_norm).item()
    for norm, clipped in workers.run(_clip_on_rank, 2.0, max_norm, timeout_s=60):
        assert norm == pytest.approx(reference_norm, rel=1e-6)
        for got, want in zip(clipped, expected, strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-7)
    assert (reference_norm > max_norm) == (max_norm == 0.5)


def test_replicated_axes_count_at_coordinate_zero_only():
    placements = (Shard(0), Replicate())
    assert [grad_clip.counts_on(placements, c) for c in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [
        True,
        True,
        False,
        False,
    ]
    assert grad_clip.counts_on((Shard(1), Shard(0)), (1, 1))
    assert not grad_clip.counts_on(placements, None)


def test_a_partial_gradient_is_refused():
    with pytest.raises(ValueError, match="Partial on mesh axis 1; reduce it"):
        grad_clip.counts_on((Shard(0), Partial()), (0, 0))


def test_a_non_finite_norm_makes_every_gradient_non_finite_as_clip_grad_norm_does():
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([2.0])]
    norm = grad_clip.clip_by_global_norm(grads, grads, 1.0, torch.device("cpu"))
    assert norm != norm
    assert all(torch.isnan(g).all() for g in grads)


def test_a_worker_without_gradients_adds_nothing_and_scales_nothing():
    assert grad_clip.clip_by_global_norm([], [], 1.0, torch.device("cpu")) == 0.0
