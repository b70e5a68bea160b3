"""Per-op sharding strategies (``intra_op.strategies``): coverage, validity, the expected
strategies per op family, and — without torch.distributed — that the placements mean what
they say: one mesh axis of size 2 is simulated by splitting real tensors by hand."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.graph import OpGraph, OpNode, capture
from hierarchical_ap.models import from_spec
from intra_op.placement import (
    PARTIAL,
    REPLICATE,
    Partial,
    Placement,
    Placements,
    Shard,
    is_valid,
)
from intra_op.resharding import gradient_placements
from intra_op.rules.common import has_grad
from intra_op.strategies import STRATEGY_RULES, node_strategies
from intra_op.strategy import OpStrategy, RuleResult, StrategyContext
from tests.reference_models import MLP, SmallCNN, class_loss

R, P = REPLICATE, PARTIAL


class Misc(nn.Module):
    """Ops the model zoo does not use: addmm, matmul, bmm, softmax, reductions, lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.table = nn.Parameter(torch.randn(10, 8))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.b, x.flatten(0, 1), self.w).view(4, 6, 8)
        s = torch.softmax(y, dim=-1)
        c = torch.bmm(torch.matmul(s, s.transpose(1, 2)), y)
        e = torch.index_select(self.table, 0, idx.flatten()).view(4, 6, 8)
        g = torch.gather(c, 2, idx.unsqueeze(-1) % 8)
        return (c + e).sum(dim=-1).mean() + g.float().mean() + torch.log_softmax(c, 1).amax()


def _zoo(spec: str) -> OpGraph:
    bundle = from_spec(spec, batch=4)
    return capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )


@pytest.fixture(scope="module")
def graphs() -> dict[str, OpGraph]:
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (8,))
    return {
        "gpt": _zoo("gpt-tiny"),
        "llama": _zoo("llama-tiny"),
        "mlp": capture(MLP(), (torch.randn(8, 32),), loss_fn=class_loss, targets=labels),
        "cnn": capture(SmallCNN(), (torch.randn(8, 3, 8, 8),), loss_fn=class_loss, targets=labels),
        "misc": capture(Misc(), (torch.randn(4, 6, 16), torch.randint(0, 10, (4, 6)))),
        "batch_stats": capture(
            nn.BatchNorm2d(4, track_running_stats=False), (torch.randn(4, 4, 3, 3),)
        ),
    }


def _context(graph: OpGraph, shape: tuple[int, int]) -> StrategyContext:
    cluster = Cluster.from_spec(f"{shape[0]}x{shape[1]}xA100-80GB")
    return StrategyContext(graph, cluster.logical_mesh(shape), CostModel.for_cluster(cluster))


def _candidates(shape: Sequence[int], mesh_shape: Sequence[int], partial: bool) -> list[Placements]:
    """Every valid placement of a value: Replicate or a Shard per axis (Partial too, if asked);
    axes of size 1 only replicate."""
    per_axis = [
        [R, *([P] if partial else []), *(Shard(d) for d in range(len(shape)))] if n > 1 else [R]
        for n in mesh_shape
    ]
    return [c for c in itertools.product(*per_axis) if is_valid(shape, c, mesh_shape)]


def _all_strategies(graph: OpGraph, ctx: StrategyContext) -> dict[str, tuple[RuleResult, list]]:
    """Every node's rule result, with graph inputs / parameters offering every candidate."""
    outputs: dict[str, list[Placements]] = {}
    results = {}
    for node in graph.nodes.values():
        producers = [
            outputs.get(v) or _candidates(graph.value_meta(v).shape, ctx.mesh_shape, False)
            for v in node.inputs
        ]
        result = node_strategies(ctx, node, producers)
        outputs[node.name] = [s.output for s in result.strategies]
        results[node.name] = (result, producers)
    return results


def _node(graph: OpGraph, target: str, index: int = 0) -> OpNode:
    return [n for n in graph.nodes.values() if n.target == target][index]


def _strategies(
    graph: OpGraph, shape: tuple[int, int], target: str, index: int = 0
) -> tuple[OpStrategy, ...]:
    ctx = _context(graph, shape)
    return _all_strategies(graph, ctx)[_node(graph, target, index).name][0].strategies


