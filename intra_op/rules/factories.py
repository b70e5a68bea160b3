"""Tensor factories: constants are replicated; ``new_*`` / ``*_like`` read no data.

``arange``, ``full``, ``zeros``, ``ones``… have no tensor input and run replicated (every
device builds the same constant). ``new_ones(x, size)`` and ``zeros_like(x)`` only take the
dtype and device of ``x``: ``x`` stays where its producer put it (no reshard), the output is
replicated, or sharded like ``x`` when the shapes agree; a ``Partial`` ``x`` gives a replicated
output (a summand of ones is not ones). No gradient flows to ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import Placements
from intra_op.rules.common import follow_input, input_shape, output_shape, replicate_rule
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule
from intra_op.view_dims import follow, identity_dim_map


def like_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """Follower of its template input, which it accepts in any placement."""
    in_shape, out_shape = input_shape(ctx, node, 0), output_shape(node)
    dim_map = identity_dim_map(len(in_shape)) if in_shape == out_shape else (None,) * len(in_shape)

    def mapping(placements: Placements) -> tuple[list[Placements], Placements]:
        _, output = follow(
            placements, dim_map, in_shape, out_shape, ctx.mesh_shape, partial_passes=False
        )
        return [placements], output

    return follow_input(
        ctx, node, 0, producer_outputs, mapping, lambda output, inputs: (None,) * len(inputs)
    )


_CONSTANTS = ["arange.default", "arange.start", "arange.start_step", "full.default"]
_CONSTANTS += ["zeros.default", "ones.default", "empty.memory_format", "scalar_tensor.default"]
_CONSTANTS += ["rand.default", "randn.default", "eye.default", "linspace.default"]
_LIKE = ["new_ones.default", "new_zeros.default", "new_full.default", "new_empty.default"]
_LIKE += ["new_empty_strided.default", "zeros_like.default", "ones_like.default"]
_LIKE += ["full_like.default", "empty_like.default"]

RULES: dict[str, StrategyRule] = {f"aten.{name}": replicate_rule for name in _CONSTANTS}
RULES.update({f"aten.{name}": like_rule for name in _LIKE})
