"""Building blocks shared by the strategy rules.

Two shapes of rule exist:

* *followers* (``follow_input``): one strategy per placement the producer of input ``k`` can
  output, in order; the rule maps each to the placement the op accepts and the output
  placement it produces;
* *enumerators* (``enumerate_roles``): the op picks one ``AxisRole`` per mesh axis (what every
  operand and the output look like on that axis), the strategies are the product over the two
  axes, keeping only valid and distinct ones. An axis of size 1 only takes the replicated role.

Gradients (``default_input_grads``): on each mesh axis the gradient of an input comes out

* ``Shard(d)`` where the input was ``Shard(d)`` (each device back-propagates its own shard);
* ``Partial`` where the input was ``Replicate`` but the output is sharded: every device holds
  the gradient contribution of its output shard, i.e. one summand (data-parallel weights,
  broadcast operands, the input of a column-parallel linear);
* ``Replicate`` otherwise (the gradient of a ``Partial`` output is replicated, so a linear op's
  replicated or ``Partial`` input gets a replicated gradient).

Inputs without a gradient (integer ids, buffers, constants) get ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

from torch import fx

from hierarchical_ap.graph import OpGraph, OpNode
from intra_op.placement import (
    PARTIAL,
    REPLICATE,
    Placement,
    Placements,
    Shard,
    format_placements,
    is_valid,
    replicated,
    shard_factor,
)
from intra_op.strategy import OpStrategy, RuleResult, StrategyContext

Grads = tuple[Placements | None, ...]


def describe(output: Placements, inputs: Sequence[Placements]) -> str:
    """Alpa-style display name: ``S0R = S0R x RR``."""
    return f"{format_placements(output)} = {' x '.join(format_placements(p) for p in inputs)}"


def has_grad(graph: OpGraph, value: str) -> bool:
    """Whether the backward pass produces a gradient for graph value ``value``: floating
    parameters, and node outputs that require grad; graph inputs and buffers get none."""
    meta = graph.value_meta(value)
    if not meta.dtype.is_floating_point:
        return False
    if value in graph.nodes:
        return graph.nodes[value].requires_grad
    return value in graph.value_to_param


def default_input_grads(
    ctx: StrategyContext, node: OpNode, output: Placements, inputs: Sequence[Placements]
) -> Grads:
    """Gradient placement of every input (see the module docstring)."""
    grads: list[Placements | None] = []
    for value, placements in zip(node.inputs, inputs, strict=True):
        if not has_grad(ctx.graph, value):
            grads.append(None)
            continue
        grads.append(
            tuple(
                p if isinstance(p, Shard) else PARTIAL if isinstance(o, Shard) else REPLICATE
                for p, o in zip(placements, output, strict=True)
            )
        )
    return tuple(grads)


def input_shape(ctx: StrategyContext, node: OpNode, index: int) -> tuple[int, ...]:
    return ctx.input_meta(node, index).shape


def output_shape(node: OpNode) -> tuple[int, ...]:
    return node.outputs[0].shape if node.outputs else ()


def call_arg(fx_node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an aten call, given positionally at ``index`` or as a keyword."""
    if len(fx_node.args) > index:
        return fx_node.args[index]
    return fx_node.kwargs.get(name, default)


def replicate_strategy(ctx: StrategyContext, node: OpNode, name: str = "replicate") -> OpStrategy:
    """Everything replicated: each device runs the whole op."""
    rep = replicated(len(ctx.mesh_shape))
    inputs = (rep,) * len(node.inputs)
    return ctx.strategy(node, name, rep, inputs, default_input_grads(ctx, node, rep, inputs), 1)


def replicate_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """Rule for ops that only run replicated (constants, index arithmetic on masks)."""
    return RuleResult((replicate_strategy(ctx, node),))


