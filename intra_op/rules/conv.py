"""Convolutions: data parallel over the batch dim, or replicated.

``y[n] = conv(x[n], W) + b`` is independent per sample, so ``x`` and ``y`` ``Shard(0)`` with
``W`` and ``b`` replicated needs no communication; their gradients are ``Partial`` sums over
the local samples. Output-channel sharding (``W`` ``Shard(0)``) is mathematically fine but
DTensor's convolution rule only shards the batch (its propagation makes the output follow
the input's placement), so it would all-gather ``W`` first; it is not offered. Nor is the
batch sharded over both mesh axes at once, which that propagation cannot express.
"""

from __future__ import annotations

from collections.abc import Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import REPLICATE, Placements, Shard
from intra_op.rules.common import AxisRole, enumerate_roles, on_one_axis
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule


def conv_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """Roles: the batch dim on one mesh axis, or replication."""
    params = (REPLICATE,) * (len(node.inputs) - 1)
    return enumerate_roles(
        ctx,
        node,
        [AxisRole("batch", Shard(0), (Shard(0), *params))],
        allowed=on_one_axis(lambda name: name == "batch"),
    )


RULES: dict[str, StrategyRule] = {
    f"aten.{name}": conv_rule
    for name in ("conv1d.default", "conv2d.default", "conv3d.default", "convolution.default")
}
