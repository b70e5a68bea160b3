"""Which part of the captured graph each pipeline stage runs, and what crosses stage boundaries.

A plan's stage covers planning layers ``[first, last]``, each a range of graph nodes named by
its first and last node. Stage ``s`` runs the executed (``call_function``) nodes from the first
node of its first layer up to, not including, the first node of stage ``s + 1``'s first layer
(the last stage runs to the end of the graph), in the graph's topological order.

Boundary values. Stage ``s`` sends to stage ``s + 1`` every value computed by a stage ``≤ s``
and read by a stage ``> s``, in graph order; stage ``s + 1`` receives exactly those. A value a
stage does not read but a later one does passes through it. The graph's user inputs (model
inputs and loss targets) do not travel along the pipeline: each stage that reads one gets it
from the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from torch.export.graph_signature import InputKind, OutputKind

from hierarchical_ap.errors import PlanError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.plan import ParallelPlan


@dataclass(frozen=True)
class StageSlice:
    """The nodes of one stage and the values it exchanges."""

    index: int
    nodes: tuple[str, ...]
    """Executed nodes, in graph order."""
    received: tuple[str, ...]
    """Values received from stage ``index - 1`` (empty for the first stage)."""
    sent: tuple[str, ...]
    """Values sent to stage ``index + 1`` (empty for the last stage)."""
    user_inputs: tuple[str, ...]
    """Graph user inputs (model inputs, targets) the stage reads, in graph order."""
    params: tuple[str, ...]
    """Parameter FQNs the stage reads."""
    outputs: tuple[str, ...]
    """The program's user outputs (the loss) when this stage computes them, else empty."""


def slice_stages(graph: OpGraph, plan: ParallelPlan) -> list[StageSlice]:
    """The ``StageSlice`` of every stage of ``plan`` (see the module docstring)."""
    fx_graph = graph.graph_module.graph
    order = [n for n in fx_graph.nodes if n.op == "call_function"]
    position = {n.name: i for i, n in enumerate(order)}
    starts = []
    for i, stage in enumerate(plan.stages):
        first = plan.layers[stage.layers[0]].first_node
        if first not in position:
            raise PlanError(
                f"stage {i} starts at node {first!r}, which the captured graph does not execute; "
                "re-plan with `hap plan` for this model"
            )
        starts.append(0 if i == 0 else position[first])
    bounds = [*starts, len(order)]
    if any(a > b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise PlanError(f"stage start nodes are out of graph order: {starts}; re-plan")
    stage_of = {n.name: s for s in range(len(starts)) for n in order[bounds[s] : bounds[s + 1]]}
    user_inputs = _user_inputs(graph)
    param_of = _param_placeholders(graph)
    program_outputs = _user_outputs(graph)
    last_reader: dict[str, int] = {}
    for node in order:
        for value in node.all_input_nodes:
            if value.name in stage_of:
                last_reader[value.name] = max(last_reader.get(value.name, -1), stage_of[node.name])
    for name in program_outputs:
        if name in stage_of:
            last_reader[name] = len(starts) - 1
    slices = []
    sent_before: tuple[str, ...] = ()
    for s in range(len(starts)):
        nodes = order[bounds[s] : bounds[s + 1]]
        sent = tuple(n.name for n in order[: bounds[s + 1]] if last_reader.get(n.name, -1) > s)
        # graph inputs the stage reads, in the order its nodes read them (the same on every
        # worker: a set of nodes would iterate in the order of their addresses)
        read = dict.fromkeys(v for n in nodes for v in n.all_input_nodes if v.op == "placeholder")
        for value in sent:
            _check_single_tensor(graph, value, s)
        slices.append(
            StageSlice(
                index=s,
                nodes=tuple(n.name for n in nodes),
                received=sent_before,
                sent=sent if s < len(starts) - 1 else (),
                user_inputs=tuple(v for v in user_inputs if v in {r.name for r in read}),
                params=tuple(dict.fromkeys(param_of[v.name] for v in read if v.name in param_of)),
                outputs=tuple(program_outputs) if s == len(starts) - 1 else (),
            )
        )
        sent_before = sent
    return slices


def _user_outputs(graph: OpGraph) -> list[str]:
    """Names of the values the program returns to the user (the loss)."""
    output = next(n for n in graph.graph_module.graph.nodes if n.op == "output")
    values: list[fx.Node] = []
    fx.node.map_arg(output.args[0], values.append)
    specs = graph.exported.graph_signature.output_specs
    user = (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)
    return [v.name for v, spec in zip(values, specs, strict=True) if spec.kind in user]


def _user_inputs(graph: OpGraph) -> list[str]:
    return [*graph.model_inputs, *graph.target_inputs]


def _param_placeholders(graph: OpGraph) -> dict[str, str]:
    return {
        spec.arg.name: graph.value_to_param[spec.arg.name]
        for spec in graph.exported.graph_signature.input_specs
        if spec.kind is InputKind.PARAMETER
    }


def _check_single_tensor(graph: OpGraph, value: str, stage: int) -> None:
    node = graph.nodes.get(value)
    if node is not None and len(node.outputs) != 1:
        raise PlanError(
            f"stage {stage} ends between node {value!r}, which returns {len(node.outputs)} "
            "values, and its readers; cut stages at layer boundaries (re-plan with `hap plan`)"
        )