def _find(strategies: Sequence[OpStrategy], output: Placements, *inputs: Placements) -> OpStrategy:
    for s in strategies:
        if s.output == output and s.inputs[: len(inputs)] == inputs:
            return s
    raise AssertionError(f"no strategy {output} = {inputs} among {[s.name for s in strategies]}")


# ------------------------------------------------------------------------------ coverage, shape


def test_every_captured_op_has_a_rule(graphs) -> None:
    targets = {n.target for g in graphs.values() for n in g.nodes.values()}
    assert targets - set(STRATEGY_RULES) == set()


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 2)])
def test_strategies_are_valid_and_followers_follow(graphs, mesh_shape) -> None:
    for graph in graphs.values():
        ctx = _context(graph, mesh_shape)
        for name, (result, producers) in _all_strategies(graph, ctx).items():
            node = graph.nodes[name]
            assert result.strategies, name
            for s in result.strategies:
                assert len(s.inputs) == len(s.input_grads) == len(node.inputs), name
                assert all(is_valid(m.shape, s.output, mesh_shape) for m in node.outputs), s.name
                for value, placements, grad in zip(
                    node.inputs, s.inputs, s.input_grads, strict=True
                ):
                    assert is_valid(graph.value_meta(value).shape, placements, mesh_shape)
                    assert grad is None or has_grad(graph, value), (name, s.name)
                if mesh_shape[0] == 1:  # a size-1 axis only replicates
                    assert s.output[0] == R and all(p[0] == R for p in s.inputs), s.name
            k = result.follows_input
            if k is None:
                keys = [(s.output, s.inputs) for s in result.strategies]
                assert len(keys) == len(set(keys)), name
                continue
            assert len(result.strategies) == len(producers[k]), name
            for s, produced in zip(result.strategies, producers[k], strict=True):
                assert all(a in (p, R) for a, p in zip(s.inputs[k], produced, strict=True)), name


# ------------------------------------------------------------------------------ matmul family


def test_linear_offers_column_row_and_data_parallel(graphs) -> None:
    strategies = _strategies(graphs["gpt"], (1, 4), "aten.linear.default")  # x (4, 64, 64)
    column = _find(strategies, (R, Shard(2)), (R, R), (R, Shard(0)), (R, Shard(0)))
    assert column.input_grads == ((R, P), (R, Shard(0)), (R, Shard(0)))
    row = _find(strategies, (R, P), (R, Shard(2)), (R, Shard(1)), (R, P))
    assert row.input_grads == ((R, Shard(2)), (R, Shard(1)), (R, R))
    data = _find(strategies, (R, Shard(0)), (R, Shard(0)), (R, R), (R, R))
    assert data.input_grads == ((R, Shard(0)), (R, P), (R, P))
    replicated = _find(strategies, (R, R), (R, R), (R, R), (R, R))
    assert [column.work_split, row.work_split, data.work_split, replicated.work_split] == [
        4,
        4,
        4,
        1,
    ]
    assert replicated.compute_time_s == pytest.approx(4 * data.compute_time_s)


def test_linear_on_a_2d_mesh_combines_roles(graphs) -> None:
    strategies = _strategies(graphs["gpt"], (2, 2), "aten.linear.default")
    dp_tp = _find(strategies, (Shard(0), Shard(2)), (Shard(0), R), (R, Shard(0)))
    assert dp_tp.work_split == 4
    assert dp_tp.input_grads[1] == (P, Shard(0))
    _find(strategies, (Shard(0), Shard(0)), (Shard(0), Shard(0)), (R, R))
    # The sequence dim may not shard both axes (DTensor cannot unflatten it again).
    assert not [s for s in strategies if s.output == (Shard(1), Shard(1))]


def test_addmm_matmul_bmm_are_einsums(graphs) -> None:
    misc = graphs["misc"]
    addmm = _strategies(misc, (1, 2), "aten.addmm.default")  # b[8] + x[24, 16] @ W[16, 8]
    row = _find(addmm, (R, P), (R, P), (R, Shard(1)), (R, Shard(0)))
    assert row.input_grads[0] == (R, R)
    _find(addmm, (R, Shard(1)), (R, Shard(0)), (R, R), (R, Shard(1)))
    matmul = _strategies(misc, (1, 2), "aten.matmul.default")  # [4, 6, 8] @ [4, 8, 6]
    _find(matmul, (R, Shard(0)), (R, Shard(0)), (R, Shard(0)))
    _find(matmul, (R, P), (R, Shard(2)), (R, Shard(1)))
    bmm = _strategies(misc, (1, 2), "aten.bmm.default")
    _find(bmm, (R, Shard(2)), (R, R), (R, Shard(2)))


