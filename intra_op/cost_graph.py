"""From a captured graph to a ``ShardingProblem``: decision groups, costs, memory, edges.

Every value producer of the (sub)graph becomes a chooser of placements:

* a parameter chooses its storage placement among every valid combination of ``Replicate`` and
  ``Shard(d)`` per mesh axis; its memory is ``bytes / shard × (1 + gradient_factor +
  optimizer_factor)`` (weights, gradients and optimizer states are sharded alike: a parameter
  sharded along a data-parallel axis is ZeRO-3);
* a graph input (or a value produced outside the sub-graph being solved) chooses among the same
  placements, at no cost; it occupies its local bytes of device memory;
* a call node chooses among the strategies of its rule (``intra_op.strategies``); its memory is
  the activations it keeps for backward: its output, divided by the output's shard factor,
  when some consumer saves it, plus its internal saved buffers divided by its work split.

Edges carry resharding. For input ``k`` of node ``v`` produced by ``p``, with ``p`` choosing
``i`` and ``v`` choosing ``j``:

    R[i, j] = f · reshard(out_p[i] → in_v[j][k])  +  reshard(grad_v[j][k] → grad(out_p[i]))

forward then backward, where ``f = 2`` for parameters (a gathered ZeRO-3 weight is freed after
its forward use and gathered again for backward) and 1 otherwise. The backward term is the
gradient all-reduce of data parallelism, the reduce-scatter of ZeRO, or the input-gradient
all-reduce of a column-parallel layer, depending on the choices.

A node that follows one of its inputs shares that producer's decision group; resharding
between members of one group is added to the group's cost on the diagonal.

Gradient accumulation: with ``num_microbatches = B``, the problem prices one micro-batch. A
parameter's gradient is accumulated locally between micro-batches and its synchronisation is
split per mesh axis (``resharding.accumulated_gradient_times``): along an axis that *replicates*
the parameter (data parallelism, including the data-parallel axis of a Megatron
tensor-parallel weight stored ``(R, S(0))``) the all-reduce runs once per step and is charged
``1/B`` per micro-batch; along an axis that *shards* it (ZeRO) the reduce-scatter runs every
micro-batch (as FSDP and DeepSpeed ZeRO-3 do) and is charged in full. The backward term of a
parameter edge is the cheaper of that split,

    per_microbatch(g → staged) + per_step(staged → w) / B,

and the plain resharding ``g → w`` every micro-batch (a different order of the axes can be
cheaper when ``B = 1``).

With ``zero`` (an ``intra_op.zero.ZeroStage``) the parameters' storage choices, state memory
and gradient synchronisation follow that ZeRO stage over mesh axis 0 instead.

DTensor dispatch. On a mesh of several devices the runtime runs a stage on DTensors, whose
dispatch costs ``d = DeviceSpec.dtensor_dispatch_s`` per op on the host, unless the stage is
plain data parallelism (every parameter replicated: ``intra_op.local_execution``), which runs
as plain local tensor code. ``CostGraph.dispatch_s`` is that charge for the sub-graph,

    D = d · (N_fwd + N_bwd),

``N_fwd`` its executed forward ops and ``N_bwd`` the aten kernels of its backward, and
``replicated_params`` gives each parameter group's fully replicated choices; ``intra_op.solve``
adds ``D`` to every assignment but those (see there).

``CostGraph.breakdown`` splits a chosen assignment's cost into what the outer planner needs:
the forward share of the time (what full recomputation repeats), the gradient synchronisation
per step, and memory as training state (parameters, gradients, optimizer) versus activations
kept per micro-batch.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hierarchical_ap.cluster import LogicalMesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.profile import METADATA_CHECKS, TensorMeta
from intra_op.ilp import ShardingProblem
from intra_op.placement import REPLICATE, Placements, Shard, is_valid, shard_factor
from intra_op.resharding import accumulated_gradient_times, gradient_placements, reshard_time
from intra_op.strategies import node_strategies
from intra_op.strategy import OpStrategy, StrategyContext
from intra_op.zero import ZeroStage

TIE_BREAK_S = 1e-9
"""A nanosecond that breaks ties between plans of equal time (Alpa uses small constants too):
charged to sharded parameter storage, so that parameters stay replicated unless memory asks
otherwise, and to a graph input in proportion to the fraction of it each device is fed, so
that each device loads only its part of the batch."""


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of training state per byte of parameter (in the dtype the graph was captured in).

    A parameter of ``w`` bytes costs ``w · (1 + gradient_factor + optimizer_factor)`` bytes:
    fp32 Adam keeps one fp32 gradient and two fp32 moments (factors 1 and 2, 16 bytes per
    parameter); see ``for_training`` for mixed precision.
    """

    gradient_factor: float = 1.0
    optimizer_factor: float = 2.0
    optimizer: str = "adam"
    """The optimizer these moments belong to (``hierarchical_ap.profile.optimizer_update_profile``
    prices its step)."""

    @classmethod
    def for_training(
        cls,
        param_dtype: torch.dtype,
        *,
        optimizer: str = "adam",
        fp32_gradients: bool = False,
    ) -> TrainingMemory:
        """The factors of a training recipe, counted as the ZeRO paper does.

        With 16-bit weights (bf16/fp16) the optimizer keeps fp32 master weights: Adam adds
        4 + 4 + 4 bytes to the 2-byte weight and 2-byte gradient, 16 bytes per parameter, or 18
        when gradients accumulate in fp32 (Megatron-LM). With fp32 weights there is no master
        copy: Adam is 4 + 4 + 4 + 4 = 16, SGD with momentum 12, plain SGD 8.
        """
        moments = {"adam": 2, "adamw": 2, "sgd-momentum": 1, "sgd": 0}
        if optimizer not in moments:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(moments)}")
        width = param_dtype.itemsize
        gradient_bytes = 4 if fp32_gradients else width
        master_bytes = 4 if width < 4 else 0
        optimizer_bytes = master_bytes + 4 * moments[optimizer]
        return cls(gradient_bytes / width, optimizer_bytes / width, optimizer)

    def bytes_per_parameter(self, param_dtype: torch.dtype) -> float:
        return param_dtype.itemsize * (1 + self.gradient_factor + self.optimizer_factor)


