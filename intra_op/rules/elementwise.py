"""Elementwise ops (unary, binary with broadcasting, casts, dropout, comparisons): followers.

The op follows its *main* input: the first tensor input with the output's shape (else the
largest). Sharding passes elementwise: ``Shard(d)`` of the main input is ``Shard`` of the
aligned output dim; every other operand takes the output placement broadcast to its shape
(a missing or unit dim is ``Replicate``). Ops that depend on the position along a dim
(``cumsum``, ``diff``, ``triu``/``tril``) need that dim whole, so a shard there is replaced by
``Replicate``.

A ``Partial`` value (each device holds a summand) passes only through ops linear in it, as in
DTensor's pointwise rules:

* ``LINEAR``: ``f(Σ xᵢ) = Σ f(xᵢ)`` (``neg``, ``clone``, ``alias``, float-to-float casts);
* ``ADDITIVE``: ``add``/``sub`` of two tensors, both ``Partial`` (``Σ xᵢ + Σ yᵢ``); adding a
  replicated value or a Python scalar would add it once per device, so that needs
  ``Replicate``;
* ``MUL``: ``(Σ xᵢ)·y = Σ xᵢ·y`` with the other operands ``Replicate``; the other operands'
  gradient ``g·Σ xᵢ`` is then ``Partial``;
* ``DIV``: as ``MUL`` but only through the numerator;
* ``NONE``: nonlinear ops (``gelu``, ``pow``, comparisons, ``dropout``, whose in-place
  ``bernoulli_`` DTensor cannot run on ``Partial``) map ``Partial`` to ``Replicate``.

``_assert_tensor_metadata`` produces no tensor: it keeps its input where it is, costs
nothing and has no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import Enum

from torch import fx

from hierarchical_ap.graph import OpNode
from intra_op.placement import PARTIAL, REPLICATE, Partial, Placements, replicated
from intra_op.rules.common import (
    Grads,
    call_arg,
    default_input_grads,
    follow_input,
    input_shape,
    output_shape,
    replicate_rule,
)
from intra_op.strategy import OpStrategy, RuleResult, StrategyContext, StrategyRule
from intra_op.view_dims import broadcast_dim_map, follow, operand_placements


class PartialRule(Enum):
    """How ``Partial`` passes through an elementwise op (see the module docstring)."""

    NONE = "none"
    LINEAR = "linear"
    CAST = "cast"
    ADDITIVE = "additive"
    MUL = "mul"
    DIV = "div"


BlockedDims = Callable[[fx.Node, int], Sequence[int]]
"""``blocked(fx_node, output_ndim)``: output dims the op needs whole."""


def main_input(ctx: StrategyContext, node: OpNode) -> int:
    """Index of the input an elementwise op follows: the first with the output's shape, else
    the largest (the first of equals)."""
    out = output_shape(node)
    shapes = [input_shape(ctx, node, k) for k in range(len(node.inputs))]
    for k, shape in enumerate(shapes):
        if shape == out:
            return k
    return max(range(len(shapes)), key=lambda k: (math.prod(shapes[k]), -k))


def _partial_passes(ctx: StrategyContext, node: OpNode, rule: PartialRule, main: int) -> bool:
    if rule in (PartialRule.LINEAR, PartialRule.MUL):
        return True
    if rule is PartialRule.CAST:
        return (
            ctx.input_meta(node, main).dtype.is_floating_point
            and node.outputs[0].dtype.is_floating_point
        )
    if rule is PartialRule.ADDITIVE:
        return len(node.inputs) == 2
    if rule is PartialRule.DIV:
        return main == 0
    return False


def pointwise(partial: PartialRule, blocked: BlockedDims | None = None) -> StrategyRule:
    """Rule for an elementwise op (see the module docstring)."""

    def rule(
        ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
    ) -> RuleResult:
        if not node.inputs:
            return replicate_rule(ctx, node, producer_outputs)
        main = main_input(ctx, node)
        out = output_shape(node)
        shapes = [input_shape(ctx, node, k) for k in range(len(node.inputs))]
        dim_map = broadcast_dim_map(shapes[main], out)
        if blocked is not None:
            stop = {d % len(out) for d in blocked(ctx.fx_node(node), len(out))}
            dim_map = tuple(None if o in stop else o for o in dim_map)
        passes = _partial_passes(ctx, node, partial, main)
        others_partial = partial is PartialRule.ADDITIVE

        def mapping(placements: Placements) -> tuple[list[Placements], Placements]:
            accepted, output = follow(
                placements, dim_map, shapes[main], out, ctx.mesh_shape, partial_passes=passes
            )
            inputs = []
            for k, shape in enumerate(shapes):
                if k == main:
                    inputs.append(accepted)
                    continue
                operand = operand_placements(output, shape, out)
                inputs.append(
                    tuple(
                        p if not isinstance(p, Partial) or others_partial else REPLICATE
                        for p in operand
                    )
                )
            return inputs, output

        def grads(output: Placements, inputs: Sequence[Placements]) -> Grads:
            result = default_input_grads(ctx, node, output, inputs)
            if partial not in (PartialRule.MUL, PartialRule.DIV):
                return result
            # g·Σxᵢ: the gradient of an operand multiplied by a Partial value is Partial.
            return tuple(
                g
                if g is None or k == main
                else tuple(
                    PARTIAL if isinstance(o, Partial) else p for p, o in zip(g, output, strict=True)
                )
                for k, g in enumerate(result)
            )

        return follow_input(ctx, node, main, producer_outputs, mapping, grads)

    return rule


def assert_metadata_rule(
    ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
) -> RuleResult:
    """``_assert_tensor_metadata``: a no-op check that keeps its input where it is, at no
    cost."""
    strategies = tuple(
        OpStrategy(
            name="no-op",
            output=tuple(p),
            inputs=(tuple(p),) + tuple(replicated(len(p)) for _ in node.inputs[1:]),
            input_grads=(None,) * len(node.inputs),
            work_split=1,
            compute_time_s=0.0,
        )
        for p in producer_outputs[0]
    )
    return RuleResult(strategies, follows_input=0)


def _dim_arg(index: int, name: str) -> BlockedDims:
    return lambda fx_node, ndim: (call_arg(fx_node, index, name, -1),)


def _last_two_dims(fx_node: fx.Node, ndim: int) -> Sequence[int]:
    return (ndim - 2, ndim - 1)


_LINEAR = ["neg.default", "clone.default", "contiguous.default", "alias.default"]
_LINEAR += ["detach.default", "lift_fresh_copy.default", "positive.default"]
_CAST = ["to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy.default"]
_CAST += ["type_as.default"]
_ADDITIVE = ["add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "add.Scalar", "sub.Scalar"]
_MUL = ["mul.Tensor", "mul_.Tensor", "mul.Scalar", "mul_.Scalar"]
_DIV = ["div.Tensor", "div_.Tensor", "div.Scalar", "div_.Scalar"]
_NONLINEAR_UNARY = """gelu relu relu_ silu silu_ tanh sigmoid exp log log1p sin cos rsqrt sqrt
    reciprocal abs erf sign square logical_not bitwise_not isnan isinf hardtanh leaky_relu elu
    softplus mish""".split()
_NONLINEAR = [f"{op}.default" for op in _NONLINEAR_UNARY]
_NONLINEAR += ["dropout.default", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar"]
_NONLINEAR += ["div.Tensor_mode", "rsub.Scalar", "rsub.Tensor", "clamp.default"]
_NONLINEAR += ["clamp_min.default", "clamp_max.default", "minimum.default", "maximum.default"]
_NONLINEAR += ["where.self", "masked_fill.Scalar", "masked_fill.Tensor", "remainder.Scalar"]
_NONLINEAR += ["floor_divide.default", "__and__.Tensor", "__or__.Tensor", "bitwise_and.Tensor"]
_NONLINEAR += ["bitwise_or.Tensor", "logical_and.default", "logical_or.default"]
_NONLINEAR += [
    f"{cmp}.{kind}" for cmp in ("eq", "ne", "lt", "le", "gt", "ge") for kind in ("Tensor", "Scalar")
]

RULES: dict[str, StrategyRule] = {
    "aten._assert_tensor_metadata.default": assert_metadata_rule,
    "aten.cumsum.default": pointwise(PartialRule.NONE, _dim_arg(1, "dim")),
    "aten.diff.default": pointwise(PartialRule.NONE, _dim_arg(2, "dim")),
    "aten.triu.default": pointwise(PartialRule.NONE, _last_two_dims),
    "aten.tril.default": pointwise(PartialRule.NONE, _last_two_dims),
}
for _names, _rule in (
    (_LINEAR, PartialRule.LINEAR),
    (_CAST, PartialRule.CAST),
    (_ADDITIVE, PartialRule.ADDITIVE),
    (_MUL, PartialRule.MUL),
    (_DIV, PartialRule.DIV),
    (_NONLINEAR, PartialRule.NONE),
):
    for _name in _names:
        RULES[f"aten.{_name}"] = pointwise(_rule)
