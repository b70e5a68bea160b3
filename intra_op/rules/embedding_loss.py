"""Lookups by index (``embedding``, ``gather``, ``index_select``) and the classification losses
(``cross_entropy_loss``, ``nll_loss``).

``embedding(W[V, H], ids) = W[ids]``, per mesh axis:

* ids sharded on any dim: ``W`` replicated, output sharded alike, ``W``'s gradient a
  ``Partial`` scatter-add of the local rows;
* vocabulary parallel, ``W`` ``Shard(0)``: each device looks up the ids in its row range and
  writes zeros elsewhere, so the output is ``Partial`` (``Σ_devices mask_r·W_r[ids] =
  W[ids]``) and needs no collective of its own. DTensor's ``embedding_dense_backward`` has no
  row-wise rule and computes the weight gradient replicated (no communication), so that is
  the gradient placement. Every device writes a full-size output: the work is not split;
* hidden parallel, ``W`` ``Shard(1)``: output ``Shard(-1)``.

``cross_entropy_loss(logits[N, C, …], target[N, …])``, per mesh axis:

* a batch dim sharded on logits and target: each device reduces its rows, so the loss is
  ``Partial("avg")`` for ``reduction="mean"`` (DTensor's ``nll_loss`` rule; the backward pass
  all-reduces the scalar total weight) and ``Partial("sum")`` for ``"sum"``;
* classes sharded (``Shard(1)``, vocabulary-parallel loss, run by DTensor under
  ``torch.distributed.tensor.parallel.loss_parallel()``): the log-softmax needs an all-reduce
  of the row max and of the row sum of exponentials, and picking the target logit a third
  all-reduce, each of one value per row; the loss comes out replicated. ``loss_parallel``
  supports it on one mesh axis only, without label smoothing, and with ``reduction="mean"``
  only on a 1-D mesh (here: when the other axis has size 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import (
    PARTIAL,
    REPLICATE,
    Partial,
    Placement,
    Placements,
    Shard,
    shard_factor,
)
from intra_op.rules.common import (
    AxisRole,
    Grads,
    call_arg,
    default_input_grads,
    enumerate_roles,
    input_shape,
    on_one_axis,
    replicate_rule,
)
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule

_NONE, _MEAN = 0, 1
"""``reduction`` argument values (``torch.nn._reduction``: none 0, mean 1, sum 2)."""

_STAT_BYTES = 4
"""Loss-parallel statistics (row max, row sum of exponentials) are computed in float32."""


def embedding_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """Roles: any ids dim, the vocabulary (``W`` rows) or the hidden dim (``W`` columns)."""
    ids_ndim = len(input_shape(ctx, node, 1))
    roles = [AxisRole(f"ids{d}", Shard(d), (REPLICATE, Shard(d))) for d in range(ids_ndim)]
    roles.append(AxisRole("vocab", PARTIAL, (Shard(0), REPLICATE), splits_work=False))
    roles.append(AxisRole("hidden", Shard(ids_ndim), (Shard(1), REPLICATE)))

    def grads(output: Placements, inputs: Sequence[Placements]) -> Grads:
        weight, ids = default_input_grads(ctx, node, output, inputs)
        if weight is not None:
            weight = tuple(
                REPLICATE if p == Shard(0) else g for p, g in zip(inputs[0], weight, strict=True)
            )
        return (weight, ids)

    return enumerate_roles(ctx, node, roles, grads=grads)


def _loss_output(reduction: int, target_dim: int) -> Placement:
    if reduction == _NONE:
        return Shard(target_dim)
    return Partial("avg" if reduction == _MEAN else "sum")


def cross_entropy_rule(class_parallel: bool) -> StrategyRule:
    """Rule for ``cross_entropy_loss`` (``class_parallel``) or ``nll_loss`` (batch only)."""

    def rule(
        ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
    ) -> RuleResult:
        logits = input_shape(ctx, node, 0)
        if len(logits) < 2:
            return replicate_rule(ctx, node, producer_outputs)
        fx_node = ctx.fx_node(node)
        reduction = call_arg(fx_node, 3, "reduction", _MEAN)
        smoothing = call_arg(fx_node, 5, "label_smoothing", 0.0) if class_parallel else 0.0
        extra = (REPLICATE,) * (len(node.inputs) - 2)
        roles = []
        for d in range(len(logits)):
            if d == 1:
                continue
            td = d if d < 1 else d - 1
            roles.append(
                AxisRole(f"b{d}", _loss_output(reduction, td), (Shard(d), Shard(td), *extra))
            )
        mesh_shape = ctx.mesh_shape
        one_axis = min(mesh_shape) == 1
        if class_parallel and smoothing == 0.0 and (reduction != _MEAN or one_axis):
            roles.append(AxisRole("classes", REPLICATE, (Shard(1), REPLICATE, *extra)))
        rows = math.prod(input_shape(ctx, node, 1))
        itemsize = node.outputs[0].dtype.itemsize

        def comm_time(combo: tuple[AxisRole, ...]) -> float:
            total = 0.0
            target = tuple(r.inputs[1] for r in combo)
            for axis, role in enumerate(combo):
                mesh_axis = ctx.mesh.axes[axis]
                if role.name == "classes":
                    local_rows = rows / shard_factor(target, mesh_shape)
                    total += 2 * ctx.cost.all_reduce_time(local_rows * _STAT_BYTES, mesh_axis)
                    total += ctx.cost.all_reduce_time(local_rows * itemsize, mesh_axis)
                elif not role.is_replicate and reduction == _MEAN:
                    total += ctx.cost.all_reduce_time(_STAT_BYTES, mesh_axis)
            return total

        return enumerate_roles(
            ctx, node, roles, comm_time=comm_time, allowed=on_one_axis(lambda n: n == "classes")
        )

    return rule


def gather_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """``gather(x, dim, index)[i…] = x[…index[i…]…]``: shard ``index`` on ``dim`` (``x``
    replicated, gradient ``Partial``), or shard ``x`` and ``index`` alike on another dim of
    equal size."""
    x, index = input_shape(ctx, node, 0), input_shape(ctx, node, 1)
    dim = call_arg(ctx.fx_node(node), 1, "dim") % len(x)
    roles = [AxisRole("index", Shard(dim), (REPLICATE, Shard(dim)))]
    if len(x) == len(index):
        roles += [
            AxisRole(f"d{d}", Shard(d), (Shard(d), Shard(d)))
            for d in range(len(x))
            if d != dim and x[d] == index[d]
        ]
    return enumerate_roles(ctx, node, roles)


def index_select_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """``index_select(x, dim, index)``: shard ``x`` on another dim, or the (1-D) index, which
    shards the output on ``dim``."""
    x = input_shape(ctx, node, 0)
    dim = call_arg(ctx.fx_node(node), 1, "dim") % len(x)
    roles = [AxisRole("index", Shard(dim), (REPLICATE, Shard(0)))]
    roles += [AxisRole(f"d{d}", Shard(d), (Shard(d), REPLICATE)) for d in range(len(x)) if d != dim]
    return enumerate_roles(ctx, node, roles)


RULES: dict[str, StrategyRule] = {
    "aten.embedding.default": embedding_rule,
    "aten.cross_entropy_loss.default": cross_entropy_rule(class_parallel=True),
    "aten.nll_loss.default": cross_entropy_rule(class_parallel=False),
    "aten.nll_loss_nd.default": cross_entropy_rule(class_parallel=False),
    "aten.gather.default": gather_rule,
    "aten.index_select.default": index_select_rule,
    # Advanced indexing with broadcast index tensors; in the captured models it only builds
    # attention masks from integer constants, which are replicated anyway.
    "aten.index.Tensor": replicate_rule,
}
