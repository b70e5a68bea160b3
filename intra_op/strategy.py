"""Sharding strategies: the choices the ILP makes for one node, and what each costs.

A strategy of a node on a logical mesh fixes

* the placement of its output(s) (``output``; a multi-output op places every output alike),
* the placement each tensor input must have when the op runs (``inputs``; the ILP pays for
  redistributing the producer's output to it),
* the placement the gradient of each input comes out of the backward pass in
  (``input_grads``; e.g. a column-parallel linear takes a replicated input and returns a
  ``Partial`` input gradient, so the ILP pays an all-reduce on that edge in backward),
* how many ways its work is split (``work_split``), giving its forward + backward compute time
  on one device through the cost model's roofline (FLOPs and bytes split ``work_split`` ways;
  the kernels each device dispatches, with their fixed cost, do not split),
* collectives the op needs internally, beyond redistributing its inputs (``comm_time_s``).

Strategy *rules* (``intra_op.strategies``) produce the strategies of one aten op. A rule may
declare that the node *follows* one of its inputs (elementwise ops, views): then it returns
exactly one strategy per placement the producer of that input can output, in the same order,
and the ILP gives both nodes one decision variable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from hierarchical_ap.cluster import LogicalMesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.graph import OpGraph, OpNode
from intra_op.placement import Placements


@dataclass(frozen=True)
class OpStrategy:
    """One way to run a node on a mesh (see the module docstring)."""

    name: str
    output: Placements
    inputs: tuple[Placements, ...]
    input_grads: tuple[Placements | None, ...]
    work_split: int
    compute_time_s: float
    comm_time_s: float = 0.0


@dataclass(frozen=True)
class RuleResult:
    """A rule's strategies for one node, and the input it follows (``None``: it decides alone)."""

    strategies: tuple[OpStrategy, ...]
    follows_input: int | None = None


@dataclass(frozen=True)
class StrategyContext:
    """What rules need to know besides the node itself."""

    graph: OpGraph
    mesh: LogicalMesh
    cost: CostModel

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(self.mesh.shape)

    def fx_node(self, node: OpNode) -> fx.Node:
        """The fx node behind ``node`` (its ``args`` hold dims, shapes and flags)."""
        return self.graph.fx_node(node.name)

    def input_meta(self, node: OpNode, index: int):
        """``TensorMeta`` of the node's ``index``-th tensor input."""
        return self.graph.value_meta(node.inputs[index])

    def compute_time(self, node: OpNode, work_split: int) -> float:
        """Forward + backward time of ``node`` with its work split ``work_split`` ways."""
        device = self.mesh.submesh.cluster.device
        backward = self.cost.node_backward_time(
            node.profile, device, node.compute_dtype, work_split
        )
        return self.forward_time(node, work_split) + backward

    def forward_time(self, node: OpNode, work_split: int) -> float:
        """Forward time of ``node`` with its work split ``work_split`` ways."""
        device = self.mesh.submesh.cluster.device
        return self.cost.node_forward_time(node.profile, device, node.compute_dtype, work_split)

    def strategy(
        self,
        node: OpNode,
        name: str,
        output: Placements,
        inputs: Sequence[Placements],
        input_grads: Sequence[Placements | None],
        work_split: int,
        comm_time_s: float = 0.0,
    ) -> OpStrategy:
        """Build an ``OpStrategy`` whose compute time comes from the cost model."""
        return OpStrategy(
            name=name,
            output=tuple(output),
            inputs=tuple(tuple(p) for p in inputs),
            input_grads=tuple(None if g is None else tuple(g) for g in input_grads),
            work_split=work_split,
            compute_time_s=self.compute_time(node, work_split),
            comm_time_s=comm_time_s,
        )


StrategyRule = Callable[[StrategyContext, OpNode, Sequence[Sequence[Placements]]], RuleResult]
"""``rule(ctx, node, producer_outputs) -> RuleResult``.

``producer_outputs[i]`` lists, in order, the output placements the producer of the node's
``i``-th tensor input can take (one per producer strategy); a following rule maps them one by
one.
"""
