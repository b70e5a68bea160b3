"""Data-parallel gradient synchronisation once per step, on 2 gloo processes (no Ray).

A stage on a data-parallel ``(2, 1)`` mesh runs ``B = 4`` micro-batches per step. Every
collective each backward issues is recorded by a ``TorchDispatchMode`` (DTensor's functional
collectives and ``torch.distributed``'s own ops both pass the dispatcher):

* replicated parameters: no all-reduce in the first ``B - 1`` backwards, and in the last one
  exactly one (all of the stage's gradients in one flat bucket), in float32 also under the
  bf16 policy (fp32 master gradients);
* ZeRO (parameters stored ``Shard(0)`` over the data axis): one reduce-scatter per ZeRO
  parameter in every backward, as the cost model charges, and the replicated rest in one
  all-reduce after the last backward;
* gradients of replicated parameters that DTensor produces sharded along the data axis:
  accumulated as shards and all-gathered once per step, not once per micro-batch;
* losses and final parameters equal single-process training within 1e-5 (fp32).

``reduce_to_stored`` is also checked directly against the sum written by hand: buckets of
about ``BUCKET_BYTES`` (one all-reduce each), and the DTensor fallback for a gradient sharded
along an axis that replicates its parameter (one all-gather per step).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from intra_op import gradient_sync
from intra_op.gradient_sync import AccumulatedGradient, accumulation_placements, reduce_to_stored
from tests.distributed import DistributedWorkers
from tests.runtime_cases import (
    BlockMLP,
    build_case,
    built_worker,
    compare,
    plan_for,
    reference_run,
    sgd,
)

WORLD = 2
STEPS = 2
MICROBATCHES = 4
ZERO_BIASES = ("blocks.0.0.bias", "blocks.1.0.bias")
ZERO_WEIGHTS = ("blocks.0.0.weight", "blocks.2.0.weight")
PARAMETERS = sum(p.numel() for p in BlockMLP().parameters())
FP32 = "torch.float32"
_KINDS = {
    "all_reduce": ("all_reduce", "allreduce"),
    "reduce_scatter": ("reduce_scatter",),
    "all_gather": ("all_gather", "allgather"),
}


class _Collectives(TorchDispatchMode):
    """Records (kind, dtype, number of elements) of every all-reduce, reduce-scatter and
    all-gather dispatched while active (as ``CommDebugMode`` does, an op on DTensors is handed back to DTensor
    first, so that the collectives it runs on local tensors are seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if any(t is DTensor for t in types):
            return NotImplemented
        name = func._overloadpacket.__name__
        for kind, words in _KINDS.items():
            if "c10d" in func.namespace and any(word in name for word in words):
                tensors = [t for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)]
                self.calls.append((kind, str(tensors[0].dtype), tensors[0].numel()))
        return func(*args, **(kwargs or {}))


def _stored(plan, zero: tuple[str, ...] = ()):
    """``plan`` with every parameter replicated except ``zero``, stored sharded over the data
    axis (ZeRO-3)."""
    (stage,) = plan.stages
    placements = {
        fqn: ("S(0)", "R") if fqn in zero else ("R", "R") for fqn in stage.param_placements
    }
    return replace(plan, stages=(replace(stage, param_placements=placements),))


def train_counting(plan, steps: int) -> tuple[list, dict, list[list[Counter]], dict]:
    """On one rank: train ``steps`` SGD steps of the MLP, recording the collectives of every
    backward; losses, state, per step the collectives of each backward, and the stage's
    parameter and gradient dtypes."""
    torch.manual_seed(0)
    case = build_case("mlp", steps)
    worker = built_worker(plan, case, sgd)
    (program,) = worker.programs.values()
    backward = program.backward
    recorded: list[Counter] = []

    def counted_backward(microbatch, grads):
        with _Collectives() as mode:
            result = backward(microbatch, grads)
        recorded.append(Counter(mode.calls))
        return result

    program.backward = counted_backward
    losses, per_step = [], []
    for inputs, targets in case.batches:
        losses.append(worker.train_step(inputs, targets))
        per_step.append(list(recorded))
        recorded.clear()
    return losses, worker.full_state(), per_step, worker.stage_dtypes()[0]


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


def _run(workers, plan):
    results = workers.run(train_counting, plan, STEPS, timeout_s=200)
    losses = next(r[0] for r in results if r[0][0] is not None)
    state: dict = {}
    for result in results:
        state.update(result[1])
    return [sum(mb) / len(mb) for mb in losses], state, [r[2] for r in results], results[0][3]


def _mlp_plan(precision: str = "fp32"):
    plan = plan_for("mlp", WORLD, tp=1, pp=1, dp=2, micro_batch_size=1, precision=precision)
    assert plan.num_microbatches == MICROBATCHES
    (stage,) = plan.stages
    assert tuple(stage.logical_mesh) == (2, 1)
    return plan


def _expected_backwards(
    loss_dtype: str | None, bucket: int, scattered: tuple[int, ...] = ()
) -> list[Counter]:
    """The collectives of a step's ``B`` backwards: in each, on DTensors, the loss's own scalar
    all-reduce (``nll_loss``'s backward reduces the batch-sharded total weight; ``loss_dtype``
    ``None``: none, the stage runs plain data parallelism on its rows,
    ``intra_op.local_execution``) and the reduce-scatter of each ZeRO gradient (``scattered``:
    their sizes); in the last, one fp32 all-reduce of the ``bucket`` values of every
    replicated parameter's gradient."""
    every = Counter({("all_reduce", loss_dtype, 1): 1} if loss_dtype is not None else {}) + Counter(
        ("reduce_scatter", "torch.float32", n) for n in scattered
    )
    return [every] * (MICROBATCHES - 1) + [every + Counter({("all_reduce", FP32, bucket): 1})]


