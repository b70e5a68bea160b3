"""Sharding strategies of one node: the registry of per-op rules and its entry point.

``node_strategies(ctx, node, producer_outputs)`` dispatches on ``node.target`` (the string of
the aten overload, e.g. ``"aten.linear.default"``, or ``"<built-in function getitem>"``)
through ``STRATEGY_RULES``. The rules live in ``intra_op.rules``, one module per op family:

* ``elementwise``: pointwise ops, casts, dropout, comparisons (followers);
* ``views``: reshape family, transpose/permute, expand, slicing, split/unbind, cat/stack,
  ``getitem`` (followers);
* ``matmul``: ``linear``, ``addmm``, ``mm``, ``bmm``, ``baddbmm``, ``matmul``, ``outer``;
* ``attention``: ``scaled_dot_product_attention``;
* ``norms``: softmax, ``layer_norm``, ``rms_norm``, ``batch_norm`` (followers);
* ``reductions``: ``sum``, ``mean``, ``amax``, ``amin`` (followers);
* ``embedding_loss``: ``embedding``, ``gather``, ``index_select``, ``index``,
  ``cross_entropy_loss``, ``nll_loss``;
* ``conv``: convolutions;
* ``factories``: constants and ``new_*`` / ``*_like``.

An op without a rule runs replicated (one strategy: every input ``Replicate``, output
``Replicate``, work not split), which is always correct; each such op type is logged once.
So does an op whose rule fails on arguments it does not understand (logged with the error).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hierarchical_ap.graph import OpNode
from intra_op.placement import Placements
from intra_op.rules import (
    attention,
    conv,
    elementwise,
    embedding_loss,
    factories,
    matmul,
    norms,
    reductions,
    views,
)
from intra_op.rules.common import replicate_rule
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule

logger = logging.getLogger(__name__)

STRATEGY_RULES: dict[str, StrategyRule] = {}
for _module in (
    elementwise,
    views,
    matmul,
    attention,
    norms,
    reductions,
    embedding_loss,
    conv,
    factories,
):
    STRATEGY_RULES.update(_module.RULES)

_warned: set[str] = set()


def node_strategies(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """The strategies of ``node`` on ``ctx.mesh``.

    ``producer_outputs[i]`` lists, in order, the output placements the producer of the node's
    ``i``-th tensor input can take. A following rule (``RuleResult.follows_input = k``)
    returns exactly one strategy per entry of ``producer_outputs[k]``, in the same order.
    """
    rule = STRATEGY_RULES.get(node.target)
    if rule is None:
        _warn_once(node, "no sharding rule for %s (node %s): it will run replicated")
        return replicate_rule(ctx, node, producer_outputs)
    try:
        return rule(ctx, node, producer_outputs)
    except Exception:  # a rule meeting arguments it does not handle must not stop the planner
        _warn_once(node, "sharding rule for %s failed on node %s: it will run replicated", True)
        return replicate_rule(ctx, node, producer_outputs)


def _warn_once(node: OpNode, message: str, exc_info: bool = False) -> None:
    if node.target not in _warned:
        _warned.add(node.target)
        logger.warning(message, node.target, node.name, exc_info=exc_info)
