"""When a sharded part of a graph can run as plain tensor code on each device's local shards.

DTensor costs a dispatch per op (tens of microseconds on CPU) on top of the op itself. A part
whose forward DTensor runs without a single collective, with every parameter and buffer
replicated, is data parallelism: each device computes on its own rows of the batch, and
DTensor's sharding rules do what the aten op does on the local tensors. Such a part runs as
the compiled plain graph module of ``intra_op.plain_part`` on the local shards (as DDP runs the
unmodified module on each rank's batch shard), built from a *local graph*: the same program
captured at the local batch, whose shapes (a view's target shape…) are the local ones. Only
the parameters' gradients need a collective: a sum along the mesh axes that split the batch,
once per step.

A part qualifies (``local_execution`` returns a ``LocalExecution``; otherwise the reason it
does not) when:

1. every parameter and buffer it reads is replicated on every mesh axis;
2. its forward ran without collectives when ``propagate_solution`` recorded the solution
   (``ShardingSolution.forward_collectives == 0``);
3. every value entering it from outside is ``Shard(0)`` or replicated on every axis;
4. where one is split (the *batch axes*), a local graph is given that has the global graph's
   nodes, in order, and gives every value entering or computed in the part the shape of its
   local piece under DTensor (the global shape, each ``Shard(d)`` dim divided by its axes'
   sizes): then the local graph computes each device's pieces, not values of other shapes
   (DTensor cutting a replicated operand, ``arange(B)`` at the global size…);
5. along every batch axis, every value leaving the part is ``Shard`` or a ``Partial`` ``sum``
   / ``avg``: each device's local value is then its own piece of the global one, computed
   from its own rows alone.

The gradients then follow from the chain rule on the sum of the devices' pieces. A value
``y`` leaving the part in pieces ``y_r`` (shards, or summands of a ``Partial`` sum) has
``dL/dθ = Σ_r (∂y_r/∂θ)ᵀ dL/dy_r`` for a replicated parameter θ: each device's local
backward gives its own term, and the terms are summed along the batch axes
(``gradient_placements``: ``Partial`` sum there, replicated elsewhere, where every device
computes the same full value). A ``Partial`` ``avg`` over ``k`` devices is
``y = (1/k) Σ_r y_r``, so its local gradient is scaled by ``1/k`` (``gradient_scale``) before
the local backward.

A loss that is a mean over the batch (DTensor's ``Partial`` ``avg``) is then the mean of the
devices' own means, as under DDP: the mean over the whole batch when every device counts as
many terms, not when a loss ignores targets (``ignore_index``) in unequal numbers on the
devices.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hierarchical_ap.graph import OpGraph
from intra_op.placement import (
    Partial,
    Placements,
    Replicate,
    Shard,
    format_placements,
    normalize,
    replicated,
)
from intra_op.solution import ShardingSolution

__all__ = ["LocalExecution", "ScaledGradient", "local_execution", "local_shape"]


@dataclass(frozen=True)
class LocalExecution:
    """How a qualifying part runs on local shards (module docstring)."""

    batch_axes: tuple[int, ...]
    """Mesh axes that split the batch (condition 4)."""
    gradient_placements: Placements
    """Every parameter's gradient as the local backward leaves it: ``Partial`` sum on the
    batch axes, replicated elsewhere."""
    mesh_shape: tuple[int, ...]

    def gradient_scale(self, placements: Placements) -> float:
        """The factor on the gradient of a value leaving the part in ``placements``: ``1/k``
        over the ``k`` devices of the axes where it is a ``Partial`` average, else 1."""
        return 1.0 / math.prod(
            self.mesh_shape[axis]
            for axis, p in enumerate(placements)
            if isinstance(p, Partial) and p.reduce_op == "avg"
        )


def local_execution(
    graph: OpGraph,
    solution: ShardingSolution,
    mesh_shape: Sequence[int],
    part: Collection[str] | None,
    reads: Mapping[str, tuple[str, str]],
    local_graph: OpGraph | None,
) -> LocalExecution | str:
    """The ``LocalExecution`` of the part (``part``: its node names, ``None`` for the whole
    graph) when it qualifies, else the reason it does not: the first condition of the module
    docstring it breaks. ``reads`` maps each graph input the part reads to its kind
    (``parameter`` | ``buffer`` | ``constant`` | ``input``) and key (a parameter's FQN);
    ``local_graph`` is the program captured at the local batch (``None``: none)."""
    ndim = len(mesh_shape)
    for name, (kind, key) in reads.items():
        if kind == "parameter":
            placements, what = solution.param_placements[key], f"parameter '{key}'"
        elif kind == "buffer":
            placements = solution.input_placements.get(name, replicated(ndim))
            what = f"buffer '{key}'"
        else:
            continue
        if any(not p.is_replicate() for p in placements):
            return f"{what} is stored {format_placements(placements)}, not replicated"
    if solution.forward_collectives is None:
        return "its solution was not recorded by propagate_solution (collectives unknown)"
    if solution.forward_collectives:
        return f"its forward runs {solution.forward_collectives} collective(s) under DTensor"
    entering = _entering_placements(graph, solution, part, reads)
    for name, placements in entering.items():
        if any(not (p.is_replicate() or p == Shard(0)) for p in placements):
            return f"value '{name}' enters as {format_placements(placements)}, not S0 or R"
    batch_axes = tuple(
        sorted({axis for ps in entering.values() for axis, p in enumerate(ps) if p.is_shard()})
    )
    if batch_axes:
        mismatch = _local_shape_mismatch(graph, local_graph, solution, mesh_shape, part, entering)
        if mismatch is not None:
            return mismatch
        for name in _leaving_values(graph, part):
            placements = solution.node_outputs.get(name)
            for axis in batch_axes if placements is not None else ():
                p = placements[axis]
                if not (isinstance(p, Shard) or (isinstance(p, Partial) and p.reduce_op in _SUMS)):
                    return (
                        f"value '{name}' leaves as {format_placements(placements)}, not a "
                        f"piece of the batch on mesh axis {axis}"
                    )
    return LocalExecution(
        batch_axes=batch_axes,
        gradient_placements=tuple(
            Partial("sum") if axis in batch_axes else Replicate() for axis in range(ndim)
        ),
        mesh_shape=tuple(mesh_shape),
    )


_SUMS = frozenset({"sum", "avg"})


def local_shape(shape: Sequence[int], placements: Placements, mesh_shape: Sequence[int]) -> tuple:
    """The shape of one device's piece of a value of ``shape`` placed ``placements`` (evenly
    split: every sharded dim divided by the sizes of the axes that shard it)."""
    local = list(shape)
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            local[p.dim] //= mesh_shape[axis]
    return tuple(local)


def _local_shape_mismatch(
    graph: OpGraph,
    local_graph: OpGraph | None,
    solution: ShardingSolution,
    mesh_shape: Sequence[int],
    part: Collection[str] | None,
    entering: Mapping[str, Placements],
) -> str | None:
    """Condition 4: why the local graph does not compute the devices' pieces, or ``None``."""
    if local_graph is None:
        return "no graph at the local batch was given to run a batch shard"
    global_nodes = list(graph.graph_module.graph.nodes)
    local_nodes = list(local_graph.graph_module.graph.nodes)
    if [(n.op, n.name, n.target) for n in global_nodes] != [
        (n.op, n.name, n.target) for n in local_nodes
    ]:
        return "the graph captured at the local batch has other nodes than the global one"
    everywhere = replicated(len(mesh_shape))
    placed = {**entering}
    for node in global_nodes:
        if node.op == "call_function" and (part is None or node.name in part):
            placed[node.name] = solution.node_outputs.get(node.name, everywhere)
    local_by_name = {n.name: n for n in local_nodes}
    for node in global_nodes:
        if node.name not in placed:
            continue
        wanted = [
            local_shape(shape, normalize(placed[node.name], len(shape)), mesh_shape)
            for shape in _shapes(node)
        ]
        found = _shapes(local_by_name[node.name])
        if wanted != found:
            return (
                f"value '{node.name}' has shape {found} in the local graph but {wanted} as "
                f"the local piece of its {format_placements(placed[node.name])} placement"
            )
    return None