FP32_ADAM = TrainingMemory()


@dataclass
class Chooser:
    """One producer of values and the placements (or strategies) it can choose."""

    name: str
    group: int
    outputs: list[Placements]
    strategies: list[OpStrategy] | None = None
    kind: str = "node"
    """``"param"``, ``"input"`` (graph input or value from outside the sub-graph) or ``"node"``."""


@dataclass(frozen=True)
class CostBreakdown:
    """What one assignment of a ``CostGraph`` costs, split the way the outer planner needs."""

    time_s: float
    """Forward + backward time of one micro-batch, gradient sync amortised (the ILP objective)."""
    forward_time_s: float
    """The forward pass alone: compute, intrinsic collectives and forward resharding."""
    gradient_sync_s: float
    """Gradient synchronisation of replicated parameters, once per step (not amortised)."""
    state_bytes: float
    """Parameters, gradients and optimizer states per device."""
    activation_bytes: float
    """Activations (and inputs) kept for backward per device, for one micro-batch."""


@dataclass
class CostGraph:
    """The ILP's view of a graph: choosers, and per decision group its members."""

    choosers: dict[str, Chooser]
    problem: ShardingProblem
    groups: list[list[str]] = field(default_factory=list)
    forward_costs: list[np.ndarray] = field(default_factory=list)
    forward_edges: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    sync_edges: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    state_groups: frozenset[int] = frozenset()
    replicated_params: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Parameter group → the indices of its choices that replicate on every mesh axis."""
    dispatch_s: tuple[float, float] = (0.0, 0.0)
    """DTensor's dispatch charge ``D`` (forward, backward) of one micro-batch: 0 on a
    one-device mesh or a device without one (module docstring)."""

    def breakdown(self, choice: Sequence[int]) -> CostBreakdown:
        """Time and memory of the assignment ``choice`` (one index per decision group)."""

        def edge_sum(edges: list[tuple[int, int, np.ndarray]]) -> float:
            return sum(float(matrix[choice[u], choice[w]]) for u, w, matrix in edges)

        problem = self.problem
        time_s = sum(float(c[i]) for c, i in zip(problem.costs, choice, strict=True))
        memory = [float(m[i]) for m, i in zip(problem.memory, choice, strict=True)]
        state = sum(memory[g] for g in self.state_groups)
        return CostBreakdown(
            time_s=time_s + edge_sum(problem.edges),
            forward_time_s=sum(float(c[i]) for c, i in zip(self.forward_costs, choice, strict=True))
            + edge_sum(self.forward_edges),
            gradient_sync_s=edge_sum(self.sync_edges),
            state_bytes=state,
            activation_bytes=sum(memory) - state,
        )


def parameter_state_bytes(
    meta: TensorMeta,
    stored: Placements,
    mesh_shape: Sequence[int],
    training_memory: TrainingMemory,
    zero: ZeroStage | None = None,
    frozen: bool = False,
) -> float:
    """Training state of one parameter per device when stored as ``stored``: its bytes times
    ``1 + gradient_factor + optimizer_factor`` over the shard factor, or as ``zero`` splits it;
    a ``frozen`` parameter (no gradient, no optimizer state) is its bytes alone."""
    factors = (
        (0.0, 0.0)
        if frozen
        else (training_memory.gradient_factor, training_memory.optimizer_factor)
    )
    if zero is not None:
        return zero.state_bytes(meta, stored, mesh_shape, *factors).total
    return meta.nbytes * (1 + sum(factors)) / shard_factor(stored, mesh_shape)


def candidate_placements(meta: TensorMeta, mesh_shape: Sequence[int]) -> list[Placements]:
    """Every valid placement of a tensor that only replicates or shards (no Partial)."""
    per_axis = [
        [REPLICATE] + ([Shard(d) for d in range(len(meta.shape))] if size > 1 else [])
        for size in mesh_shape
    ]
    return [p for p in itertools.product(*per_axis) if is_valid(meta.shape, p, mesh_shape)]


def build_cost_graph(
    graph: OpGraph,
    mesh: LogicalMesh,
    cost: CostModel,
    *,
    nodes: Iterable[str] | None = None,
    memory_budget_bytes: float | None = None,
    training_memory: TrainingMemory = FP32_ADAM,
    num_microbatches: int = 1,
    zero: ZeroStage | None = None,
) -> CostGraph:
    """Build the ILP of ``graph`` (or of the sub-graph made of ``nodes``) on ``mesh``, pricing
    one of ``num_microbatches`` micro-batches of a step; ``zero`` constrains the parameters to a
    ZeRO stage over mesh axis 0 (``intra_op.zero``), else the ILP chooses their storage."""
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
    selected = list(graph.nodes) if nodes is None else [n for n in graph.nodes if n in set(nodes)]
    ctx = StrategyContext(graph, mesh, cost)
    mesh_shape = tuple(mesh.shape)
    saved_roots = graph.saved_roots(selected)
    builder = _ProblemBuilder(mesh, cost, num_microbatches, zero)
    choosers: dict[str, Chooser] = {}
    param_groups: dict[str, int] = {}

    def producer(value: str) -> Chooser:
        if value in choosers:
            return choosers[value]
        meta = graph.value_meta(value)
        outputs = candidate_placements(meta, mesh_shape)
        if value in graph.value_to_param:
            fqn = graph.value_to_param[value]
            if zero is not None:
                outputs = zero.storage_choices(meta, outputs, mesh_shape)
            if fqn in param_groups:  # tied weights: one decision for every placeholder
                group = param_groups[fqn]
            else:
                group = builder.new_group(
                    np.array([TIE_BREAK_S * (shard_factor(p, mesh_shape) > 1) for p in outputs]),
                    np.array(
                        [
                            parameter_state_bytes(
                                meta,
                                p,
                                mesh_shape,
                                training_memory,
                                zero,
                                fqn in graph.frozen_params,
                            )
                            for p in outputs
                        ]
                    ),
                )
                builder.state_groups.add(group)
                param_groups[fqn] = group
            chooser = Chooser(value, group, outputs, kind="param")
        else:
            local = np.array([meta.nbytes / shard_factor(p, mesh_shape) for p in outputs])
            group = builder.new_group(TIE_BREAK_S * local / max(meta.nbytes, 1), local)
            chooser = Chooser(value, group, outputs, kind="input")
        builder.members[group].append(value)
        choosers[value] = chooser
        return chooser

    for name in selected:
        node = graph.nodes[name]
        inputs = [producer(value) for value in node.inputs]
        result = node_strategies(ctx, node, [p.outputs for p in inputs])
        strategies = list(result.strategies)
        memory = np.array(
            [_activation_bytes(graph, name, s, saved_roots, mesh_shape) for s in strategies]
        )
        own = np.array([s.compute_time_s + s.comm_time_s for s in strategies])
        forward = np.array(
            [ctx.forward_time(node, s.work_split) + s.comm_time_s for s in strategies]
        )
        if result.follows_input is not None:
            leader = inputs[result.follows_input]
            if len(strategies) != len(leader.outputs):
                raise ValueError(
                    f"rule for {node.target} at {name} follows input {result.follows_input} but returned "
                    f"{len(strategies)} strategies for {len(leader.outputs)} producer placements"
                )
            group = leader.group
            builder.add_to_group(group, own, memory, forward)
        else:
            group = builder.new_group(own, memory, forward)
        builder.members[group].append(name)
        chooser = Chooser(name, group, [s.output for s in strategies], strategies)
        choosers[name] = chooser
        for index, source in enumerate(inputs):
            builder.add_edge(graph, source, chooser, index)

    problem = ShardingProblem(builder.costs, builder.memory, builder.edges, memory_budget_bytes)
    return CostGraph(
        choosers,
        problem,
        builder.members,
        forward_costs=builder.forward_costs,
        forward_edges=builder.forward_edges,
        sync_edges=builder.sync_edges,
        state_groups=frozenset(builder.state_groups),
        replicated_params={
            chooser.group: tuple(
                i for i, p in enumerate(chooser.outputs) if all(x.is_replicate() for x in p)
            )
            for chooser in choosers.values()
            if chooser.kind == "param"
        },
        dispatch_s=dispatch_time(graph, selected, mesh),
    )


def dispatch_time(graph: OpGraph, nodes: Sequence[str], mesh: LogicalMesh) -> tuple[float, float]:
    """DTensor's dispatch charge ``(d·N_fwd, d·N_bwd)`` of ``nodes`` on ``mesh`` (module
    docstring): ``N_fwd`` counts the executed ops (not metadata checks, nor ``getitem``, which
    indexes a tuple in Python), ``N_bwd`` the backward kernels of the nodes' profiles."""
    d = mesh.submesh.cluster.device.dtensor_dispatch_s
    if d == 0 or mesh.shape[0] * mesh.shape[1] == 1:
        return 0.0, 0.0
    executed = [
        graph.nodes[name]
        for name in nodes
        if graph.fx_node(name).target not in METADATA_CHECKS
        and graph.fx_node(name).target is not operator.getitem
    ]
    return d * len(executed), d * sum(node.profile.backward_kernels for node in executed)