# ------------------------------------------------------------------------------ attention, views


def test_attention_shards_batch_or_heads(graphs) -> None:
    strategies = _strategies(graphs["gpt"], (1, 4), "aten.scaled_dot_product_attention.default")
    heads = _find(strategies, (R, Shard(1)), *[(R, Shard(1))] * 3)
    assert heads.input_grads == ((R, Shard(1)),) * 3 and heads.work_split == 4
    _find(strategies, (R, Shard(0)), *[(R, Shard(0))] * 3)
    assert len(strategies) == 3  # never the sequence dims


def test_grouped_query_attention_shards_heads_only_when_kv_heads_divide(graphs) -> None:
    target = "aten.scaled_dot_product_attention.default"  # 4 query heads, 2 kv heads
    on_four = _strategies(graphs["llama"], (1, 4), target)
    assert {s.output for s in on_four} == {(R, R), (R, Shard(0))}
    on_two = _strategies(graphs["llama"], (2, 2), target)
    _find(on_two, (Shard(0), Shard(1)), *[(Shard(0), Shard(1))] * 3)
    assert not [s for s in on_two if s.output == (Shard(1), Shard(1))]


def test_view_after_column_parallel_projection_shards_heads(graphs) -> None:
    llama = graphs["llama"]
    ctx = _context(llama, (1, 4))
    results = _all_strategies(llama, ctx)
    q_proj = next(n for n in llama.nodes.values() if n.target == "aten.linear.default")
    view = llama.nodes[llama.consumers(q_proj.name)[0]]  # (b, s, h) -> (b, s, a, d)
    assert view.target == "aten.view.default"
    view_result, producers = results[view.name]
    i = producers[0].index((R, Shard(2)))
    assert view_result.strategies[i].output == (R, Shard(2))
    transpose = llama.nodes[llama.consumers(view.name)[0]]
    assert results[transpose.name][0].strategies[i].output == (R, Shard(1))


def test_head_major_fused_qkv_carries_column_parallel_to_heads(graphs) -> None:
    gpt = graphs["gpt"]  # qkv (b, s, 3h) -> view (b, s, a, 3d) -> split(d, -1) -> transpose
    ctx = _context(gpt, (1, 4))
    results = _all_strategies(gpt, ctx)
    view = _node(gpt, "aten.view.default")
    result, producers = results[view.name]
    i = producers[0].index((R, Shard(2)))
    assert result.strategies[i].output == (R, Shard(2))
    split = results[_node(gpt, "aten.split.Tensor").name][0]
    assert split.strategies[i].output == (R, Shard(2))
    getitem = _node(gpt, "<built-in function getitem>")
    assert results[getitem.name][0].strategies[i].output == (R, Shard(2))
    transpose = results[gpt.consumers(getitem.name)[0]][0]
    assert transpose.strategies[i].output == (R, Shard(1))
    # The split dim itself cannot stay sharded: it is gathered first.
    split_dim = _follow_one(gpt, "aten.split.Tensor", (R, Shard(3)), shape=(1, 4))
    assert split_dim.inputs == ((R, R),) and split_dim.output == (R, R)


# ------------------------------------------------------------------------------ followers


def _follow_one(
    graph: OpGraph, target: str, produced: Placements, index: int = 0, shape=(1, 2)
) -> OpStrategy:
    """The strategy of a follower when its followed input comes in ``produced``; the other
    inputs offer every candidate."""
    ctx = _context(graph, shape)
    node = _node(graph, target, index)
    producers = [[produced] for _ in node.inputs]
    result = node_strategies(ctx, node, producers)
    assert result.follows_input is not None and len(result.strategies) == 1
    return result.strategies[0]


