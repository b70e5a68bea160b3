"""Planning layers: repeated blocks of zoo models, and Alpa's clustering DP against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from hierarchical_ap.graph import OpGraph, capture
from hierarchical_ap.models import from_spec
from stage_partitioner import layers as layers_module
from stage_partitioner.layers import (
    PlanningLayer,
    cluster_operators,
    cut_bytes_table,
    dataflow_graph,
    group_sizes,
    planning_layers,
)
from tests.reference_models import MLP, SmallCNN, class_loss


def capture_classifier(model: nn.Module, inputs: torch.Tensor, classes: int = 10) -> OpGraph:
    targets = torch.randint(0, classes, (inputs.shape[0],))
    return capture(model, (inputs,), loss_fn=class_loss, targets=targets)


@pytest.fixture(scope="module")
def gpt() -> OpGraph:
    bundle = from_spec("gpt-tiny:layers=8", batch=2)
    return capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )


@pytest.fixture(scope="module")
def mlp() -> OpGraph:
    torch.manual_seed(0)
    return capture_classifier(MLP(width=32, depth=3), torch.randn(4, 32))


def assert_covers(graph: OpGraph, planned: list[PlanningLayer]) -> None:
    """Every node once, in graph order, and each layer's nodes are its parts' nodes."""
    assert [n for layer in planned for n in layer.nodes] == list(graph.nodes)
    assert [layer.index for layer in planned] == list(range(len(planned)))
    assert len({layer.name for layer in planned}) == len(planned)
    assert sum(layer.train_flops for layer in planned) == graph.train_flops


def heavy_ops(graph: OpGraph, layer: PlanningLayer) -> list[str]:
    return [n for n in layer.nodes if graph.nodes[n].profile.forward_flops > 0]


# ---------------------------------------------------------------------------- repeated blocks


def test_blocks_one_per_layer_with_embed_first_and_head_last(gpt):
    planned = planning_layers(gpt)
    assert_covers(gpt, planned)
    assert len(planned) == 8
    first, *middle, last = planned
    assert first.name == "embed+pos_embed+blocks.0"
    assert first.module_layers == ("embed", "pos_embed", "blocks.0")
    assert last.name == "blocks.7+norm+head"
    assert last.module_layers == ("blocks.7", "norm", "head")
    block_kind = gpt.layer("blocks.1").structural_hash
    assert all(layer.kind == (block_kind,) for layer in middle)
    assert [layer.name for layer in middle] == [f"blocks.{i}" for i in range(1, 7)]
    assert first.kind[-1] == block_kind and last.kind[0] == block_kind
    assert first.kind != middle[0].kind != last.kind
    block_params = gpt.layer("blocks.3").params
    assert planned[3].param_bytes == sum(gpt.param_shapes[p].nbytes for p in block_params)


def test_split_embedding_becomes_one_part(gpt):
    """GPT's token embedding interleaves with the position embedding: one part, unique kind."""
    first = planning_layers(gpt)[0]
    assert len(first.parts) == 2
    embed, block = first.parts
    assert embed.kind.startswith("ops:")
    assert set(embed.nodes) == set(gpt.layer("embed").nodes) | set(gpt.layer("pos_embed").nodes)
    assert block.nodes == tuple(gpt.layer("blocks.0").nodes)


def test_blocks_grouped_to_fit_max_layers(gpt):
    planned = planning_layers(gpt, max_layers=4)
    assert_covers(gpt, planned)
    assert len(planned) == 4
    for layer in planned:
        assert sum(m.startswith("blocks.") for m in layer.module_layers) == 2
    assert [layer.name for layer in planned[1:3]] == ["blocks.2-3", "blocks.4-5"]
    assert planned[1].kind == planned[2].kind
    assert planned[0].name == "embed+pos_embed+blocks.0-1"
    assert planned[-1].name == "blocks.6-7+norm+head"