class _ProblemBuilder:
    """Accumulates group cost / memory vectors and edge matrices (and their forward and
    gradient-sync parts, for ``CostGraph.breakdown``)."""

    def __init__(
        self, mesh: LogicalMesh, cost: CostModel, num_microbatches: int, zero: ZeroStage | None
    ) -> None:
        self.mesh = mesh
        self.cost = cost
        self.num_microbatches = num_microbatches
        self.zero = zero
        self.costs: list[np.ndarray] = []
        self.memory: list[np.ndarray] = []
        self.forward_costs: list[np.ndarray] = []
        self.edges: list[tuple[int, int, np.ndarray]] = []
        self.forward_edges: list[tuple[int, int, np.ndarray]] = []
        self.sync_edges: list[tuple[int, int, np.ndarray]] = []
        self.members: list[list[str]] = []
        self.state_groups: set[int] = set()

    def new_group(
        self, costs: np.ndarray, memory: np.ndarray, forward: np.ndarray | None = None
    ) -> int:
        self.costs.append(np.asarray(costs, dtype=float))
        self.memory.append(np.asarray(memory, dtype=float))
        self.forward_costs.append(
            np.zeros(len(self.costs[-1])) if forward is None else np.asarray(forward, dtype=float)
        )
        self.members.append([])
        return len(self.costs) - 1

    def add_to_group(
        self, group: int, costs: np.ndarray, memory: np.ndarray, forward: np.ndarray
    ) -> None:
        self.costs[group] = self.costs[group] + costs
        self.memory[group] = self.memory[group] + memory
        self.forward_costs[group] = self.forward_costs[group] + forward

    def add_edge(self, graph: OpGraph, source: Chooser, consumer: Chooser, index: int) -> None:
        meta = graph.value_meta(source.name)
        is_param = source.kind == "param"
        regather = 2.0 if is_param else 1.0
        needs_grad = (
            graph.value_to_param[source.name] not in graph.frozen_params
            if is_param
            else graph.nodes.get(source.name) is not None and graph.nodes[source.name].requires_grad
        )
        assert consumer.strategies is not None
        shape = (len(source.outputs), len(consumer.strategies))
        forward, backward, sync = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        times = _TensorReshardTimes(meta, self.mesh, self.cost, self.zero, is_param)
        outs = [times.intern(out) for out in source.outputs]
        targets = [times.intern(gradient_placements(out)) for out in source.outputs]
        inputs = [times.intern(s.inputs[index]) for s in consumer.strategies]
        grads = [
            None if s.input_grads[index] is None else times.intern(s.input_grads[index])
            for s in consumer.strategies
        ]
        for i, (out, grad_target) in enumerate(zip(outs, targets, strict=True)):
            for j, (wanted, grad) in enumerate(zip(inputs, grads, strict=True)):
                forward[i, j] = times.reshard(out, wanted)
                if not needs_grad or grad is None:
                    continue
                every = times.reshard(grad, grad_target)
                if is_param:
                    staged, step = times.accumulated(grad, out)
                    if step > 0 and (
                        times.staged_only or staged + step / self.num_microbatches <= every
                    ):
                        sync[i, j] = step
                        every = staged + step / self.num_microbatches
                backward[i, j] = every
        matrix = regather * forward + backward
        if source.group == consumer.group:
            self.costs[source.group] = self.costs[source.group] + np.diag(matrix)
            self.forward_costs[source.group] = self.forward_costs[source.group] + np.diag(forward)
            return
        if matrix.any():
            self.edges.append((source.group, consumer.group, matrix))
        if forward.any():
            self.forward_edges.append((source.group, consumer.group, forward))
        if sync.any():
            self.sync_edges.append((source.group, consumer.group, sync))