def test_partial_passes_only_through_linear_elementwise_ops(graphs) -> None:
    gpt, llama = graphs["gpt"], graphs["llama"]
    add = _follow_one(gpt, "aten.add.Tensor", (R, P))  # embedding + position embedding
    assert add.output == (R, P) and add.inputs == ((R, P), (R, P))
    assert add.input_grads == ((R, R), (R, R))
    gelu = _follow_one(gpt, "aten.gelu.default", (R, P))
    assert gelu.inputs == ((R, R),) and gelu.output == (R, R)
    neg = _follow_one(llama, "aten.neg.default", (R, P))
    assert neg.output == (R, P)
    # silu(gate) * up: the product is linear in one Partial operand, the other replicated,
    # and the replicated operand's gradient g·Σxᵢ is Partial.
    muls = [n for n in llama.nodes.values() if n.target == "aten.mul.Tensor"]
    gated = next(i for i, n in enumerate(muls) if "silu" in n.inputs[0])
    mul = _follow_one(llama, "aten.mul.Tensor", (R, P), index=gated)
    assert mul.output == (R, P) and mul.inputs[1] == (R, R)
    assert mul.input_grads == ((R, R), (R, P))


def test_broadcast_operand_takes_the_output_placement(graphs) -> None:
    llama = graphs["llama"]
    mul = _follow_one(llama, "aten.mul.Tensor", (R, Shard(1)), index=1)  # q * cos[s, d]
    assert mul.output == (R, Shard(1))
    assert mul.inputs == ((R, Shard(1)), (R, R))
    mul = _follow_one(llama, "aten.mul.Tensor", (R, Shard(2)), index=1)
    assert mul.inputs == ((R, Shard(2)), (R, Shard(0)))


def test_layer_norms_keep_the_normalised_dims_whole(graphs) -> None:
    for graph, target in (
        (graphs["gpt"], "aten.layer_norm.default"),
        (graphs["llama"], "aten.rms_norm.default"),
    ):
        batch = _follow_one(graph, target, (R, Shard(0)))
        assert batch.output == (R, Shard(0))
        assert all(p == (R, R) for p in batch.inputs[1:])
        assert all(g == (R, P) for g in batch.input_grads[1:])
        hidden = _follow_one(graph, target, (R, Shard(2)))
        assert hidden.inputs[0] == (R, R) and hidden.output == (R, R)
        assert _follow_one(graph, target, (R, P)).output == (R, R)


def test_batch_norm_shards_channels_only(graphs) -> None:
    stateless = graphs["batch_stats"]  # no running statistics
    channel = _follow_one(stateless, "aten.batch_norm.default", (R, Shard(1)))
    assert channel.output == (R, Shard(1))
    assert channel.inputs[1:] == ((R, Shard(0)),) * 2
    assert channel.input_grads[1:] == ((R, Shard(0)),) * 2
    batch = _follow_one(stateless, "aten.batch_norm.default", (R, Shard(0)))
    assert batch.inputs[0] == (R, R) and batch.output == (R, R)
    # Training with running statistics updates them in place: replicated only.
    tracked = _follow_one(graphs["cnn"], "aten.batch_norm.default", (R, Shard(1)))
    assert tracked.inputs == ((R, R),) * 5 and tracked.output == (R, R)


def test_reductions_turn_a_reduced_shard_into_partial(graphs) -> None:
    misc = graphs["misc"]
    total = _follow_one(misc, "aten.sum.dim_IntList", (R, Shard(2)))  # sum over dim -1
    assert total.output == (R, Partial("sum"))
    assert _follow_one(misc, "aten.sum.dim_IntList", (R, Shard(1))).output == (R, Shard(1))
    mean = _follow_one(misc, "aten.mean.default", (R, Shard(0)))
    assert mean.output == (R, Partial("avg"))
    assert _follow_one(misc, "aten.mean.default", (R, P)).output == (R, P)
    assert _follow_one(misc, "aten.amax.default", (R, P)).output == (R, R)
    softmax = _follow_one(misc, "aten.softmax.int", (R, Shard(2)))
    assert softmax.inputs[0] == (R, R)