def _shapes(node: fx.Node) -> list[tuple[int, ...]]:
    """The shapes of the tensors a node holds (one per tensor output)."""
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else (value,)
    return [tuple(int(s) for s in v.shape) for v in values if isinstance(v, torch.Tensor)]


def _entering_placements(
    graph: OpGraph,
    solution: ShardingSolution,
    part: Collection[str] | None,
    reads: Mapping[str, tuple[str, str]],
) -> dict[str, Placements]:
    """Placements of the values entering the part: graph inputs it reads and outside nodes'
    outputs its nodes read (replicated where the solution names none)."""
    names = [name for name, (kind, _) in reads.items() if kind == "input"]
    if part is not None:
        for node in graph.graph_module.graph.nodes:
            if node.name in part:
                names += [
                    a.name
                    for a in node.all_input_nodes
                    if a.op != "placeholder" and a.name not in part
                ]
    everywhere = replicated(len(solution.mesh_shape))
    return {name: solution.input_placements.get(name, everywhere) for name in dict.fromkeys(names)}


def _leaving_values(graph: OpGraph, part: Collection[str] | None) -> list[str]:
    """Names of the part's nodes whose values are read outside it or are graph outputs."""
    return [
        node.name
        for node in graph.graph_module.graph.nodes
        if node.op == "call_function"
        and (part is None or node.name in part)
        and any(u.op == "output" or (part is not None and u.name not in part) for u in node.users)
    ]


class ScaledGradient(torch.autograd.Function):
    """The identity forward; the gradient multiplied by ``scale`` backward (a ``Partial``
    average's ``1/k``)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None
