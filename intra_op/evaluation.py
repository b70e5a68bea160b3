"""The evaluation form of a captured training program: ``model.eval()`` without a new capture.

A program captured in training mode carries the mode in the arguments of a few ops. Evaluation
runs the same nodes (so the same stages, shardings and parameters) with those ops switched as
``model.eval()`` switches them:

1. dropout (``aten.dropout``, ``feature_dropout``, ``alpha_dropout``,
   ``feature_alpha_dropout``: ``(input, p, train)``) passes its input through;
2. a training batch norm that tracks running statistics (``is_training_batch_norm``)
   normalises with them, which it then leaves as they are; one without running statistics
   normalises by the batch in evaluation too, as ``model.eval()`` leaves it;
3. ``scaled_dot_product_attention`` runs with ``dropout_p = 0``;
4. any other op that writes into a buffer in place, its first argument (batch norm's
   ``num_batches_tracked += 1``), passes that argument through unchanged.

A Python branch on ``self.training`` in the model's code, other than through these ops, keeps
the branch it took at capture.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import fx

DROPOUTS = frozenset(
    {
        torch.ops.aten.dropout.default,
        torch.ops.aten.feature_dropout.default,
        torch.ops.aten.alpha_dropout.default,
        torch.ops.aten.feature_alpha_dropout.default,
    }
)
BATCH_NORMS = frozenset(
    {torch.ops.aten.batch_norm.default, torch.ops.aten.native_batch_norm.default}
)
ATTENTION = torch.ops.aten.scaled_dot_product_attention.default
_BATCH_NORM_TRAINING = 5
_ATTENTION_DROPOUT = 4

Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
"""An op and its arguments."""


def is_training_batch_norm(node: fx.Node) -> bool:
    """A batch norm that updates running statistics (``args``: input, weight, bias,
    running_mean, running_var, training, …)."""
    return (
        node.target in BATCH_NORMS
        and bool(node.args[_BATCH_NORM_TRAINING])
        and node.args[3] is not None
    )


def pass_through(value: Any, *_: Any, **__: Any) -> Any:
    """Its first argument, unchanged (the evaluation form of rules 1 and 4)."""
    return value


def evaluation_call(
    node: fx.Node, args: tuple[Any, ...], kwargs: Mapping[str, Any], writes_buffer: bool
) -> Call | None:
    """The call that evaluates ``node`` (whose arguments are ``args`` / ``kwargs``), or
    ``None`` where it is the training call; ``writes_buffer``: the node writes into a buffer
    in place, through its first argument (rule 4)."""
    target = node.target
    if target in DROPOUTS:
        return pass_through, tuple(args), dict(kwargs)
    if is_training_batch_norm(node):
        switched = list(args)
        switched[_BATCH_NORM_TRAINING] = False
        return target, tuple(switched), dict(kwargs)
    if target is ATTENTION:
        if kwargs.get("dropout_p"):
            return target, tuple(args), {**kwargs, "dropout_p": 0.0}
        if len(args) > _ATTENTION_DROPOUT and args[_ATTENTION_DROPOUT]:
            switched = list(args)
            switched[_ATTENTION_DROPOUT] = 0.0
            return target, tuple(switched), dict(kwargs)
        return None
    if writes_buffer:
        return pass_through, tuple(args), dict(kwargs)
    return None


def evaluation_calls(
    call_args: Mapping[fx.Node, tuple[Any, Any]],
    buffer_writers: Collection[fx.Node],
) -> dict[fx.Node, Call]:
    """Node → its evaluation call, for the nodes of ``call_args`` (node → (args, kwargs))
    whose evaluation differs from training; ``buffer_writers``: the nodes that write into a
    buffer through their first argument."""
    calls = {}
    for node, (args, kwargs) in call_args.items():
        call = evaluation_call(node, tuple(args), kwargs, node in buffer_writers)
        if call is not None:
            calls[node] = call
    return calls