def test_num_layers_must_divide_the_blocks(gpt):
    assert len(planning_layers(gpt, num_layers=2)) == 2
    with pytest.raises(ValueError, match="valid values are 1, 2, 4, 8"):
        planning_layers(gpt, num_layers=3)


@pytest.mark.parametrize(
    ("blocks", "max_layers", "sizes"),
    [
        (96, 32, [3] * 32),
        (128, 32, [4] * 32),
        (105, 32, [5] * 21),
        (8, 32, [1] * 8),
        (8, 3, [4, 4]),
        (37, 32, [2] * 18 + [1]),  # prime: groups of ⌈37/32⌉, the last shorter
        (106, 32, [4] * 26 + [2]),  # 2 · 53: equal groups would leave 2 layers
    ],
)
def test_group_sizes(blocks, max_layers, sizes):
    assert group_sizes(blocks, max_layers) == sizes


class StragglerNet(nn.Module):
    """Identical blocks, but a node of block 0 runs after the last block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.blocks[0](x)
        y = first
        for block in self.blocks[1:]:
            y = block(y)
        return self.head(first + y)  # module-less: joins block 0, the producer of `first`


def test_block_split_by_a_straggler_is_no_block():
    graph = capture_classifier(StragglerNet(), torch.randn(4, 16))
    planned = planning_layers(graph)
    assert_covers(graph, planned)
    assert [layer.name for layer in planned] == [
        "blocks.0-1",
        "blocks.2",
        "blocks.3+blocks.0+head",
    ]
    assert planned[0].parts[0].kind.startswith("ops:")
    assert planned[1].kind == (graph.layer("blocks.2").structural_hash,)


# ------------------------------------------------------------------------ clustering DP


def feasible(flops, heavy, bounds, eps) -> bool:
    """The constraints, written out: FLOP bound unless a single heavy op, heavy op if enough."""
    num_layers = len(bounds) - 1
    limit = (1 + eps) * sum(flops) / num_layers
    need = 1 if sum(heavy) >= num_layers else 0
    for start, stop in itertools.pairwise(bounds):
        count = sum(heavy[start:stop])
        if count < need or (sum(flops[start:stop]) > limit and count > 1):
            return False
    return True


def brute_force(flops, cut, heavy, num_layers, eps) -> tuple[float, float] | None:
    """Least (largest cut, sum of squared FLOP shares) over every feasible clustering."""
    size, total = len(flops), sum(flops)
    best = None
    for cuts in itertools.combinations(range(1, size), num_layers - 1):
        bounds = [0, *cuts, size]
        if not feasible(flops, heavy, bounds, eps):
            continue
        spans = list(itertools.pairwise(bounds))
        largest = max(cut[a, b - 1] for a, b in spans)
        squares = sum((sum(flops[a:b]) / total) ** 2 for a, b in spans) if total else 0.0
        if best is None or (largest, squares) < best:
            best = (largest, squares)
    return best


def test_clustering_matches_brute_force():
    rng = np.random.default_rng(7)
    checked = infeasible = 0
    for _ in range(400):
        size = int(rng.integers(1, 10))
        num_layers = int(rng.integers(1, min(4, size) + 1))
        eps = float(rng.choice([0.0, 0.25, 0.5]))
        flops = [int(f) for f in rng.integers(1, 20, size) * (rng.random(size) < 0.6)]
        heavy = [int(f > 0) for f in flops]
        cut = np.triu(rng.integers(0, 50, (size, size))).astype(float)
        expected = brute_force(flops, cut, heavy, num_layers, eps)
        if expected is None:
            with pytest.raises(ValueError, match="no clustering"):
                cluster_operators(np.array(flops), cut, num_layers, eps=eps)
            infeasible += 1
            continue
        ranges = cluster_operators(np.array(flops), cut, num_layers, eps=eps)
        bounds = [0] + [stop for _, stop in ranges]
        assert [start for start, _ in ranges] == bounds[:-1] and bounds[-1] == size
        assert all(stop > start for start, stop in ranges)
        assert feasible(flops, heavy, bounds, eps)
        total = sum(flops)
        largest = max(cut[a, b - 1] for a, b in ranges)
        squares = sum((sum(flops[a:b]) / total) ** 2 for a, b in ranges) if total else 0.0
        assert largest == expected[0]
        assert squares == pytest.approx(expected[1], abs=1e-12)
        checked += 1
    assert checked > 100 and infeasible > 10


def test_cut_bytes_table_matches_its_definition(mlp):
    order = list(mlp.nodes)
    table = cut_bytes_table(dataflow_graph(mlp), {n: i for i, n in enumerate(order)}, len(order))
    for i, k in itertools.combinations_with_replacement(range(len(order)), 2):
        received = {v for n in order[i : k + 1] for v in mlp.nodes[n].inputs if v in order[:i]}
        assert table[i, k] == sum(mlp.value_bytes(v) for v in received)


@pytest.mark.parametrize("num_layers", [2, 3])
def test_mlp_clustered_balanced_with_a_heavy_op_each(mlp, num_layers):
    eps = 0.5
    planned = planning_layers(mlp, num_layers=num_layers, eps=eps)
    assert_covers(mlp, planned)
    assert len(planned) == num_layers
    bound = (1 + eps) * mlp.train_flops / num_layers
    for layer in planned:
        assert heavy_ops(mlp, layer)
        assert layer.train_flops <= bound
        assert layer.module_layers == () and len(layer.parts) == 1
    assert len({layer.kind for layer in planned}) == num_layers


def test_mlp_default_takes_one_layer_per_linear(mlp):
    """Equal widths: every cut sends the same bytes, so Alpa's search takes the most layers."""
    planned = planning_layers(mlp)
    assert [len(heavy_ops(mlp, layer)) for layer in planned] == [1, 1, 1, 1]
    assert planned[0].name == "ops 0"


