"""The stage cost table: what every (layer range, submesh, logical mesh, option) costs.

For a global micro-batch of ``b`` sequences, a stage made of planning layers ``k..j`` on a
submesh viewed as the logical mesh ``(d, t)`` takes, per micro-batch,

    t[k, j] = Σ_{parts p of layers k..j} ILP(p, mesh, b).time           (forward + backward)
              + Σ_p ILP(p, mesh, b).forward_time        with full recomputation
              + Σ_p (accumulate(p) + update(p) / B)     (parameter updates, below)

and holds per device

    state[k, j]      = Σ_p ILP(p).state_bytes                (parameters, gradients, optimizer;
                       − Σ_w (Σ_p s_p(w) − max_p s_p(w))     a parameter w several parts read,
                                                             tied embeddings, held once)
    act[k, j]        = Σ_p ILP(p).activation_bytes           (kept per micro-batch in flight)
    act_full[k, j]   = Σ_p input_bytes(p) / d + max_p ILP(p).activation_bytes
                                                  (full recomputation: each layer keeps its
                                                   input; one layer's activations are live
                                                   again while it is recomputed)

where ``ILP(p, mesh, b)`` is ``intra_op.solve_sharding`` on the nodes of part ``p`` at batch
``b``, and, for the parameters of ``p`` as the ILP placed them, ``accumulate(p)`` is the
per-micro-batch gradient accumulation and ``update(p)`` the optimizer step of the ``B``
micro-batches' step (``CostModel.gradient_accumulation_time`` and ``optimizer_step_time``,
with the optimizer ``TrainingMemory`` names and the per-device gradient and optimizer shares of
each parameter); like the once-per-step gradient synchronisation, the update is charged ``1/B``
per micro-batch here and kept apart (``PartCost.optimizer_s``) for the simulator to run once.
Identical parts (same structural hash) are solved once per (mesh, b): the 96 blocks of
GPT-3 cost one solve per mesh. Solves run in parallel worker processes with a progress bar and
are cached for the lifetime of the table's ``PartSolver``.

Memory levels: a part alone may fit a device with its fastest sharding (all parameters
replicated, say) while a stage of many such parts does not, and then Megatron tensor
parallelism or ZeRO, slower but smaller, is what the stage needs. Each (part, mesh, b) is
therefore solved at ``MEMORY_LEVELS`` budgets: level 0 without a budget, level ``k ≥ 1`` with
``budget_device / 4^(k−1)`` per part (room for 1, 4, 16, … such parts on a device), and the
last level *lean* (the fastest among the smallest shardings: ZeRO-3 style). A level whose
budget the previous level's answer already meets reuses it (the optimum under a looser budget
that fits a tighter one is optimal there too), so most chains take two or three solves. A stage
option picks one level for all its parts. The
logical meshes of a submesh of ``D`` devices are ``(D/t, t)`` for every ``t`` dividing the
devices of one host (tensor parallelism stays inside a host), with ``D/t`` dividing ``b`` (the
batch splits evenly over mesh axis 0; Alpa's ``force_batch_dim_to_mesh_dim=0``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from hierarchical_ap.cluster import Cluster, LogicalMesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import NoFeasiblePlanError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.profile import optimizer_update_profile
from intra_op.cost_graph import (
    CostGraph,
    TrainingMemory,
    build_cost_graph,
    parameter_state_bytes,
)
from intra_op.ilp import IlpSession
from intra_op.placement import Placements, Shard, shard_factor
from intra_op.solve import solve_cost_graph
from intra_op.zero import ZeroStage
from stage_partitioner.layers import LayerPart, PlanningLayer
from stage_partitioner.submeshes import submesh_shapes

logger = logging.getLogger(__name__)

RECOMPUTE_OPTIONS = ("none", "full")
MEMORY_LEVELS = 6
"""Level 0 (no budget), levels 1..4 (device budget / 4^(k−1) per part), level 5 (lean)."""


@dataclass(frozen=True)
class MeshChoice:
    """A submesh shape ``(hosts, devices per host)`` and its logical view ``(rows, cols)``."""

    submesh: tuple[int, int]
    logical: tuple[int, int]

    @property
    def num_devices(self) -> int:
        return self.submesh[0] * self.submesh[1]


@dataclass(frozen=True)
class PartCost:
    """The ILP's answer for one part on one mesh at one micro-batch size."""

    time_s: float
    """Per micro-batch: the ILP's cost plus gradient accumulation plus ``optimizer_s / B``."""
    forward_time_s: float
    gradient_sync_s: float
    optimizer_s: float
    """The optimizer step over the part's parameters, once per step."""
    state_bytes: float
    activation_bytes: float
    input_bytes: float
    """Activation inputs from outside the part, per device (what full recomputation keeps)."""
    param_placements: dict[str, tuple[str, ...]]
    """Parameter name relative to the part's module layer → placement strings per mesh axis."""
    param_state_bytes: dict[str, float]
    """The same names → that parameter's training state per device (``state_bytes`` is their
    sum)."""

    @property
    def memory_bytes(self) -> float:
        """Memory the ILP's budget bounds: state plus one micro-batch of activations."""
        return self.state_bytes + self.activation_bytes