def test_assert_metadata_and_factories_cost_nothing(graphs) -> None:
    gpt = graphs["gpt"]
    check = _follow_one(gpt, "aten._assert_tensor_metadata.default", (R, Shard(0)))
    assert check.inputs == ((R, Shard(0)),) and check.input_grads == (None,)
    assert check.compute_time_s == 0.0
    arange = _strategies(gpt, (1, 4), "aten.arange.default")
    assert [(s.output, s.inputs) for s in arange] == [((R, R), ())]


# ------------------------------------------------------------------------------ lookups, losses


def test_embedding_strategies(graphs) -> None:
    strategies = _strategies(graphs["gpt"], (1, 4), "aten.embedding.default")  # W[512, 64]
    vocab = _find(strategies, (R, P), (R, Shard(0)), (R, R))
    assert vocab.input_grads == ((R, R), None)
    assert vocab.work_split == 1 and vocab.comm_time_s == 0.0
    batch = _find(strategies, (R, Shard(0)), (R, R), (R, Shard(0)))
    assert batch.input_grads == ((R, P), None)
    hidden = _find(strategies, (R, Shard(2)), (R, Shard(1)), (R, R))
    assert hidden.input_grads == ((R, Shard(1)), None)


def test_cross_entropy_strategies(graphs) -> None:
    target = "aten.cross_entropy_loss.default"  # logits [256, 512], mean reduction
    on_four = _strategies(graphs["gpt"], (1, 4), target)
    batch = _find(on_four, (R, Partial("avg")), (R, Shard(0)), (R, Shard(0)))
    assert batch.input_grads == ((R, Shard(0)), None)
    classes = _find(on_four, (R, R), (R, Shard(1)), (R, R))
    assert classes.comm_time_s > 0 and classes.input_grads == ((R, Shard(1)), None)
    # loss_parallel's mean needs a 1-D mesh: no class sharding on a 2x2 mesh.
    on_2d = _strategies(graphs["gpt"], (2, 2), target)
    assert not [s for s in on_2d if Shard(1) in s.inputs[0]]
    _find(on_2d, (Partial("avg"), Partial("avg")), (Shard(0), Shard(0)), (Shard(0), Shard(0)))


def test_convolution_is_data_parallel(graphs) -> None:
    strategies = _strategies(graphs["cnn"], (2, 2), "aten.conv2d.default")
    assert {s.output for s in strategies} == {(R, R), (Shard(0), R), (R, Shard(0))}
    batch = _find(strategies, (R, Shard(0)), (R, Shard(0)), (R, R), (R, R))
    assert batch.input_grads == (None, (R, P), (R, P))


def test_op_without_rule_runs_replicated_and_warns_once(graphs, caplog) -> None:
    mlp = graphs["mlp"]
    ctx = _context(mlp, (2, 2))
    node = dataclasses.replace(_node(mlp, "aten.relu.default"), target="aten.frobnicate.default")
    producers = [[(Shard(0), R)]]
    with caplog.at_level(logging.WARNING, logger="intra_op.strategies"):
        first = node_strategies(ctx, node, producers)
        node_strategies(ctx, node, producers)
    assert [r.message.count("aten.frobnicate.default") for r in caplog.records] == [1]
    (strategy,) = first.strategies
    assert first.follows_input is None
    assert strategy.output == (R, R) and strategy.inputs == ((R, R),)
    assert strategy.input_grads == ((R, R),) and strategy.work_split == 1


def test_rule_failing_on_unexpected_arguments_falls_back_to_replicated(graphs, caplog) -> None:
    mlp = graphs["mlp"]
    ctx = _context(mlp, (2, 2))
    relu = _node(mlp, "aten.relu.default")  # one input: the linear rule expects a weight too
    node = dataclasses.replace(relu, target="aten.linear.default")
    with caplog.at_level(logging.WARNING, logger="intra_op.strategies"):
        result = node_strategies(ctx, node, [[(Shard(0), R)]])
    assert [s.output for s in result.strategies] == [(R, R)]
    assert "failed" in caplog.records[0].message


# ------------------------------------------------------------------------------ semantics
# One mesh axis of size 2, simulated by splitting real tensors: Shard(d) = contiguous chunks
# along d, Replicate = copies, Partial = summands (DTensor turns Replicate into Partial by
# dividing by the axis size). Running the aten op on each device's pieces and combining the
# results by the strategy's output placement must give the op's result on the whole tensors;
# the same holds backwards for the input gradients and their ``input_grads`` placements.

