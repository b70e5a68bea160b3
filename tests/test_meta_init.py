"""Meta-device initialisation: keyed draws, shard by shard, equal to the whole model's weights.

In one process, ``init_regions`` on boxes of every tensor of zoo, transformers and plain models
must equal ``init_module_weights`` (the whole model, the public reference) sliced, bit for bit;
the values must follow the documented key by hand; a dim-0 shard must allocate only the chunk
its rows fall in, a dim-1 shard one chunk at a time; tensors that cannot be replayed on a shard
are materialised whole (alone, or with the whole model when they read other tensors).

On Ray (one session for the module): a meta GPT on 4 workers, 2 stages with Megatron tensor
parallelism, where each worker must materialise exactly its stage's parameters, sharded ones
only in its shard, and 3 steps must equal single-process training from ``init_module_weights``
within 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import ray
import torch
from torch import nn

import hierarchical_ap as hap
from hierarchical_ap.errors import InitialisationError
from hierarchical_ap.models import from_spec, init_module_weights
from hierarchical_ap.models.materialize import (
    CHUNK_ELEMENTS,
    InitReport,
    Region,
    init_regions,
    key_seed,
)
from tests.runtime_cases import (
    ZOO,
    BlockMLP,
    build_case,
    compare,
    local_ray,
    megatron,
    plan_for,
    reference_run,
    sgd,
)

SEED = 7
STEPS = 3


def _meta_model(name: str) -> nn.Module:
    if name == "mlp":
        with torch.device("meta"):
            return BlockMLP()
    return from_spec(ZOO[name], batch=8, seq=8, device="meta").model


def _boxes(shape: torch.Size) -> list[Region]:
    """The whole tensor, halves along dim 0 and along the last dim, and quarters of a 2 x 2
    grid over both: the boxes DTensor's Shard placements give on 1-D and 2-D meshes."""
    boxes = [Region.whole(shape)]
    if not shape:
        return boxes
    halves = [(0, shape[0] // 2), (shape[0] // 2, shape[0] - shape[0] // 2)]
    for offset, size in halves:
        boxes.append(Region((offset, *(0 for _ in shape[1:])), (size, *shape[1:])))
    if len(shape) >= 2:
        last = shape[-1]
        columns = [(0, last // 2), (last // 2, last - last // 2)]
        for offset, size in columns:
            boxes.append(Region((*(0 for _ in shape[:-1]), offset), (*shape[:-1], size)))
        for ro, rs in halves:
            for co, cs in columns:
                boxes.append(Region((ro, *(0 for _ in shape[1:-1]), co), (rs, *shape[1:-1], cs)))
    return boxes


def _empty_boxes(model: nn.Module) -> dict[str, list[tuple[torch.Tensor, Region]]]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return {
        name: [(torch.empty(box.shape, dtype=t.dtype), box) for box in _boxes(t.shape)]
        for name, t in named
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gpt", "llama", "hf-gpt2", "hf-llama", "mlp"])
def test_every_shard_equals_the_whole_models_weights_sliced(name):
    whole = init_module_weights(_meta_model(name), SEED)
    reference = dict(whole.named_parameters()) | dict(whole.named_buffers())
    held = _empty_boxes(_meta_model(name))
    report = init_regions(_meta_model(name), SEED, held)
    assert not report.whole and not report.whole_model
    assert set(report.replayed) == set(held)
    for fqn, pairs in held.items():
        for local, box in pairs:
            assert torch.equal(local, reference[fqn][box.slices()]), (fqn, box)
    other_seed = init_module_weights(_meta_model(name), SEED + 1)
    assert not torch.equal(next(other_seed.parameters()), next(whole.parameters()))


class _Table(nn.Module):
    """A weight of 4 chunks (4096 rows of 64, 1024 rows a chunk) drawn by torch's
    ``trunc_normal_`` (a rejection sampler: not elementwise op by op) and scaled, and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4096, 64))
        self.bias = nn.Parameter(torch.empty(64))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, std=0.5, a=-1.0, b=1.0)
            self.weight.mul_(3.0)
            self.bias.normal_(1.0, 2.0)


def _meta_table() -> _Table:
    with torch.device("meta"):
        return _Table()


def test_values_follow_the_documented_key_and_shards_replay_them():
    model = init_module_weights(_meta_table(), SEED)
    rows = CHUNK_ELEMENTS // 64
    expected = torch.empty(4096, 64)
    for c in range(4096 // rows):
        generator = torch.Generator().manual_seed(key_seed(SEED, "weight", 0, c))
        chunk = expected[c * rows : (c + 1) * rows]
        nn.init.trunc_normal_(chunk, std=0.5, a=-1.0, b=1.0, generator=generator)
    expected.mul_(3.0)
    bias = torch.empty(64).normal_(1.0, 2.0, generator=_keyed(SEED, "bias"))
    assert torch.equal(model.weight.detach(), expected)
    assert torch.equal(model.bias.detach(), bias)
    boxes = [Region((1000, 0), (100, 64)), Region((0, 10), (4096, 20))]
    held = {"weight": [(torch.empty(box.shape), box) for box in boxes]}
    report = init_regions(_meta_table(), SEED, held)
    assert report.replayed == {"weight": 100 * 64 + 4096 * 20} and not report.whole
    for local, box in held["weight"]:
        assert torch.equal(local, expected[box.slices()])


def _keyed(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, name, 0, 0))


def test_a_dim0_shard_allocates_only_its_chunk_and_a_dim1_shard_one_chunk_at_a_time():
    def table() -> nn.Module:
        with torch.device("meta"):
            return nn.Embedding(4096, 64)  # reset_parameters: normal_

    full = init_module_weights(table(), SEED).weight.detach()
    chunk_bytes = CHUNK_ELEMENTS * 4
    rows = Region((1024, 0), (1024, 64))
    local = torch.empty(rows.shape)
    report = init_regions(table(), SEED, {"weight": [(local, rows)]})
    assert torch.equal(local, full[rows.slices()])
    assert (report.largest_allocation_bytes, report.allocated_bytes) == (chunk_bytes, chunk_bytes)
    columns = Region((0, 32), (4096, 32))
    local = torch.empty(columns.shape)
    report = init_regions(table(), SEED, {"weight": [(local, columns)]})
    assert torch.equal(local, full[columns.slices()])
    assert report.largest_allocation_bytes == chunk_bytes
    assert report.allocated_bytes == 4096 * 64 * 4
    assert report.held_bytes == 4096 * 32 * 4


def test_a_tensor_written_through_a_view_is_materialised_whole_and_alone():
    def build() -> nn.Module:
        with torch.device("meta"):
            return nn.ModuleDict(
                {"embed": nn.Embedding(16, 8, padding_idx=0), "proj": nn.Linear(8, 8)}
            )

    reference = init_module_weights(build(), SEED)
    assert torch.equal(reference["embed"].weight[0], torch.zeros(8))
    top = Region((0, 0), (8, 8))
    held = {
        "embed.weight": [(torch.empty(8, 8), top)],
        "proj.weight": [(torch.empty(8, 4), Region((0, 4), (8, 4)))],
    }
    report = init_regions(build(), SEED, held)
    assert report.whole == {"embed.weight": 16 * 8} and not report.whole_model
    assert set(report.replayed) == {"proj.weight"}
    assert torch.equal(held["embed.weight"][0][0], reference["embed"].weight[:8])
    assert torch.equal(held["proj.weight"][0][0], reference["proj"].weight[:, 4:])


class _Rotation(nn.Module):
    """``orthogonal_`` skips meta tensors and is not elementwise (a QR of the whole matrix)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(6, 6))

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.w)


def test_an_initialisation_that_skips_meta_tensors_is_seen_and_run_whole():
    def build() -> nn.Module:
        with torch.device("meta"):
            return nn.ModuleDict({"rotation": _Rotation(), "proj": nn.Linear(6, 6)})

    reference = init_module_weights(build(), SEED)["rotation"].w.detach()
    assert torch.allclose(reference @ reference.T, torch.eye(6), atol=1e-5)
    box = Region((3, 0), (3, 6))
    local = torch.empty(box.shape)
    report = init_regions(build(), SEED, {"rotation.w": [(local, box)]})
    assert report.whole == {"rotation.w": 36} and not report.whole_model
    assert torch.equal(local, reference[box.slices()])


class _Derived(nn.Module):
    """``b`` is computed from ``a``: a worker holding only ``b`` needs ``a`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(4, 4))
        self.b = nn.Parameter(torch.empty(4, 4))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.a.normal_()
            self.b.copy_(self.a * 2)


class _ValueDependent(nn.Module):
    """An initialisation that reads a value, which it cannot on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 4))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w.normal_()
            if float(self.w.abs().max()) > 1.0:
                self.w.div_(float(self.w.abs().max()))


@pytest.mark.parametrize("module", [_Derived, _ValueDependent])
def test_an_initialisation_needing_unheld_values_materialises_the_whole_model(module):
    with torch.device("meta"):
        model = module()
    reference = init_module_weights(module().to("meta"), SEED)
    name = "b" if module is _Derived else "w"
    box = Region((2, 0), (2, 4))
    local = torch.empty(box.shape)
    report = init_regions(model, SEED, {name: [(local, box)]})
    assert report.whole_model
    assert torch.equal(local, getattr(reference, name).detach()[box.slices()])


class _Unwritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(3))
        self.register_buffer("table", torch.empty(3))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w.zero_()


