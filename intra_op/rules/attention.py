"""``scaled_dot_product_attention(q, k, v, attn_mask?)``: shard a batch or a head dim.

``out[b, h] = softmax(q[b, h] k[b, h']ᵀ · scale + mask[b, h]) v[b, h']`` is independent per
batch element and per head, so sharding the batch dim (0) or the head dim (1) of ``q``, ``k``,
``v`` and the output alike needs no communication, and the mask follows where it has that
dim (a broadcast unit dim stays replicated). With grouped-query attention (``h' = h / g``)
query head ``i`` reads key/value head ``i // g``; contiguous shards keep those pairs on one
device exactly when both head counts divide by the shard factor, which validity checks. The
sequence dims are never sharded (that would need ring attention). A dim other than the
leading one shards at most one mesh axis: DTensor's math attention flattens the leading dims,
and a non-leading dim sharded over both axes becomes a ``_StridedShard`` it cannot unflatten.
"""

from __future__ import annotations

from collections.abc import Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import REPLICATE, Placement, Placements, Shard
from intra_op.rules.common import AxisRole, enumerate_roles, input_shape, on_one_axis
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule


def _mask_placement(
    mask_shape: Sequence[int], score_shape: Sequence[int], score_dim: int
) -> Placement:
    """Shard of the mask dim aligned (from the right) with ``score_dim`` of the attention
    scores, or ``Replicate`` where the mask broadcasts along it."""
    d = score_dim - (len(score_shape) - len(mask_shape))
    if d >= 0 and mask_shape[d] == score_shape[score_dim]:
        return Shard(d)
    return REPLICATE


def sdpa_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """Roles: every leading (batch or head) dim of ``q``, or replication."""
    q = input_shape(ctx, node, 0)
    k = input_shape(ctx, node, 1)
    score_shape = (*q[:-1], k[-2])
    roles = []
    for dim in range(len(q) - 2):
        inputs: list[Placement] = [Shard(dim)] * 3
        if len(node.inputs) > 3:
            inputs.append(_mask_placement(input_shape(ctx, node, 3), score_shape, dim))
        roles.append(AxisRole(f"d{dim}", Shard(dim), tuple(inputs)))
    return enumerate_roles(ctx, node, roles, allowed=on_one_axis(lambda name: name != "d0"))


RULES: dict[str, StrategyRule] = {"aten.scaled_dot_product_attention.default": sdpa_rule}