def test_dominant_operator_is_its_own_layer():
    """SmallCNN's second conv outweighs 1.5 × the mean of 2 layers: 2 are infeasible, 3 not."""
    torch.manual_seed(0)
    graph = capture_classifier(SmallCNN(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no clustering"):
        planning_layers(graph, num_layers=2)
    planned = planning_layers(graph)
    assert_covers(graph, planned)
    assert [len(heavy_ops(graph, layer)) for layer in planned] == [1, 1, 1]


def test_cut_falls_at_the_bottleneck():
    torch.manual_seed(0)
    widths = [32, 256, 256, 4, 256, 256]
    modules: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        modules += [nn.Linear(a, b), nn.ReLU()] if b != 4 else [nn.Linear(a, b)]
    model = nn.Sequential(*modules, nn.Linear(256, 10))
    graph = capture_classifier(model, torch.randn(8, 32))
    first, second = planning_layers(graph, num_layers=2)
    last = graph.nodes[first.nodes[-1]]
    assert last.target == "aten.linear.default" and last.outputs[0].shape == (8, 4)
    assert heavy_ops(graph, first) and heavy_ops(graph, second)


@pytest.mark.parametrize("max_operators", [4, 2])
def test_large_graphs_cluster_units_from_heavy_nodes(mlp, monkeypatch, max_operators):
    """Past MAX_OPERATORS the DP runs on units starting at heavy nodes (merged if too many)."""
    monkeypatch.setattr(layers_module, "MAX_OPERATORS", max_operators)
    planned = planning_layers(mlp, num_layers=2)
    assert_covers(mlp, planned)
    assert all(heavy_ops(mlp, layer)[0] == layer.nodes[0] for layer in planned)


def test_invalid_arguments(mlp):
    with pytest.raises(ValueError, match="max_layers"):
        planning_layers(mlp, max_layers=0)
    with pytest.raises(ValueError, match="num_layers must be in 1..3"):
        cluster_operators(np.ones(3), np.zeros((3, 3)), 4)
