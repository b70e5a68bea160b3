"""Reductions over dims (``sum``, ``mean``, ``amax``, ``amin``): followers of their input.

A dim that is kept passes its shard to the output (shifted down past removed dims). For
``sum`` and ``mean`` a shard on a reduced dim leaves each device with the reduction of its
own slice, i.e. a ``Partial`` output: ``Σ_all = Σ_devices Σ_slice`` (``Partial("sum")``) and
the mean of equal slices is the mean of their means (``Partial("avg")``), as in DTensor's
reduction rule; both are linear, so a ``Partial`` input stays ``Partial``. ``amax``/``amin``
need the reduced dims whole and a replicated input: their backward compares the input with
the global result, which a ``Partial("max")`` output would first have to all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import REPLICATE, Partial, Placement, Placements, Shard
from intra_op.rules.common import call_arg, follow_input, input_shape
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule
from intra_op.view_dims import reduce_dim_map


def reduction_rule(reduce_op: str | None) -> StrategyRule:
    """Follower for a reduction whose slices combine with ``reduce_op`` (``sum``, ``avg``),
    or that needs its reduced dims whole (``None``)."""

    def rule(
        ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
    ) -> RuleResult:
        ndim = len(input_shape(ctx, node, 0))
        fx_node = ctx.fx_node(node)
        dims = call_arg(fx_node, 1, "dim")
        if isinstance(dims, int):
            dims = [dims]
        if not dims:
            dims = list(range(ndim))
        keepdim = bool(call_arg(fx_node, 2, "keepdim", False))
        dim_map = reduce_dim_map(ndim, dims, keepdim)

        def mapping(placements: Placements) -> tuple[list[Placements], Placements]:
            accepted: list[Placement] = []
            output: list[Placement] = []
            for p in placements:
                target = dim_map[p.dim] if isinstance(p, Shard) else None
                if isinstance(p, Shard) and (target is not None or reduce_op is not None):
                    accepted.append(p)
                    output.append(Partial(reduce_op) if target is None else Shard(target))
                elif isinstance(p, Partial) and reduce_op is not None:
                    accepted.append(p)
                    output.append(p)
                else:
                    accepted.append(REPLICATE)
                    output.append(REPLICATE)
            return [tuple(accepted)], tuple(output)

        return follow_input(ctx, node, 0, producer_outputs, mapping)

    return rule


RULES: dict[str, StrategyRule] = {
    "aten.sum.default": reduction_rule("sum"),
    "aten.sum.dim_IntList": reduction_rule("sum"),
    "aten.mean.default": reduction_rule("avg"),
    "aten.mean.dim": reduction_rule("avg"),
    "aten.amax.default": reduction_rule(None),
    "aten.amin.default": reduction_rule(None),
}
