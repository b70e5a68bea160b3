"""Softmax and normalisation layers: followers of their input that need some dims whole.

* ``softmax`` / ``log_softmax`` over ``dim``: each row is normalised independently, so any
  other dim may stay sharded; a shard on ``dim`` is replaced by ``Replicate``.
* ``layer_norm`` / ``rms_norm`` over the trailing ``normalized_shape``: the leading dims may
  stay sharded; weight and bias (shape ``normalized_shape``) are replicated, and their
  gradients ``Σ_rows g·x̂`` are ``Partial`` on every axis that shards the rows.
* ``batch_norm`` normalises each channel over batch and space: only the channel dim (1) may
  stay sharded (the statistics would otherwise need an all-reduce that DTensor's batch-norm
  rule does not do); weight, bias and running statistics (shape ``[C]``) are ``Shard(0)`` with
  the channels. In training mode with running statistics it runs replicated: their in-place
  update would land on a redistributed copy (``intra_op.apply`` runs it replicated too).

All are nonlinear in their input, so a ``Partial`` input is replaced by ``Replicate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import REPLICATE, Placements, Shard
from intra_op.rules.common import call_arg, follow_input, input_shape, output_shape
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule
from intra_op.view_dims import follow, keep_except_dim_map

BlockedDims = Callable[[StrategyContext, OpNode, int], Sequence[int]]
"""``blocked(ctx, node, ndim)``: the input dims the op needs whole."""


def _channel_params(placements: Placements) -> Placements:
    """Placement of a ``[C]`` parameter of an input sharded as ``placements``."""
    return tuple(Shard(0) if p == Shard(1) else REPLICATE for p in placements)


def _replicated_params(placements: Placements) -> Placements:
    return tuple(REPLICATE for _ in placements)


def normalization_rule(
    blocked: BlockedDims, params: Callable[[Placements], Placements] = _replicated_params
) -> StrategyRule:
    """Follower of input 0 with ``blocked`` dims (and ``Partial``) replaced by ``Replicate``;
    every further input (weights, statistics) takes ``params(accepted input placement)``."""

    def rule(
        ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
    ) -> RuleResult:
        shape = input_shape(ctx, node, 0)
        stop = blocked(ctx, node, len(shape))
        dim_map = keep_except_dim_map(len(shape), stop)

        def mapping(placements: Placements) -> tuple[list[Placements], Placements]:
            accepted, output = follow(
                placements,
                dim_map,
                shape,
                output_shape(node),
                ctx.mesh_shape,
                partial_passes=False,
            )
            return [accepted] + [params(accepted)] * (len(node.inputs) - 1), output

        return follow_input(ctx, node, 0, producer_outputs, mapping)

    return rule


def _softmax_dim(ctx: StrategyContext, node: OpNode, ndim: int) -> Sequence[int]:
    return (call_arg(ctx.fx_node(node), 1, "dim"),)


def _trailing_normalized(ctx: StrategyContext, node: OpNode, ndim: int) -> Sequence[int]:
    normalized = call_arg(ctx.fx_node(node), 1, "normalized_shape")
    return tuple(range(ndim - len(normalized), ndim))


def _batch_norm_blocked(ctx: StrategyContext, node: OpNode, ndim: int) -> Sequence[int]:
    """Every dim but the channels; every dim when training updates running statistics."""
    fx_node = ctx.fx_node(node)
    updates_statistics = (
        bool(call_arg(fx_node, 5, "training")) and call_arg(fx_node, 3, "running_mean") is not None
    )
    return tuple(d for d in range(ndim) if d != 1 or updates_statistics)


_SOFTMAX = ["softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default"]
_SOFTMAX += ["_safe_softmax.default"]

RULES: dict[str, StrategyRule] = {
    f"aten.{name}": normalization_rule(_softmax_dim) for name in _SOFTMAX
}
RULES.update(
    {
        "aten.layer_norm.default": normalization_rule(_trailing_normalized),
        "aten.rms_norm.default": normalization_rule(_trailing_normalized),
        "aten.batch_norm.default": normalization_rule(_batch_norm_blocked, _channel_params),
    }
)