AXIS, N = 1, 2


def _split(t: torch.Tensor, p: Placement) -> list[torch.Tensor]:
    if isinstance(p, Shard):
        return list(t.chunk(N, p.dim))
    if isinstance(p, Partial):
        return [t / N if p.reduce_op == "sum" else t] * N
    return [t] * N


def _combine(pieces: Sequence[torch.Tensor], p: Placement) -> torch.Tensor:
    if isinstance(p, Shard):
        return torch.cat(list(pieces), p.dim)
    if isinstance(p, Partial):
        total = sum(pieces[1:], pieces[0])
        return total / N if p.reduce_op == "avg" else total
    for piece in pieces[1:]:
        torch.testing.assert_close(piece, pieces[0])
    return pieces[0]


def _grad_pieces(grad: torch.Tensor, out_p: Placement) -> list[torch.Tensor]:
    """Each device's share of the gradient of an output placed ``out_p``: that of a Partial
    sum is replicated, that of a mean of the devices' results is divided by N."""
    if out_p == Partial("avg"):
        return [grad / N] * N
    return _split(grad, gradient_placements((out_p,))[0])


def _value(graph: OpGraph, node: OpNode, k: int) -> torch.Tensor:
    """Random input ``k`` of ``node``, with integer ids and bool masks in range."""
    meta = graph.value_meta(node.inputs[k])
    if meta.dtype.is_floating_point:
        return torch.randn(meta.shape, dtype=torch.float64)
    if meta.dtype == torch.bool:
        return torch.ones(meta.shape, dtype=torch.bool).tril()
    if node.target == "aten.embedding.default":
        bound = graph.value_meta(node.inputs[0]).shape[0]
    elif node.target == "aten.cross_entropy_loss.default":
        bound = graph.value_meta(node.inputs[0]).shape[1]
    elif node.target == "aten.gather.default":
        bound = graph.value_meta(node.inputs[0]).shape[graph.fx_node(node.name).args[1]]
    else:
        bound = graph.value_meta(node.inputs[0]).shape[0]
    return torch.randint(0, bound, meta.shape, dtype=meta.dtype)