class _TensorReshardTimes:
    """``reshard_time`` and ``accumulated_gradient_times`` of one tensor, memoised by
    placement. An edge asks for ``|outputs| × |strategies|`` pairs of which few are distinct;
    placements are interned to small integers first, so each is hashed once per edge (hashing
    placement tuples dominated building large problems)."""

    def __init__(
        self,
        meta: TensorMeta,
        mesh: LogicalMesh,
        cost: CostModel,
        zero: ZeroStage | None = None,
        parameter: bool = False,
    ) -> None:
        self.meta, self.mesh, self.cost = meta, mesh, cost
        self._overhead = zero.collective_overhead if zero is not None and parameter else None
        """A parameter's ZeRO collectives cost what ``ZeroStage.collective_overhead`` adds."""
        self._gradient_times = accumulated_gradient_times if zero is None else zero.gradient_times
        self.staged_only = zero is not None and zero.syncs_through_shards
        """ZeRO-1/2: the gradient always goes through the optimizer shard (no plain all-reduce)."""
        self._ids: dict[Placements, int] = {}
        self._placements: list[Placements] = []
        self._reshard: dict[tuple[int, int], float] = {}
        self._accumulated: dict[tuple[int, int], tuple[float, float]] = {}

    def intern(self, placements: Placements) -> int:
        if placements not in self._ids:
            self._ids[placements] = len(self._placements)
            self._placements.append(placements)
        return self._ids[placements]

    def reshard(self, src: int, dst: int) -> float:
        key = (src, dst)
        if key not in self._reshard:
            before, after = self._placements[src], self._placements[dst]
            time = reshard_time(self.meta, before, after, self.mesh, self.cost)
            if self._overhead is not None:
                time += self._overhead(self.meta, before, after, self.mesh, self.cost)
            self._reshard[key] = time
        return self._reshard[key]

    def accumulated(self, grad: int, stored: int) -> tuple[float, float]:
        key = (grad, stored)
        if key not in self._accumulated:
            self._accumulated[key] = self._gradient_times(
                self.meta, self._placements[grad], self._placements[stored], self.mesh, self.cost
            )
        return self._accumulated[key]


def _activation_bytes(
    graph: OpGraph,
    name: str,
    strategy: OpStrategy,
    saved_roots: set[str],
    mesh_shape: Sequence[int],
) -> float:
    node = graph.nodes[name]
    total = node.profile.internal_saved_bytes / strategy.work_split
    if name in saved_roots and node.alias_of is None:
        total += node.output_bytes / shard_factor(strategy.output, mesh_shape)
    return total