@dataclass(frozen=True)
class StageOption:
    """One way to run a stage: a mesh, a memory level of its shardings, and recomputation."""

    mesh: MeshChoice
    level: int
    recompute: str


def submesh_space(num_hosts: int, devices_per_host: int) -> list[tuple[int, int]]:
    """Submesh shapes the planner considers.

    Alpa's full space — ``(1, 2^k)`` inside a host and ``(n, M)`` for every ``n`` — up to 16
    hosts. On larger clusters only whole hosts ``(n, M)`` with ``n`` dividing the host count or
    a power of two are kept: enough to tile the cluster into equal or power-of-two stages
    (every published Megatron-LM configuration is of this form) while keeping the DP's device
    axis in units of hosts.
    """
    if num_hosts <= 16:
        return submesh_shapes(num_hosts, devices_per_host)
    counts = [n for n in range(1, num_hosts + 1) if num_hosts % n == 0 or (n & (n - 1)) == 0]
    return [(n, devices_per_host) for n in counts]


def logical_meshes(
    submesh: tuple[int, int], devices_per_host: int, microbatch: int
) -> list[tuple[int, int]]:
    """Logical meshes ``(d, t)`` of a submesh: ``t`` divides a host's devices used, ``d | b``."""
    hosts, per_host = submesh
    devices = hosts * per_host
    shapes = []
    for t in range(1, min(per_host, devices_per_host) + 1):
        if per_host % t == 0 and devices % t == 0 and microbatch % (devices // t) == 0:
            shapes.append((devices // t, t))
    return shapes


class PartSolver:
    """Solves parts with the intra-op ILP, in parallel, once per (kind, mesh, b): a chain of
    memory levels (see the module docstring)."""

    def __init__(
        self,
        graph: OpGraph,
        cluster: Cluster,
        *,
        cost_model: CostModel | None = None,
        training_memory: TrainingMemory,
        num_microbatches_of: Callable[[int], int],
        device_budget: float,
        workers: int | None = None,
        time_limit_s: float = 30.0,
        zero: ZeroStage | None = None,
    ) -> None:
        self.graph = graph
        self.cluster = cluster
        self.cost_model = cost_model or CostModel.for_cluster(cluster)
        self.training_memory = training_memory
        self.num_microbatches_of = num_microbatches_of
        self.device_budget = device_budget
        self.workers = workers if workers is not None else max(1, os.cpu_count() or 1)
        self.time_limit_s = time_limit_s
        self.zero = zero
        """A ZeRO stage every part's parameters are held to (``intra_op.zero``); ``None``: free."""
        self.cache: dict[tuple, tuple[PartCost | None, ...]] = {}
        self.shared = SharedParameters(graph)
        """Which parameters several parts read (each part's answer counts them)."""

    def solve_all(
        self,
        tasks: Iterable[tuple[LayerPart, int, MeshChoice]],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Solve every ``(part, b, mesh)`` not cached yet; ``progress(done, total)``."""
        todo = {}
        for part, b, mesh in tasks:
            key = (part.kind, b, mesh)
            if key not in self.cache and key not in todo:
                todo[key] = (part.nodes, b, mesh)
        total = len(todo)
        if progress:
            progress(0, total)
        if not todo:
            return
        global _SOLVER
        _SOLVER = self
        items = list(todo.items())
        if self.workers <= 1 or total < 4:
            for done, (key, task) in enumerate(items, 1):
                self.cache[key] = _solve_task(task)
                if progress:
                    progress(done, total)
            return
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            chunk = max(1, total // (8 * self.workers))
            results = pool.map(_solve_task, [task for _, task in items], chunksize=chunk)
            for done, ((key, _), result) in enumerate(zip(items, results, strict=True), 1):
                self.cache[key] = result
                if progress:
                    progress(done, total)

    def cost(self, part: LayerPart, b: int, mesh: MeshChoice, level: int) -> PartCost | None:
        """The cached answer at a memory level (``None``: no sharding exists on that mesh)."""
        return self.cache[(part.kind, b, mesh)][level]

    def _solve(self, nodes: Sequence[str], b: int, mesh: MeshChoice) -> tuple[PartCost | None, ...]:
        """The chain of memory levels of one part on one mesh."""
        graph = _graph_at(self.graph, b)
        hosts, per_host = mesh.submesh
        logical = self.cluster.submesh(hosts, per_host).logical_mesh(mesh.logical)
        cost_graph = build_cost_graph(
            graph,
            logical,
            self.cost_model,
            nodes=nodes,
            training_memory=self.training_memory,
            num_microbatches=self.num_microbatches_of(b),
            zero=self.zero,
        )
        session = IlpSession(cost_graph.problem, time_limit_s=self.time_limit_s)
        part = _Part(
            graph,
            logical,
            cost_graph,
            session,
            prefix=layer_prefix(graph, nodes),
            input_bytes=_external_input_bytes(graph, nodes) / logical.shape[0],
            num_microbatches=self.num_microbatches_of(b),
        )
        levels: list[PartCost | None] = [self._solve_one(part, None, False)]
        if levels[0] is None:
            return (None,) * MEMORY_LEVELS
        lean: PartCost | None = None
        for k in range(1, MEMORY_LEVELS - 1):
            budget = self.device_budget / 4 ** (k - 1)
            previous = levels[-1]
            if previous is not None and previous.memory_bytes <= budget:
                levels.append(previous)
                continue
            answer = self._solve_one(part, budget, False)
            if answer is None:
                lean = lean or self._solve_one(part, None, True)
                answer = lean
            levels.append(answer)
        lean = lean or self._solve_one(part, None, True)
        levels.append(lean)
        return tuple(levels)

    def _solve_one(self, part: _Part, budget: float | None, lean: bool) -> PartCost | None:
        try:
            solution = solve_cost_graph(
                part.cost_graph,
                part.graph,
                part.mesh,
                self.cluster,
                memory_budget_bytes=budget,
                lean=lean,
                session=part.session,
            )
        except NoFeasiblePlanError:
            return None
        prefix = part.prefix
        mesh_shape = tuple(part.mesh.shape)
        accumulate, update = self._update_times(part, solution.param_placements)
        return PartCost(
            time_s=solution.cost_s + accumulate + update / part.num_microbatches,
            forward_time_s=solution.forward_time_s,
            gradient_sync_s=solution.gradient_sync_s,
            optimizer_s=update,
            state_bytes=solution.state_bytes_per_device,
            activation_bytes=solution.activation_bytes_per_device,
            input_bytes=part.input_bytes,
            param_placements={
                fqn[len(prefix) :]: placement_strings(p)
                for fqn, p in solution.param_placements.items()
            },
            param_state_bytes={
                fqn[len(prefix) :]: parameter_state_bytes(
                    part.graph.param_shapes[fqn],
                    p,
                    mesh_shape,
                    self.training_memory,
                    self.zero,
                    fqn in part.graph.frozen_params,
                )
                for fqn, p in solution.param_placements.items()
            },
        )

    def _update_times(
        self, part: _Part, placements: Mapping[str, Placements]
    ) -> tuple[float, float]:
        """(gradient accumulation per micro-batch, optimizer step) of the part's parameters
        stored as ``placements``: per device, each parameter's gradient bytes and the elements
        of its optimizer shard (under ZeRO, split ``ZeroStage.state_split`` ways further);
        frozen parameters have neither."""
        memory, mesh_shape = self.training_memory, tuple(part.mesh.shape)
        device = part.mesh.submesh.cluster.device
        factors = (memory.gradient_factor, memory.optimizer_factor)
        gradient_bytes, elements = [], []
        for fqn, stored in placements.items():
            if fqn in part.graph.frozen_params:
                continue
            meta = part.graph.param_shapes[fqn]
            share = 1 / shard_factor(stored, mesh_shape)
            if self.zero is None:
                gradient_bytes.append(meta.nbytes * factors[0] * share)
            else:
                state = self.zero.state_bytes(meta, stored, mesh_shape, *factors)
                gradient_bytes.append(state.gradients)
                if factors[1] > 0:
                    share /= self.zero.state_split(meta, stored, mesh_shape)
            elements.append(meta.numel * share)
        update = optimizer_update_profile(memory.optimizer)
        return (
            self.cost_model.gradient_accumulation_time(
                gradient_bytes, device, part.num_microbatches
            ),
            self.cost_model.optimizer_step_time(
                update.kernels, update.bytes_per_element, elements, device
            ),
        )


@dataclass(frozen=True)
class _Part:
    """One part on one mesh at one micro-batch size, with what every memory level shares: its
    cost graph, ILP session, parameter-name prefix and external input bytes per device."""

    graph: OpGraph
    mesh: LogicalMesh
    cost_graph: CostGraph
    session: IlpSession
    prefix: str
    input_bytes: float
    num_microbatches: int


_SOLVER: PartSolver | None = None
_GRAPHS: dict[int, OpGraph] = {}


def _solve_task(task: tuple) -> tuple[PartCost | None, ...]:
    assert _SOLVER is not None
    return _SOLVER._solve(*task)


def _graph_at(graph: OpGraph, batch: int) -> OpGraph:
    if batch not in _GRAPHS or _GRAPHS[batch].exported is not graph.exported:
        _GRAPHS[batch] = graph.at_batch(batch)
    return _GRAPHS[batch]


def placement_strings(placements: Placements) -> tuple[str, ...]:
    """DTensor placements as the plan's strings: ``"R"`` or ``"S(d)"`` per mesh axis."""
    return tuple(f"S({p.dim})" if isinstance(p, Shard) else "R" for p in placements)


def layer_prefix(graph: OpGraph, nodes: Sequence[str]) -> str:
    """``"blocks.3."`` when all nodes (and the parameters they read) belong to one module layer,
    else ``""``: part placements are stored relative to it, so identical blocks share them."""
    layers = {graph.nodes[n].layer for n in nodes}
    if len(layers) != 1:
        return ""
    (layer,) = layers
    params = {p for n in nodes for p in graph.nodes[n].params}
    prefix = layer + "."
    return prefix if all(p.startswith(prefix) for p in params) else ""


def _external_input_bytes(graph: OpGraph, nodes: Sequence[str]) -> float:
    inside = set(nodes)
    outside = {
        value
        for name in nodes
        for value in graph.nodes[name].inputs
        if value not in inside and value not in graph.value_to_param
    }
    return float(sum(graph.value_bytes(v) for v in outside))


class SharedParameters:
    """The parameters each part reads that other nodes of the graph read too (tied input and
    output embeddings): each part's ILP counts them, a device holding both parts holds one."""

    def __init__(self, graph: OpGraph) -> None:
        self.graph = graph
        readers: dict[str, int] = {}
        for node in graph.nodes.values():
            for fqn in node.params:
                readers[fqn] = readers.get(fqn, 0) + 1
        self._read_twice = frozenset(fqn for fqn, count in readers.items() if count > 1)
        self._names: dict[LayerPart, tuple[tuple[str, str], ...]] = {}

    def of(self, part: LayerPart) -> tuple[tuple[str, str], ...]:
        """``(fqn, name in the part's costs)`` of the shared parameters ``part`` reads."""
        if part not in self._names:
            fqns = {
                fqn
                for name in part.nodes
                for fqn in self.graph.nodes[name].params
                if fqn in self._read_twice
            }
            prefix = layer_prefix(self.graph, part.nodes) if fqns else ""
            self._names[part] = tuple((f, f[len(prefix) :]) for f in sorted(fqns))
        return self._names[part]


def duplicate_bytes(copies: Mapping[str, Sequence[float]]) -> float:
    """Bytes counted more than once among the copies of each shared parameter, all but the
    largest: ``Σ_w (Σ copies(w) − max copies(w))``."""
    return sum(sum(c) - max(c) for c in copies.values())


@dataclass
class StageCostTable:
    """Per planning layer and stage option: time and memory (see the module docstring).

    Arrays are indexed ``[layer, option]``; ``range_*`` give sums over layer ranges.
    """

    layers: list[PlanningLayer]
    microbatch: int
    options: list[StageOption]
    time: np.ndarray
    forward_time: np.ndarray
    gradient_sync: np.ndarray
    state: np.ndarray
    activation: np.ndarray
    peak_extra: np.ndarray
    """Per layer: activations live beyond the kept ones (a layer being recomputed)."""
    shared_state: dict[str, np.ndarray]
    """Per parameter that several parts read (``SharedParameters``): its state in each
    layer's ``state`` (held once per layer), ``[layer, option]`` (0 where the layer does not
    read it)."""

    def range_state(self) -> np.ndarray:
        """``range_sum(state)`` with each shared parameter held once per range: all copies
        but the largest taken off, ``Σ_l s_l(w) − max_l s_l(w)`` over the range's layers."""
        out = self.range_sum(self.state)
        for copies in self.shared_state.values():
            total, largest = self.range_sum(copies), self.range_max(copies)
            valid = np.isfinite(total)  # j ≥ k
            out -= np.subtract(total, largest, out=np.zeros_like(total), where=valid)
        return out

    def state_of(self, layers: Sequence[int], q: int) -> float:
        """State of one device holding ``layers`` under option ``q``, each parameter once."""
        total = float(self.state[layers, q].sum())
        for copies in self.shared_state.values():
            held = copies[layers, q]
            total -= float(held.sum() - held.max())
        return total

    def range_sum(self, array: np.ndarray) -> np.ndarray:
        """``out[k, j, q] = Σ_{l=k..j} array[l, q]`` (``inf`` where ``j < k``)."""
        prefix = np.concatenate([np.zeros((1, array.shape[1])), np.cumsum(array, axis=0)])
        out = prefix[None, 1:, :] - prefix[:-1, None, :]
        num_layers = array.shape[0]
        lower = np.tril(np.ones((num_layers, num_layers), dtype=bool), k=-1)
        out[lower] = np.inf
        return out

    def range_max(self, array: np.ndarray) -> np.ndarray:
        """``out[k, j, q] = max_{l=k..j} array[l, q]``."""
        num_layers = array.shape[0]
        out = np.full((num_layers, num_layers, array.shape[1]), np.inf)
        for k in range(num_layers):
            out[k, k:] = np.maximum.accumulate(array[k:], axis=0)
        return out


def build_table(
    solver: PartSolver,
    layers: list[PlanningLayer],
    microbatch: int,
    meshes: Sequence[MeshChoice],
    recompute: Sequence[str] = RECOMPUTE_OPTIONS,
) -> StageCostTable:
    """Assemble the table from the solver's cached part costs (``solve_all`` first)."""
    options = [
        StageOption(mesh, level, r)
        for mesh in meshes
        for level in range(MEMORY_LEVELS)
        for r in recompute
    ]
    shape = (len(layers), len(options))
    time, forward, sync, state, activation, extra = (np.zeros(shape) for _ in range(6))
    shared_state: dict[str, np.ndarray] = {}
    for q, option in enumerate(options):
        for index, layer in enumerate(layers):
            costs = [solver.cost(p, microbatch, option.mesh, option.level) for p in layer.parts]
            if any(c is None for c in costs):
                time[index, q] = np.inf
                continue
            time[index, q] = sum(c.time_s for c in costs)
            forward[index, q] = sum(c.forward_time_s for c in costs)
            sync[index, q] = sum(c.gradient_sync_s for c in costs)
            in_layer: dict[str, list[float]] = {}
            for part, cost in zip(layer.parts, costs, strict=True):
                for fqn, key in solver.shared.of(part):
                    in_layer.setdefault(fqn, []).append(cost.param_state_bytes[key])
            # the layer holds each shared parameter once; ranges of layers: ``range_state``
            state[index, q] = sum(c.state_bytes for c in costs) - duplicate_bytes(in_layer)
            for fqn, copies in in_layer.items():
                shared_state.setdefault(fqn, np.zeros(shape))[index, q] = max(copies)
            kept = sum(c.activation_bytes for c in costs)
            if option.recompute == "full":
                time[index, q] += forward[index, q]
                activation[index, q] = sum(c.input_bytes for c in costs)
                extra[index, q] = kept
            else:
                activation[index, q] = kept
    return StageCostTable(
        layers, microbatch, options, time, forward, sync, state, activation, extra, shared_state
    )


def part_tasks(
    layers: Sequence[PlanningLayer], microbatch: int, meshes: Sequence[MeshChoice]
) -> list[tuple[LayerPart, int, MeshChoice]]:
    """Every distinct ILP chain the table of ``microbatch`` needs."""
    kinds = {part.kind: part for layer in layers for part in layer.parts}
    return [(part, microbatch, mesh) for part in kinds.values() for mesh in meshes]
