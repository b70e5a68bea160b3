"""Matrix products (``linear``, ``addmm``, ``mm``, ``bmm``, ``baddbmm``, ``matmul``, ``outer``)
as einsums: every tensor dim carries a label, and a mesh axis shards one label.

With ``y[..., n] = Σ_k x[..., k] · W[n, k] (+ b[n])`` for ``linear``, sharding on one axis

* a batch label of ``x`` (data / sequence parallel): ``x`` and ``y`` ``Shard`` it, ``W``
  replicated, ``W``'s gradient a ``Partial`` sum over the local rows;
* the output-feature label ``n`` (column parallel): ``W`` (and ``b``) ``Shard(0)``, ``x``
  replicated, ``y`` ``Shard(-1)``; ``x``'s gradient ``Σ_n g·W`` is ``Partial``;
* the contraction label ``k`` (row parallel): ``x`` ``Shard(-1)`` and ``W`` ``Shard(1)``,
  each device sums over its slice of ``k`` so ``y`` is ``Partial``. An added bias is taken
  ``Partial`` too (DTensor's addmm rule: ``Replicate → Partial`` keeps ``b/n`` per device, so
  the sum adds it exactly once) and its gradient, like the inputs' of a ``Partial`` output,
  is replicated;

and the product of the roles over the two mesh axes (the same label on both axes when its
size divides by both). The FLOPs split over every axis that shards a label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hierarchical_ap.graph import OpNode
from intra_op.placement import PARTIAL, REPLICATE, Placement, Placements, Shard
from intra_op.rules.common import AxisRole, enumerate_roles, input_shape, on_one_axis, output_shape
from intra_op.strategy import RuleResult, StrategyContext, StrategyRule

Labels = tuple[str | None, ...]
"""One label per tensor dim; ``None`` for a unit dim that broadcasts (never sharded)."""


@dataclass(frozen=True)
class Einsum:
    """Labels of every tensor input (``OpNode.inputs`` order) and of the output; ``addends``
    are the inputs added to the product (biases)."""

    operands: tuple[Labels, ...]
    output: Labels
    addends: frozenset[int] = frozenset()


def _aligned(shape: Sequence[int], out_labels: Labels, out_shape: Sequence[int]) -> Labels:
    """Labels of an operand broadcast against the output (aligned from the right)."""
    offset = len(out_shape) - len(shape)
    return tuple(
        out_labels[d + offset] if d + offset >= 0 and s == out_shape[d + offset] else None
        for d, s in enumerate(shape)
    )


def _batch(n: int) -> tuple[str, ...]:
    return tuple(f"b{i}" for i in range(n))


def _linear(ctx: StrategyContext, node: OpNode) -> Einsum:
    """``linear(x[..., k], W[n, k], b[n]?)`` (``W[k]`` without ``n`` for a 1-D weight)."""
    x = input_shape(ctx, node, 0)
    batch = _batch(len(x) - 1)
    features: Labels = ("n",) if len(input_shape(ctx, node, 1)) == 2 else ()
    out = batch + features
    operands: list[Labels] = [batch + ("k",), features + ("k",)]
    if len(node.inputs) == 3:
        operands.append(_aligned(input_shape(ctx, node, 2), out, output_shape(node)))
    return Einsum(tuple(operands), out, frozenset({2}))


def _addmm(ctx: StrategyContext, node: OpNode) -> Einsum:
    """``addmm(b, x[m, k], W[k, n])`` and ``baddbmm(b, x[B, m, k], W[B, k, n])``."""
    batch = _batch(len(input_shape(ctx, node, 1)) - 2)
    out = batch + ("m", "n")
    bias = _aligned(input_shape(ctx, node, 0), out, output_shape(node))
    return Einsum((bias, batch + ("m", "k"), batch + ("k", "n")), out, frozenset({0}))


def _mm(ctx: StrategyContext, node: OpNode) -> Einsum:
    """``mm(x[m, k], W[k, n])`` and ``bmm(x[B, m, k], W[B, k, n])``."""
    batch = _batch(len(input_shape(ctx, node, 0)) - 2)
    return Einsum((batch + ("m", "k"), batch + ("k", "n")), batch + ("m", "n"))


def _matmul(ctx: StrategyContext, node: OpNode) -> Einsum:
    """``matmul(a, b)`` with NumPy broadcasting of the batch dims and 1-D operands."""
    a, b = input_shape(ctx, node, 0), input_shape(ctx, node, 1)
    out_shape = output_shape(node)
    a_core: Labels = ("m", "k") if len(a) > 1 else ("k",)
    b_core: Labels = ("k", "n") if len(b) > 1 else ("k",)
    out_core = tuple(lab for lab in (a_core[0], b_core[-1]) if lab != "k")
    out = _batch(len(out_shape) - len(out_core)) + out_core
    batch_shape = out_shape[: len(out) - len(out_core)]
    batch = out[: len(batch_shape)]
    a_batch = _aligned(a[: len(a) - len(a_core)], batch, batch_shape)
    b_batch = _aligned(b[: len(b) - len(b_core)], batch, batch_shape)
    return Einsum((a_batch + a_core, b_batch + b_core), out)


def _outer(ctx: StrategyContext, node: OpNode) -> Einsum:
    """``outer(a[i], b[j]) = a[i]·b[j]``."""
    return Einsum((("i",), ("j",)), ("i", "j"))


def _roles(ctx: StrategyContext, node: OpNode, spec: Einsum) -> list[AxisRole]:
    """One role per label whose size exceeds 1."""
    sizes: dict[str, int] = {}
    for k, labels in enumerate(spec.operands):
        for label, size in zip(labels, input_shape(ctx, node, k), strict=True):
            if label is not None:
                sizes[label] = size
    roles = []
    for label, size in sizes.items():
        if size == 1:
            continue
        output: Placement = Shard(spec.output.index(label)) if label in spec.output else PARTIAL
        inputs: list[Placement] = []
        for k, labels in enumerate(spec.operands):
            if label in labels:
                inputs.append(Shard(labels.index(label)))
            elif k in spec.addends and output == PARTIAL:
                inputs.append(PARTIAL)
            else:
                inputs.append(REPLICATE)
        roles.append(AxisRole(label, output, tuple(inputs)))
    return roles


def _is_inner_batch(label: str) -> bool:
    return label.startswith("b") and label != "b0"


def einsum_rule(
    spec_of: Callable[[StrategyContext, OpNode], Einsum], flattens_batch: bool = False
) -> StrategyRule:
    """Rule enumerating one sharded label (or replication) per mesh axis. DTensor runs
    ``linear``/``matmul`` (``flattens_batch``) by flattening the batch dims of the input; a
    non-leading batch dim sharded over both mesh axes would become a ``_StridedShard`` it
    cannot unflatten again, so such a label may shard only one axis."""

    def rule(
        ctx: StrategyContext, node: OpNode, producer_outputs: Sequence[Sequence[Placements]]
    ) -> RuleResult:
        roles = _roles(ctx, node, spec_of(ctx, node))
        allowed = on_one_axis(_is_inner_batch) if flattens_batch else None
        return enumerate_roles(ctx, node, roles, allowed=allowed)

    return rule


RULES: dict[str, StrategyRule] = {
    "aten.linear.default": einsum_rule(_linear, flattens_batch=True),
    "aten.addmm.default": einsum_rule(_addmm),
    "aten.baddbmm.default": einsum_rule(_addmm),
    "aten.mm.default": einsum_rule(_mm),
    "aten.bmm.default": einsum_rule(_mm),
    "aten.matmul.default": einsum_rule(_matmul, flattens_batch=True),
    "aten.outer.default": einsum_rule(_outer),
}
