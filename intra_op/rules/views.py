"""View-like ops (reshape family, transpose/permute, expand, slicing, split/unbind, cat/stack,
``getitem``): followers of their first input.

Each op is a ``DimMap`` (``intra_op.view_dims``) from input dims to output dims; a shard that
cannot pass becomes ``Replicate`` on the input, so the ILP pays the reshard on that edge.
Views are linear, so ``Partial`` passes unchanged. Multi-output ops (``split``, ``chunk``,
``unbind``) place every output alike, and ``getitem`` passes its source's placement through.
``cat``/``stack`` take every operand in the placement the first one is accepted in (the
operands agree on every dim but the concatenated one, which is never sharded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import Placements
from intra_op.rules.common import call_arg, follow_input, input_shape, output_shape
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule
from intra_op.view_dims import (
    DimMap,
    broadcast_dim_map,
    drop_dim_map,
    follow,
    identity_dim_map,
    insert_dim_map,
    keep_except_dim_map,
    permute_dim_map,
    reshape_dim_map,
    transpose_dim_map,
)

DimMapOf = Callable[[StrategyContext, OpNode], DimMap]
"""``dim_map_of(ctx, node)``: the node's map from its first input's dims to its output dims."""


def view_rule(dim_map_of: DimMapOf) -> StrategyRule:
    """Follower of input 0 through the node's ``DimMap``; further tensor inputs (``cat``,
    ``stack``) take the placement input 0 is accepted in."""

    def rule(
        ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
    ) -> RuleResult:
        dim_map = dim_map_of(ctx, node)
        in_shape = input_shape(ctx, node, 0)
        out_shape = output_shape(node)

        def mapping(placements: Placements) -> tuple[list[Placements], Placements]:
            accepted, output = follow(placements, dim_map, in_shape, out_shape, ctx.mesh_shape)
            return [accepted] * len(node.inputs), output

        return follow_input(ctx, node, 0, producer_outputs, mapping)

    return rule


def getitem_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """One output of a multi-output op, in the placement the op gave all its outputs."""
    shape = output_shape(node)
    dim_map = identity_dim_map(len(shape))

    def mapping(placements: Placements) -> tuple[list[Placements], Placements]:
        accepted, output = follow(placements, dim_map, shape, shape, ctx.mesh_shape)
        return [accepted], output

    return follow_input(ctx, node, 0, producer_outputs, mapping)


def _reshape(ctx: StrategyContext, node: OpNode) -> DimMap:
    return reshape_dim_map(input_shape(ctx, node, 0), output_shape(node))


def _expand(ctx: StrategyContext, node: OpNode) -> DimMap:
    return broadcast_dim_map(input_shape(ctx, node, 0), output_shape(node))


def _transpose(ctx: StrategyContext, node: OpNode) -> DimMap:
    fx_node = ctx.fx_node(node)
    ndim = len(input_shape(ctx, node, 0))
    return transpose_dim_map(ndim, fx_node.args[1], fx_node.args[2])


def _t(ctx: StrategyContext, node: OpNode) -> DimMap:
    ndim = len(input_shape(ctx, node, 0))
    return transpose_dim_map(ndim, 0, 1) if ndim == 2 else identity_dim_map(ndim)


def _permute(ctx: StrategyContext, node: OpNode) -> DimMap:
    return permute_dim_map(ctx.fx_node(node).args[1])


def _dim(ctx: StrategyContext, node: OpNode, index: int = 1) -> int:
    return call_arg(ctx.fx_node(node), index, "dim", 0)


def _slice(ctx: StrategyContext, node: OpNode) -> DimMap:
    """A slice of the whole dim is the identity; any other slice needs the dim whole."""
    fx_node = ctx.fx_node(node)
    shape = input_shape(ctx, node, 0)
    dim = _dim(ctx, node)
    if output_shape(node) == shape and call_arg(fx_node, 4, "step", 1) == 1:
        return identity_dim_map(len(shape))
    return keep_except_dim_map(len(shape), [dim])


def _along_dim(index: int) -> DimMapOf:
    """Ops that need the dim given at argument ``index`` whole (split, chunk, cat)."""

    def dim_map(ctx: StrategyContext, node: OpNode) -> DimMap:
        ndim = len(input_shape(ctx, node, 0))
        return keep_except_dim_map(ndim, [_dim(ctx, node, index)])

    return dim_map


def _drop_dim(ctx: StrategyContext, node: OpNode) -> DimMap:
    return drop_dim_map(len(input_shape(ctx, node, 0)), _dim(ctx, node))


def _stack(ctx: StrategyContext, node: OpNode) -> DimMap:
    return insert_dim_map(len(input_shape(ctx, node, 0)), _dim(ctx, node))


_RESHAPES = ["view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints"]
_RESHAPES += ["unflatten.int", "squeeze.default", "squeeze.dim", "squeeze.dims"]
_RESHAPES += ["unsqueeze.default", "view_copy.default"]

RULES: dict[str, StrategyRule] = {f"aten.{name}": view_rule(_reshape) for name in _RESHAPES}
RULES.update(
    {
        "aten.expand.default": view_rule(_expand),
        "aten.transpose.int": view_rule(_transpose),
        "aten.t.default": view_rule(_t),
        "aten.permute.default": view_rule(_permute),
        "aten.slice.Tensor": view_rule(_slice),
        "aten.narrow.default": view_rule(_along_dim(1)),
        "aten.select.int": view_rule(_drop_dim),
        "aten.unbind.int": view_rule(_drop_dim),
        "aten.split.Tensor": view_rule(_along_dim(2)),
        "aten.split_with_sizes.default": view_rule(_along_dim(2)),
        "aten.chunk.default": view_rule(_along_dim(2)),
        "aten.cat.default": view_rule(_along_dim(1)),
        "aten.stack.default": view_rule(_stack),
        "<built-in function getitem>": getitem_rule,
    }
)