def follow_input(
    ctx: StrategyContext,
    node: OpNode,
    index: int,
    producer_outputs: Sequence[Sequence[Placements]],
    mapping: Callable[[Placements], tuple[Sequence[Placements], Placements]],
    grads: Callable[[Placements, Sequence[Placements]], Grads] | None = None,
) -> RuleResult:
    """A follower of input ``index``: ``mapping(producer placement)`` gives the placements of
    all inputs and the output; the work splits over the axes where the followed input is
    sharded."""
    mesh_shape = ctx.mesh_shape
    strategies = []
    for placements in producer_outputs[index]:
        inputs, output = mapping(tuple(placements))
        input_grads = (
            grads(output, inputs) if grads else default_input_grads(ctx, node, output, inputs)
        )
        strategies.append(
            ctx.strategy(
                node,
                describe(output, inputs),
                output,
                inputs,
                input_grads,
                shard_factor(inputs[index], mesh_shape),
            )
        )
    return RuleResult(tuple(strategies), follows_input=index)


@dataclass(frozen=True)
class AxisRole:
    """What one mesh axis does in an enumerated strategy: the placement on that axis of the
    output and of every tensor input (in ``OpNode.inputs`` order), and whether it divides the
    op's work (a vocabulary-parallel embedding still writes a full-size output per device)."""

    name: str
    output: Placement
    inputs: tuple[Placement, ...]
    splits_work: bool = True

    @classmethod
    def replicate(cls, num_inputs: int) -> AxisRole:
        return cls("R", REPLICATE, (REPLICATE,) * num_inputs)

    @property
    def is_replicate(self) -> bool:
        return self.output == REPLICATE and all(p == REPLICATE for p in self.inputs)


def on_one_axis(restricted: Callable[[str], bool]) -> Callable[[tuple[AxisRole, ...]], bool]:
    """An ``allowed`` filter for ``enumerate_roles``: a role whose name is ``restricted`` may
    be taken by at most one mesh axis (e.g. where DTensor cannot shard a dim over two axes)."""

    def allowed(combo: tuple[AxisRole, ...]) -> bool:
        names = [r.name for r in combo if not r.is_replicate and restricted(r.name)]
        return len(names) == len(set(names))

    return allowed


def enumerate_roles(
    ctx: StrategyContext,
    node: OpNode,
    roles: Iterable[AxisRole],
    *,
    comm_time: Callable[[tuple[AxisRole, ...]], float] | None = None,
    grads: Callable[[Placements, Sequence[Placements]], Grads] | None = None,
    allowed: Callable[[tuple[AxisRole, ...]], bool] | None = None,
) -> RuleResult:
    """Strategies from every combination of one role per mesh axis (the replicated role is
    always available; axes of size 1 take only it). A combination survives when every
    operand and the output are validly sharded and ``allowed`` accepts it; duplicates (same
    output and inputs) are dropped. The op's work splits over the axes whose role is not the
    replicated one."""
    mesh_shape = ctx.mesh_shape
    num_inputs = len(node.inputs)
    rep = AxisRole.replicate(num_inputs)
    choices = [rep, *(r for r in roles if not r.is_replicate)]
    per_axis = [choices if size > 1 else [rep] for size in mesh_shape]
    shapes = [input_shape(ctx, node, k) for k in range(num_inputs)]
    seen: set[tuple[Placements, tuple[Placements, ...]]] = set()
    strategies: list[OpStrategy] = []
    for combo in product(*per_axis):
        output = tuple(r.output for r in combo)
        inputs = tuple(tuple(r.inputs[k] for r in combo) for k in range(num_inputs))
        key = (output, inputs)
        if key in seen:
            continue
        if not all(is_valid(m.shape, output, mesh_shape) for m in node.outputs):
            continue
        if not all(is_valid(s, p, mesh_shape) for s, p in zip(shapes, inputs, strict=True)):
            continue
        if allowed is not None and not allowed(combo):
            continue
        seen.add(key)
        work_split = math.prod(
            size
            for size, r in zip(mesh_shape, combo, strict=True)
            if r.splits_work and not r.is_replicate
        )
        strategies.append(
            ctx.strategy(
                node,
                describe(output, inputs),
                output,
                inputs,
                grads(output, inputs) if grads else default_input_grads(ctx, node, output, inputs),
                work_split,
                comm_time(combo) if comm_time else 0.0,
            )
        )
    return RuleResult(tuple(strategies))