@pytest.mark.timeout(240)
def test_data_parallel_stage_all_reduces_once_per_step(workers):
    losses, state, per_rank, _ = _run(workers, _stored(_mlp_plan()))
    # before: every backward all-reduced each of the 12 parameter gradients; every parameter
    # replicated, the stage runs on its rows as plain data parallelism: no loss all-reduce
    expected = _expected_backwards(None, PARAMETERS)
    assert per_rank == [[expected] * STEPS] * WORLD, per_rank[0]
    reference = reference_run(build_case("mlp", STEPS), sgd)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(240)
def test_zero_gradients_reduce_scatter_every_microbatch_the_rest_once(workers):
    losses, state, per_rank, _ = _run(workers, _stored(_mlp_plan(), ZERO_BIASES))
    expected = _expected_backwards(FP32, PARAMETERS - 2 * 16, (16, 16))
    assert per_rank == [[expected] * STEPS] * WORLD, per_rank[0]
    reference = reference_run(build_case("mlp", STEPS), sgd)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(240)
def test_gradients_sharded_along_the_data_axis_are_gathered_once_per_step(workers):
    # with blocks 0 and 2's weights stored sharded over the data axis, DTensor's rules split
    # the activations after them by features, so the (replicated) weights of blocks 1 and 3
    # get gradients sharded along the data axis (Shard(1): 16 x 8 local values) and their
    # biases too (Shard(0): 8): they accumulate as shards, all-gathered once per step
    losses, state, per_rank, _ = _run(workers, _stored(_mlp_plan(), ZERO_WEIGHTS))
    once = Counter({("all_gather", FP32, 16 * 8): 2, ("all_gather", FP32, 8): 2})
    for per_step in per_rank:
        for backwards in per_step:
            every = backwards[0]
            assert backwards == [every] * (MICROBATCHES - 1) + [every + once], backwards
    reference = reference_run(build_case("mlp", STEPS), sgd)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(240)
def test_bf16_gradients_are_reduced_once_in_float32(workers):
    _, _, per_rank, dtypes = _run(workers, _stored(_mlp_plan("bf16")))
    expected = _expected_backwards(None, PARAMETERS)
    assert per_rank == [[expected] * STEPS] * WORLD, per_rank[0]
    assert dtypes["parameters"] == dtypes["gradients"] == [FP32]


def reduce_by_hand(cap: int) -> dict:
    """On one rank of a (2,) mesh: ``reduce_to_stored`` of three Partial gradients and one
    gradient sharded along the replicating axis, with buckets of ``cap`` bytes; the largest
    error against the sums written by hand, and the collectives issued."""
    mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(7)
    full = {
        name: [torch.randn(shape, generator=generator) for _ in range(WORLD)]
        for name, shape in (("a", (4, 3)), ("b", (5,)), ("c", (2, 2, 2)))
    }
    sharded = torch.randn(6, 3, generator=generator)
    gradients = {
        name: AccumulatedGradient(
            parts[rank].clone(), (Partial(),), (Replicate(),), parts[rank].shape, (0,)
        )
        for name, parts in full.items()
    }
    gradients["s"] = AccumulatedGradient(
        sharded.chunk(WORLD)[rank].clone(), (Shard(0),), (Replicate(),), sharded.shape, (3, 1)
    )
    cap_before = gradient_sync.BUCKET_BYTES
    gradient_sync.BUCKET_BYTES = cap
    try:
        with _Collectives() as mode:
            reduced = reduce_to_stored(mesh, gradients)
    finally:
        gradient_sync.BUCKET_BYTES = cap_before
    expected = {name: sum(parts) for name, parts in full.items()} | {"s": sharded}
    error = max(float((reduced[k] - expected[k]).abs().max()) for k in expected)
    return {
        "error": error,
        "order": list(reduced),
        "emptied": not gradients,
        "calls": Counter(kind for kind, _, _ in mode.calls),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "cap,buckets",
    [
        (1 << 20, 1),  # 25 floats of Partial gradients: one bucket
        (48, 2),  # "a" (48 bytes) fills a bucket; "b" and "c" (52 bytes) share the next
        (4, 3),  # every gradient is a bucket of its own
    ],
)
def test_reduce_to_stored_buckets_partial_gradients(workers, cap, buckets):
    for result in workers.run(reduce_by_hand, cap, timeout_s=100):
        assert result["error"] <= 1e-6
        assert result["order"] == ["a", "b", "c", "s"] and result["emptied"]
        # the sharded gradient is all-gathered by DTensor, once
        assert result["calls"] == Counter({"all_reduce": buckets, "all_gather": 1})


def test_accumulation_placements_follow_the_cost_model():
    P, R = Partial(), Replicate()
    # replicated axes keep the produced placement (reduced once per step), sharded axes take
    # the stored one (reduce-scattered every micro-batch)
    assert accumulation_placements((P, Shard(0)), (R, Shard(0))) == (P, Shard(0))
    assert accumulation_placements((P, R), (Shard(0), R)) == (Shard(0), R)
    assert accumulation_placements((P, P), (Shard(0), R)) == (Shard(0), P)
    assert accumulation_placements((Shard(1), R), (R, R)) == (Shard(1), R)