def test_tensors_the_initialisation_cannot_give_values_are_refused():
    with torch.device("meta"):
        model = _Unwritten()
    box = Region.whole((3,))
    with pytest.raises(InitialisationError, match=r"\['table'\].*not written"):
        init_regions(model, SEED, {"table": [(torch.empty(3), box)]})
    with pytest.raises(InitialisationError, match="neither a parameter nor a buffer"):
        init_regions(model, SEED, {"missing": [(torch.empty(3), box)]})


# ------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    with local_ray(4):
        yield


def _expected_shard_elements(plan, rank: int, shapes: dict[str, torch.Size]) -> dict[str, int]:
    """FQN → elements of the shard worker ``rank`` holds: its stage's parameters, each split
    by the sizes of the mesh axes its plan placement shards it along."""
    stage = next(s for s in plan.stages if rank in s.devices)
    return {
        fqn: math.prod(shapes[fqn])
        // math.prod(n for n, p in zip(stage.logical_mesh, placements, strict=True) if p != "R")
        for fqn, placements in stage.param_placements.items()
    }


@pytest.mark.timeout(300)
def test_meta_gpt_workers_initialise_only_their_stage_shards_and_train_like_one_process(
    ray_session,
):
    plan = megatron(plan_for("gpt", 4, tp=2, pp=2, dp=1, micro_batch_size=2))
    assert [s.logical_mesh for s in plan.stages] == [(1, 2), (1, 2)]
    case = build_case("gpt", STEPS, meta=True)
    inputs, targets = case.batches[0]
    with hap.compile_parallel(
        case.model,
        hap.Cluster.local_cpu(4),
        example_inputs=inputs,
        targets=targets,
        loss_fn=case.loss_fn,
        optimizer_fn=sgd,
        plan=plan,
    ) as exe:
        reports: list[InitReport] = ray.get(
            [w.initialisation_report.remote() for w in exe.workers], timeout=60
        )
        losses = [exe.train_step(x, y) for x, y in case.batches]
        state = exe.state_dict()
    assert compare(losses, state, reference_run(build_case("gpt", STEPS, meta=True), sgd)) == {}

    model = build_case("gpt", 1, meta=True).model
    shapes = {name: p.shape for name, p in model.named_parameters()}
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    for rank, report in enumerate(reports):
        expected = _expected_shard_elements(plan, rank, shapes)
        assert report.replayed == expected, rank
        assert not report.whole and not report.whole_model
        assert report.held_bytes == 4 * sum(expected.values()) < model_bytes / 2
        largest = max(4 * math.prod(shapes[fqn]) for fqn in expected)
        assert report.largest_allocation_bytes <= min(largest, 4 * CHUNK_ELEMENTS)