def _run(fx_node: fx.Node, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    args, kwargs = pytree.tree_map(
        lambda a: values[a.name] if isinstance(a, fx.Node) else a, (fx_node.args, fx_node.kwargs)
    )
    out = fx_node.target(*args, **kwargs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_on_one_axis(graph: OpGraph, node: OpNode, strategy: OpStrategy) -> None:
    fx_node = graph.fx_node(node.name)
    full = {v: _value(graph, node, k) for k, v in enumerate(node.inputs)}
    grads_wanted = {v: has_grad(graph, v) for v in node.inputs}
    leaves = {v: t.clone().requires_grad_(grads_wanted[v]) for v, t in full.items()}
    outputs = _run(fx_node, leaves)
    grad_out = [torch.randn_like(o) for o in outputs]
    floating = [(o, g) for o, g in zip(outputs, grad_out, strict=True) if o.requires_grad]
    if floating:
        torch.autograd.backward([o for o, _ in floating], [g for _, g in floating])

    out_p = strategy.output[AXIS]
    local_outputs, local_grads = [], []
    for r in range(N):
        local = {
            v: _split(full[v], strategy.inputs[k][AXIS])[r].clone().requires_grad_(grads_wanted[v])
            for k, v in enumerate(node.inputs)
        }
        outs = _run(fx_node, local)
        local_outputs.append(outs)
        pairs = [
            (o, _grad_pieces(g, out_p)[r])
            for o, g in zip(outs, grad_out, strict=True)
            if o.requires_grad
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        local_grads.append([local[v].grad for v in node.inputs])
    for i, expected in enumerate(outputs):
        got = _combine([outs[i] for outs in local_outputs], out_p)
        torch.testing.assert_close(got, expected.detach(), msg=f"{node.name} {strategy.name}")
    for k, v in enumerate(node.inputs):
        placement = strategy.input_grads[k]
        if placement is None or leaves[v].grad is None:
            continue
        got = _combine([g[k] for g in local_grads], placement[AXIS])
        torch.testing.assert_close(got, leaves[v].grad, msg=f"grad {k} {node.name} {strategy.name}")


SIMULATED = {
    "gpt": [
        "aten.linear.default",
        "aten.scaled_dot_product_attention.default",
        "aten.layer_norm.default",
        "aten.gelu.default",
        "aten.add.Tensor",
        "aten.embedding.default",
        "aten.cross_entropy_loss.default",
        "aten.split.Tensor",
        "aten.transpose.int",
        "aten.flatten.using_ints",
    ],
    "llama": [
        "aten.rms_norm.default",
        "aten.silu.default",
        "aten.mul.Tensor",
        "aten.scaled_dot_product_attention.default",
        "aten.outer.default",
        "aten.cat.default",
        "aten.chunk.default",
        "aten.neg.default",
    ],
    "mlp": ["aten.linear.default", "aten.relu.default"],
    "cnn": ["aten.conv2d.default", "aten.batch_norm.default"],
    "batch_stats": ["aten.batch_norm.default"],
    "misc": [
        "aten.addmm.default",
        "aten.softmax.int",
        "aten.matmul.default",
        "aten.bmm.default",
        "aten.index_select.default",
        "aten.gather.default",
        "aten.sum.dim_IntList",
        "aten.mean.default",
        "aten.log_softmax.int",
        "aten.amax.default",
    ],
}


def _simulated_cases() -> list[tuple[str, str]]:
    return [(graph, target) for graph, targets in SIMULATED.items() for target in targets]


@pytest.mark.parametrize(("graph_name", "target"), _simulated_cases())
def test_strategies_compute_the_op_on_one_axis(graphs, graph_name, target) -> None:
    """Every strategy of the op (followers: for every producer placement, Partial included),
    except the vocabulary-parallel lookup and loss, whose local computation is not the op
    itself (masking, collectives): those are checked by hand below."""
    torch.manual_seed(0)
    graph = graphs[graph_name]
    ctx = _context(graph, (1, N))
    node = _node(graph, target)
    producers = [
        _candidates(graph.value_meta(v).shape, ctx.mesh_shape, has_grad(graph, v))
        for v in node.inputs
    ]
    checked = 0
    for strategy in node_strategies(ctx, node, producers).strategies:
        sharded_classes = strategy.inputs[0][AXIS] == Shard(
            0 if target == "aten.embedding.default" else 1
        )
        if (
            target in ("aten.embedding.default", "aten.cross_entropy_loss.default")
            and sharded_classes
        ):
            continue
        _check_on_one_axis(graph, node, strategy)
        checked += 1
    assert checked >= 2


def test_vocab_parallel_embedding_sums_masked_lookups() -> None:
    torch.manual_seed(0)
    weight, ids = torch.randn(10, 4), torch.randint(0, 10, (3, 5))
    rows = weight.shape[0] // N
    pieces = []
    for r, local in enumerate(weight.chunk(N, 0)):  # W Shard(0), ids Replicate
        offset = ids - r * rows
        mine = (offset >= 0) & (offset < rows)
        looked_up = F.embedding(offset.clamp(0, rows - 1), local)
        pieces.append(looked_up * mine.unsqueeze(-1))
    torch.testing.assert_close(_combine(pieces, P), F.embedding(ids, weight))


def test_vocab_parallel_cross_entropy_needs_three_row_reductions() -> None:
    """logits Shard(1): the row max, the row sum of exponentials and the target logit are
    each one all-reduce (max, sum, sum) of one value per row; the loss comes out replicated."""
    torch.manual_seed(0)
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    local = logits.chunk(N, 1)
    cols = logits.shape[1] // N
    row_max = torch.stack([x.amax(1) for x in local]).amax(0)
    sum_exp = sum(torch.exp(x - row_max[:, None]).sum(1) for x in local)
    picked = sum(
        torch.where(
            (target >= r * cols) & (target < (r + 1) * cols),
            x.gather(1, (target - r * cols).clamp(0, cols - 1)[:, None])[:, 0],
            torch.zeros(()),
        )
        for r, x in enumerate(local)
    )
    loss = (row_max + torch.log(sum_exp) - picked).mean()
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    assert math.isfinite(loss.item())
