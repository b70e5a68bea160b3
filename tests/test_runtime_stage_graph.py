"""Slicing a captured graph into a plan's stages (pure; no processes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hierarchical_ap import capture
from hierarchical_ap.errors import PlanError
from runtime.stage_graph import slice_stages
from runtime.worker import to_meta
from tests.runtime_cases import build_case, plan_for


def _graph_and_plan(name: str, **config):
    plan = plan_for(name, 4, **config)
    case = build_case(name, 1, meta=True)
    (inputs,), targets = case.batches[0]
    b = plan.micro_batch_size
    graph = capture(
        case.model, to_meta((inputs[:b],)), loss_fn=case.loss_fn, targets=to_meta(targets[:b])
    )
    return graph, plan


@pytest.fixture(scope="module")
def gpt_four_stages():
    return _graph_and_plan("gpt", tp=1, pp=4, dp=1, micro_batch_size=2)


def test_stages_cover_every_executed_node_once_in_order(gpt_four_stages):
    graph, plan = gpt_four_stages
    slices = slice_stages(graph, plan)
    executed = [n.name for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    assert [name for s in slices for name in s.nodes] == executed
    assert len(slices) == 4 and all(s.nodes for s in slices)


def test_each_boundary_is_what_later_stages_read_from_earlier_ones(gpt_four_stages):
    graph, plan = gpt_four_stages
    slices = slice_stages(graph, plan)
    stage_of = {name: s.index for s in slices for name in s.nodes}
    for s in slices[:-1]:
        assert slices[s.index + 1].received == s.sent
        expected = {
            value.name
            for node in graph.graph_module.graph.nodes
            if stage_of.get(node.name, -1) > s.index
            for value in node.all_input_nodes
            if stage_of.get(value.name, 99) <= s.index
        }
        assert set(s.sent) == expected and s.sent
    # the residual stream is one (batch, seq, hidden) tensor between blocks
    assert all(len(s.sent) == 1 for s in slices[:-1])
    assert graph.value_meta(slices[0].sent[0]).shape == (2, 8, 32)


def test_inputs_go_to_the_first_stage_targets_and_the_loss_to_the_last(gpt_four_stages):
    graph, plan = gpt_four_stages
    slices = slice_stages(graph, plan)
    assert set(slices[0].user_inputs) == set(graph.model_inputs)
    assert set(slices[-1].user_inputs) == set(graph.target_inputs)
    assert not any(s.user_inputs for s in slices[1:-1])
    assert slices[-1].outputs and not any(s.outputs for s in slices[:-1])


def test_the_tied_embedding_is_read_by_the_first_and_last_stage(gpt_four_stages):
    graph, plan = gpt_four_stages
    slices = slice_stages(graph, plan)
    readers = [s.index for s in slices if "embed.weight" in s.params]
    assert readers == [0, 3]
    every = [fqn for s in slices for fqn in s.params]
    assert set(every) == set(graph.param_shapes)


def test_a_plan_starting_a_stage_at_an_unknown_node_is_refused(gpt_four_stages):
    graph, plan = gpt_four_stages
    layers = list(plan.layers)
    layers[1] = dataclasses.replace(layers[1], first_node="no_such_node")
    with pytest.raises(PlanError, match="no_such_node"):
        slice_stages(graph, dataclasses.replace(plan, layers=tuple(layers)))


def test_a_received_value_that_is_read_later_passes_through():
    # a value computed in stage 0 and read only in stage 2 crosses stage 1 unchanged
    class Skip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            first = self.blocks[0](x)
            middle = self.blocks[1](first)
            return (self.blocks[2](middle) + first).sum()

    with torch.device("meta"):
        model = Skip()
    graph = capture(model, (torch.empty(2, 4, device="meta"),))
    graph_all, plan = _graph_and_plan("mlp", tp=1, pp=4, dp=1)
    del graph_all
    order = [n.name for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    linears = [n for n in order if n.startswith("linear")]
    layers = (
        dataclasses.replace(plan.layers[0], first_node=order[0], last_node=order[0]),
        dataclasses.replace(plan.layers[1], first_node=linears[1], last_node=linears[1]),
        dataclasses.replace(plan.layers[2], first_node=linears[2], last_node=order[-1]),
    )
    stages = tuple(dataclasses.replace(plan.stages[i], layers=(i, i)) for i in range(3))
    slices = slice_stages(graph, dataclasses.replace(plan, layers=layers, stages=stages))
    assert slices[0].sent == (linears[0],)
    assert slices[1].received == (linears[0],)
    assert slices[1].sent == (linears[0], linears[1])
    assert slices[2].received == (linears[0], linears[1])
