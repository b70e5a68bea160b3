"""Pricing `hap advise`'s configurations (``stage_partitioner.advisor``) with the planner's
own cost model and simulator, without pricing what cannot matter.

A configuration is priced exactly as ``hap simulate`` prices it (``manual.manual_candidates``:
the layers in ``pp·v`` equal chunks, each on a ``(dp, tp)`` mesh, a global micro-batch of
``b = dp·m`` sequences, one candidate per memory level, the fastest level that fits memory),
except that its parts are solved by a ``PartSolver`` held to its ZeRO stage
(``intra_op.zero``), and the memory is split into parameters, gradients and optimizer states
as that stage stores them. The two-level planner runs on the same ``PlanningContext``.

What keeps it fast, each step exact:

1. *State floor*, no ILP: a parameter's state per device is at least its smallest over the
   storage placements the ZeRO stage allows on the ``(dp, tp)`` mesh; a configuration whose
   fullest rank exceeds the budget on that alone does not fit.
2. *Compute floor*, no ILP: every strategy's roofline time is at least its FLOPs over the mesh's
   ``D = tp·dp`` devices at the matmul rate, so a chunk takes at least
   ``f = (b / b₀)·Σ F_fwd / (D·R)`` forward and ``(b / b₀)·Σ F_bwd / (D·R)`` (+ ``f`` with full
   recomputation) backward (FLOPs are linear in the batch; ``b₀`` is the captured batch), and
   ``schedules.makespan_lower_bound`` of those bounds the step time.
3. Configurations are solved in rounds, in order of that floor, every ``(part, b, mesh)`` ILP
   chain of a round in one parallel ``solve_all`` and cached; each configuration is then
   screened from per-layer sums of its parts' costs: the simulator's memory rule exactly (state
   plus the schedule's in-flight micro-batches of activations, ``schedules.in_flight``) and
   ``makespan_lower_bound`` of its stage times.
4. Screened configurations are simulated in order of that bound, and the search stops once the
   bound reaches ``max(T_K, (1 + tolerance)·T_best)`` over the rows simulated so far: nothing
   left can enter the top ``K`` rows or the tolerance of the recommendation. What is left is
   reported as outranked, with its bound.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hierarchical_ap import schedules
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import NoFeasiblePlanError
from hierarchical_ap.graph import OpGraph
from intra_op.cost_graph import candidate_placements
from intra_op.placement import REPLICATE, Placements, Shard
from intra_op.zero import ZeroStage
from stage_partitioner.advisor import (
    DOES_NOT_FIT,
    OUTRANKED,
    TOLERANCE,
    Configuration,
    MemoryPerDevice,
    ModelShape,
    Rejected,
    Row,
    SearchSpace,
    enumerate_configurations,
    recommend,
)
from stage_partitioner.layers import LayerPart, PlanningLayer, block_layers
from stage_partitioner.manual import manual_candidates
from stage_partitioner.planner import PlanningContext, plan_in_context, submesh_of
from stage_partitioner.simulator import Simulation, Simulator
from stage_partitioner.stage_costs import (
    MEMORY_LEVELS,
    MeshChoice,
    PartCost,
    PartSolver,
    _graph_at,
    layer_prefix,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
ROUND_CHAINS = 16
"""ILP chains ((mesh, micro-batch, ZeRO stage), every part kind) solved per round."""


@dataclass(frozen=True)
class AdvisorOptions:
    top: int = 10
    """Rows the search must rank exactly (the table's length)."""
    tolerance: float = TOLERANCE
    space: SearchSpace = SearchSpace()
    include_planner: bool = True


@dataclass
class Advice:
    """The ranked rows (fastest first; classic configurations and the planner's plan), the
    recommendation and everything left out."""

    model: str
    cluster: Cluster
    global_batch: int
    seq: int | None
    precision: str
    budget_bytes: float
    rows: list[Row]
    recommended: Row | None
    reason: str
    rejected: list[Rejected]
    num_configurations: int
    """Formable configurations (priced, outranked or out of memory)."""
    search_time_s: float
    planner_note: str | None = None

    @property
    def planner(self) -> Row | None:
        return next((r for r in self.rows if r.config is None), None)


def advise(
    context: PlanningContext,
    shape: ModelShape,
    options: AdvisorOptions = AdvisorOptions(),
    *,
    model_name: str,
    precision: str,
    peak_flops: float,
    progress: Progress | None = None,
) -> Advice:
    """Enumerate, price, rank and recommend (module docstring). ``peak_flops``: one device's
    peak in the training precision, the denominator of MFU."""
    started = time.perf_counter()
    cluster, batch = context.cluster, context.options.global_batch
    configs, rejected = enumerate_configurations(
        shape, cluster.num_hosts, cluster.devices_per_host, batch, options.space
    )
    search = _Search(context, options, peak_flops, progress)
    rows: list[Row] = []
    note = None
    if options.include_planner:
        try:
            rows.append(search.planner_row())
        except NoFeasiblePlanError as exc:
            note = f"the planner found no plan: {exc}"
    rows += search.price(configs, rows, rejected)
    rows.sort(key=lambda r: r.step_time_s)
    recommended, reason = recommend(rows, options.tolerance) if rows else (None, "")
    if not rows:
        reason = "no configuration fits memory; use more devices or devices with more memory"
    return Advice(
        model=model_name,
        cluster=cluster,
        global_batch=batch,
        seq=_sequence_length(context.graph),
        precision=precision,
        budget_bytes=context.budget,
        rows=rows,
        recommended=recommended,
        reason=reason,
        rejected=rejected,
        num_configurations=len(configs),
        search_time_s=time.perf_counter() - started,
        planner_note=note,
    )


def price_all(
    context: PlanningContext,
    configs: Sequence[Configuration],
    *,
    peak_flops: float,
    progress: Progress | None = None,
) -> tuple[list[Row], list[Rejected]]:
    """Every configuration priced, none outranked (``advise`` without the planner and without
    stopping early): the rows, fastest first, and those that do not fit."""
    options = AdvisorOptions(top=len(configs) + 1, include_planner=False)
    rejected: list[Rejected] = []
    rows = _Search(context, options, peak_flops, progress).price(configs, [], rejected)
    return sorted(rows, key=lambda r: r.step_time_s), rejected


_ARRAYS = (
    "time",
    "forward",
    "closing",
    "kept",
    "inputs",
    "largest",
    "parameters",
    "gradients",
    "optimizer",
)


@dataclass
class _LayerCosts:
    """Per memory level and planning layer (arrays ``[level, layer]``): the sums over the
    layer's parts of their ILP answers on one mesh at one micro-batch, under one ZeRO stage."""

    time: np.ndarray
    forward: np.ndarray
    closing: np.ndarray
    """Once per step: gradient synchronisation plus optimizer step."""
    kept: np.ndarray
    inputs: np.ndarray
    largest: np.ndarray
    """The largest part's kept activations (what a recomputed part holds while it runs)."""
    parameters: np.ndarray
    gradients: np.ndarray
    optimizer: np.ndarray
    duplicates: np.ndarray
    """``[level, (parameters, gradients, optimizer)]``: state the sums count more than once
    when one rank holds every layer (a parameter several parts read, all copies but the
    largest; ``stage_costs.SharedParameters``)."""
    levels: list[int]
    """Distinct levels (a level whose answers are the previous level's is left out)."""


@dataclass(order=True)
class _Screened:
    bound: float
    config: Configuration = field(compare=False)
    levels: list[tuple[float, int, MemoryPerDevice]] = field(compare=False)
    """Fitting levels: (bound, level, memory), fastest bound first."""


class _Search:
    """One advisor run's solvers, simulators and caches over one ``PlanningContext``."""

    def __init__(
        self,
        context: PlanningContext,
        options: AdvisorOptions,
        peak_flops: float,
        progress: Progress | None,
    ) -> None:
        self.context = context
        self.options = options
        self.peak_flops = peak_flops
        self.progress = progress
        self.graph = context.graph
        self.layers = tuple(block_layers(context.graph))
        base = context.solver
        self.solvers = {
            z: PartSolver(
                base.graph,
                base.cluster,
                cost_model=base.cost_model,
                training_memory=base.training_memory,
                num_microbatches_of=base.num_microbatches_of,
                device_budget=base.device_budget,
                workers=base.workers,
                time_limit_s=base.time_limit_s,
                zero=ZeroStage(z, tensor_parallel=True),
            )
            for z in options.space.zero_stages
        }
        self.simulators = {
            z: Simulator(self.graph, context.cluster, s) for z, s in self.solvers.items()
        }
        self.shared = base.shared
        self.seq = _sequence_length(self.graph) or 1
        self._flops = _layer_compute_seconds(self.graph, self.layers, context)
        self._floors: dict[tuple, float] = {}
        self._part_floors: dict[tuple, float] = {}
        self._compute_floors: dict[tuple, float] = {}
        self._tables: dict[tuple, _LayerCosts | None] = {}
        self._splits: dict[tuple, tuple[float, float, float]] = {}
        self._in_flight: dict[tuple, list[int]] = {}

    # ------------------------------------------------------------------ the planner's plan

    def planner_row(self) -> Row:
        plan, simulation = plan_in_context(self.context, progress=self.progress)
        meshes = sorted({"x".join(map(str, s.logical_mesh)) for s in plan.stages})
        schedule = plan.schedule + (f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else "")
        name = (
            f"planner: {len(plan.stages)} stage(s) on {', '.join(meshes)} meshes, "
            f"{schedule}, micro-batch {plan.micro_batch_size}"
        )
        peak = max(simulation.memory, key=lambda m: m.total)
        memory = MemoryPerDevice(peak.parameters, peak.gradients, peak.optimizer, peak.activations)
        return self._row(name, None, simulation, memory)

    # ------------------------------------------------------------------ classic configurations

    def price(
        self, configs: Sequence[Configuration], rows: list[Row], rejected: list[Rejected]
    ) -> list[Row]:
        """Rows of the configurations that can matter; the rest go to ``rejected``."""
        budget = self.context.budget
        chains: dict[tuple, list[tuple[float, Configuration]]] = {}
        for config in configs:
            floor = self._state_floor(config)
            if floor > budget:
                rejected.append(
                    Rejected(
                        config.label,
                        DOES_NOT_FIT,
                        "training state alone exceeds the budget",
                        f"its parameters, gradients and optimizer states alone need at least "
                        f"{floor / 2**30:.1f} GiB per device (budget {budget / 2**30:.1f} GiB)",
                    )
                )
            else:
                chains.setdefault(self._chain_key(config), []).append(
                    (self._compute_floor(config), config)
                )
        order = sorted(chains.values(), key=lambda group: min(f for f, _ in group))
        priced: list[Row] = []
        heap: list[_Screened] = []
        done = 0
        while done < len(order) and min(f for f, _ in order[done]) < self._threshold(rows + priced):
            threshold = self._threshold(rows + priced)
            round_ = [
                group
                for group in order[done : done + ROUND_CHAINS]
                if min(f for f, _ in group) < threshold
            ]
            group_configs = [c for group in round_ for _, c in group]
            self._solve(group_configs)
            for config in group_configs:
                screened = self._screen(config, rejected)
                if screened is not None:
                    heapq.heappush(heap, screened)
            done += len(round_)
            self._report("pricing (ILP chains)", done, len(order))
            self._simulate(heap, rows, priced)
        limit = self._threshold(rows + priced)
        for group in order[done:]:
            for floor, config in group:
                reason = _outranked(floor, limit, "compute")
                rejected.append(
                    Rejected(config.label, OUTRANKED, "compute lower bound", reason, floor)
                )
        for screened in heap:
            reason = _outranked(screened.bound, limit, "ILP")
            rejected.append(
                Rejected(
                    screened.config.label, OUTRANKED, "ILP lower bound", reason, screened.bound
                )
            )
        self._report("pricing (ILP chains)", len(order), len(order))
        return priced

    def _threshold(self, rows: Sequence[Row]) -> float:
        """``max(T_K, (1 + tolerance)·T_best)``: a configuration whose step time cannot go
        below it can enter neither the top rows nor the recommendation's tolerance."""
        times = sorted(r.step_time_s for r in rows)
        if len(times) < self.options.top or not times:
            return math.inf
        return max(times[self.options.top - 1], (1 + self.options.tolerance) * times[0])

    def _solve(self, configs: Sequence[Configuration]) -> None:
        """Solve every ILP chain the configurations need, one ``solve_all`` per ZeRO stage."""
        by_zero: dict[int, list[tuple[LayerPart, int, MeshChoice]]] = {}
        kinds = {part.kind: part for layer in self.layers for part in layer.parts}
        for config in configs:
            _, b, mesh = self._chain_key(config)
            _graph_at(self.graph, b)  # built once here, inherited by the forked solvers
            by_zero.setdefault(config.zero, []).extend((p, b, mesh) for p in kinds.values())
        for zero, tasks in by_zero.items():
            self.solvers[zero].solve_all(tasks)

    def _simulate(self, heap: list[_Screened], rows: list[Row], priced: list[Row]) -> None:
        """Simulate screened configurations, best bound first, while they can still matter."""
        while heap and heap[0].bound < self._threshold(rows + priced):
            screened = heapq.heappop(heap)
            config = screened.config
            candidates = manual_candidates(self.context, config.manual, self.layers)
            best: tuple[Simulation, MemoryPerDevice] | None = None
            for bound, level, memory in screened.levels:
                if best is not None and bound >= best[0].step_time_s:
                    break
                simulation = self.simulators[config.zero].simulate(candidates[level])
                if simulation is not None and (
                    best is None or simulation.step_time_s < best[0].step_time_s
                ):
                    best = (simulation, memory)
            if best is not None:
                priced.append(self._row(config.label, config, *best))

    def _row(
        self,
        name: str,
        config: Configuration | None,
        simulation: Simulation,
        memory: MemoryPerDevice,
    ) -> Row:
        step = simulation.step_time_s
        batch = self.context.options.global_batch
        return Row(
            name=name,
            config=config,
            step_time_s=step,
            tokens_per_s=batch * self.seq / step,
            mfu=simulation.tflops_per_device * 1e12 / self.peak_flops,
            memory=memory,
        )

    # ------------------------------------------------------------------ floors and screening

    def _chain_key(self, config: Configuration) -> tuple[int, int, MeshChoice]:
        submesh = submesh_of(config.tp * config.dp, self.context.cluster.devices_per_host)
        b = config.dp * config.micro_batch_size
        return config.zero, b, MeshChoice(submesh, (config.dp, config.tp))

    def _state_floor(self, config: Configuration) -> float:
        """The least training state the fullest rank can hold (step 1 of the docstring)."""
        key = ((config.dp, config.tp), config.zero, config.pp, config.virtual_stages)
        if key not in self._floors:
            per_layer = self._layer_state_floors((config.dp, config.tp), config.zero)
            chunks = _chunk_sums(per_layer[None, :], config.pp * config.virtual_stages)[0]
            self._floors[key] = float(chunks.reshape(-1, config.pp).sum(axis=0).max())
        return self._floors[key]

    def _layer_state_floors(self, mesh_shape: tuple[int, int], zero: int) -> np.ndarray:
        """Per layer, the sum over its parts of each parameter's least state per device."""
        memory = self.context.training_memory
        factors = (memory.gradient_factor, memory.optimizer_factor)
        stage = self.solvers[zero].zero

        def least_state(fqn: str) -> float:
            meta = self.graph.param_shapes[fqn]
            choices = candidate_placements(meta, mesh_shape)
            return min(
                stage.state_bytes(meta, p, mesh_shape, *factors).total
                for p in stage.storage_choices(meta, choices, mesh_shape)
            )

        floors = np.zeros(len(self.layers))
        counted: set[str] = set()
        for index, layer in enumerate(self.layers):
            for part in layer.parts:
                shared = {fqn for fqn, _ in self.shared.of(part)}
                key = (part.kind, mesh_shape, zero)
                if key not in self._part_floors:
                    fqns = {q for n in part.nodes for q in self.graph.nodes[n].params} - shared
                    self._part_floors[key] = sum(least_state(fqn) for fqn in sorted(fqns))
                floors[index] += self._part_floors[key]
                # a parameter several parts read counts once, with its first reader
                floors[index] += sum(least_state(fqn) for fqn in sorted(shared - counted))
                counted |= shared
        return floors

    def _compute_floor(self, config: Configuration) -> float:
        """A lower bound on the step time without any ILP (step 2 of the docstring)."""
        key = (config.tp, config.pp, config.dp, config.micro_batch_size)
        key += (config.recompute, config.virtual_stages)
        if key not in self._compute_floors:
            self._compute_floors[key] = self._compute_floor_of(config)
        return self._compute_floors[key]

    def _compute_floor_of(self, config: Configuration) -> float:
        b = config.dp * config.micro_batch_size
        scale = b / (self.graph.batch_size or 1) / (config.tp * config.dp)
        chunks = config.pp * config.virtual_stages
        forward = _chunk_sums(self._flops[:1], chunks)[0] * scale
        backward = _chunk_sums(self._flops[1:], chunks)[0] * scale
        if config.recompute == "full":
            backward = backward + forward
        microbatches = self.context.options.global_batch // b
        return schedules.makespan_lower_bound(
            list(forward), list(backward), microbatches, config.virtual_stages
        )

    def _screen(self, config: Configuration, rejected: list[Rejected]) -> _Screened | None:
        """Exact memory and a step-time bound per memory level (step 3 of the docstring)."""
        zero, b, mesh = self._chain_key(config)
        costs = self._layer_costs(zero, b, mesh)
        if costs is None:
            rejected.append(
                Rejected(
                    config.label,
                    DOES_NOT_FIT,
                    "no sharding on its mesh",
                    "a layer has no sharding on its mesh",
                )
            )
            return None
        microbatches = self.context.options.global_batch // b
        chunks, pp = config.pp * config.virtual_stages, config.pp
        full = config.recompute == "full"
        forward = _chunk_sums(costs.forward, chunks)
        closing = _chunk_sums(costs.closing, chunks)
        backward = _chunk_sums(costs.time, chunks) - closing / microbatches - forward
        if full:
            backward = backward + forward
        kept = _chunk_sums(costs.inputs if full else costs.kept, chunks)
        extra = _chunk_max(costs.largest, chunks) if full else np.zeros_like(kept)
        split = [
            _chunk_sums(a, chunks) for a in (costs.parameters, costs.gradients, costs.optimizer)
        ]
        # one rank holding every chunk holds each shared parameter once
        duplicates = costs.duplicates if pp == 1 else np.zeros_like(costs.duplicates)
        in_flight = self._in_flight_of(config, microbatches)
        fitting, smallest = [], math.inf
        for level in costs.levels:
            memory = max(
                (
                    MemoryPerDevice(
                        *(
                            float(a[level, r::pp].sum()) - duplicates[level, k]
                            for k, a in enumerate(split)
                        ),
                        activations=in_flight[r] * float(kept[level, r::pp].mean())
                        + float(extra[level, r::pp].max()),
                    )
                    for r in range(pp)
                ),
                key=lambda m: m.total,
            )
            smallest = min(smallest, memory.total)
            if memory.total <= self.context.budget:
                bound = _step_lower_bound(
                    forward[level], backward[level], closing[level], microbatches, config
                )
                fitting.append((bound, level, memory))
        if not fitting:
            rejected.append(
                Rejected(
                    config.label,
                    DOES_NOT_FIT,
                    "exceeds the budget at its smallest sharding",
                    f"needs {smallest / 2**30:.1f} GiB per device at its smallest sharding "
                    f"(budget {self.context.budget / 2**30:.1f} GiB)",
                )
            )
            return None
        fitting.sort(key=lambda item: item[0])
        return _Screened(fitting[0][0], config, fitting)

    def _in_flight_of(self, config: Configuration, microbatches: int) -> list[int]:
        key = (config.schedule, config.pp, microbatches, config.virtual_stages)
        if key not in self._in_flight:
            tasks = schedules.build_schedule(*key)
            self._in_flight[key] = schedules.in_flight(tasks)
        return self._in_flight[key]

    def _layer_costs(self, zero: int, b: int, mesh: MeshChoice) -> _LayerCosts | None:
        key = (zero, b, mesh)
        if key not in self._tables:
            self._tables[key] = self._build_layer_costs(zero, b, mesh)
        return self._tables[key]

    def _build_layer_costs(self, zero: int, b: int, mesh: MeshChoice) -> _LayerCosts | None:
        solver = self.solvers[zero]
        arrays = {name: np.zeros((MEMORY_LEVELS, len(self.layers))) for name in _ARRAYS}
        duplicates = np.zeros((MEMORY_LEVELS, 3))
        levels: list[int] = []
        previous: list[PartCost | None] = []
        for level in range(MEMORY_LEVELS):
            answers = [
                [solver.cost(p, b, mesh, level) for p in layer.parts] for layer in self.layers
            ]
            flat = [c for costs in answers for c in costs]
            if any(c is None for c in flat):
                return None
            if len(flat) != len(previous) or any(
                c is not d for c, d in zip(flat, previous, strict=True)
            ):
                levels.append(level)
            previous = flat
            for index, (layer, costs) in enumerate(zip(self.layers, answers, strict=True)):
                arrays["time"][level, index] = sum(c.time_s for c in costs)
                arrays["forward"][level, index] = sum(c.forward_time_s for c in costs)
                arrays["closing"][level, index] = sum(
                    c.gradient_sync_s + c.optimizer_s for c in costs
                )
                arrays["kept"][level, index] = sum(c.activation_bytes for c in costs)
                arrays["inputs"][level, index] = sum(c.input_bytes for c in costs)
                arrays["largest"][level, index] = max(c.activation_bytes for c in costs)
                for part, cost in zip(layer.parts, costs, strict=True):
                    split = self._state_split(part, cost, mesh, zero, (b, level))
                    arrays["parameters"][level, index] += split[0]
                    arrays["gradients"][level, index] += split[1]
                    arrays["optimizer"][level, index] += split[2]
            duplicates[level] = self._duplicate_split(answers, mesh, zero)
        return _LayerCosts(**arrays, duplicates=duplicates, levels=levels)

    def _duplicate_split(
        self, answers: list[list[PartCost]], mesh: MeshChoice, zero: int
    ) -> tuple[float, float, float]:
        """State counted more than once when one rank holds every layer (``_LayerCosts``)."""
        memory = self.context.training_memory
        stage = self.solvers[zero].zero
        copies: dict[str, list[tuple[float, float, float]]] = {}
        for layer, costs in zip(self.layers, answers, strict=True):
            for part, cost in zip(layer.parts, costs, strict=True):
                for fqn, key in self.shared.of(part):
                    state = stage.state_bytes(
                        self.graph.param_shapes[fqn],
                        _placements(cost.param_placements[key]),
                        mesh.logical,
                        memory.gradient_factor,
                        memory.optimizer_factor,
                    )
                    copies.setdefault(fqn, []).append(
                        (state.parameters, state.gradients, state.optimizer)
                    )
        total = np.zeros(3)
        for states in copies.values():
            total += np.sum(states, axis=0) - np.array(max(states, key=sum))
        return float(total[0]), float(total[1]), float(total[2])

    def _state_split(
        self, part: LayerPart, cost: PartCost, mesh: MeshChoice, zero: int, where: tuple
    ) -> tuple[float, float, float]:
        """A part's training state as the ZeRO stage splits it, from its chosen placements."""
        key = (part.kind, mesh, zero, *where)
        if key not in self._splits:
            memory = self.context.training_memory
            prefix = layer_prefix(self.graph, part.nodes)
            stage = self.solvers[zero].zero
            totals = [0.0, 0.0, 0.0]
            for name, strings in cost.param_placements.items():
                meta = self.graph.param_shapes[prefix + name]
                state = stage.state_bytes(
                    meta,
                    _placements(strings),
                    mesh.logical,
                    memory.gradient_factor,
                    memory.optimizer_factor,
                )
                totals[0] += state.parameters
                totals[1] += state.gradients
                totals[2] += state.optimizer
            self._splits[key] = (totals[0], totals[1], totals[2])
        return self._splits[key]

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(phase, done, total)


def _step_lower_bound(
    forward: np.ndarray,
    backward: np.ndarray,
    closing: np.ndarray,
    microbatches: int,
    config: Configuration,
) -> float:
    """A lower bound on the simulator's step ``max_r (end_r + closing_r)`` (gradient sync and
    optimizer step), per chunk times given.

    Rank ``r`` cannot start before micro-batch 0 has gone forward through chunks ``0..r−1``
    and then runs ``m`` forwards and backwards of each of its chunks, so
    ``end_r ≥ Σ_{c<r} f_c + m·Σ_{c on r} (f_c + b_c)``; rank 0 ends last of all
    (``schedules.makespan_lower_bound``)."""
    pp = config.pp
    work = (forward + backward).reshape(-1, pp).sum(axis=0) * microbatches
    fill = np.concatenate([[0.0], np.cumsum(forward[: pp - 1])])
    closings = closing.reshape(-1, pp).sum(axis=0)
    last = schedules.makespan_lower_bound(
        list(forward), list(backward), microbatches, config.virtual_stages
    )
    return float(max((fill + work + closings).max(), last + closings[0]))


def _outranked(bound: float, limit: float, kind: str) -> str:
    return (
        f"cannot beat the rows ranked: its {kind} lower bound on the step time is "
        f"{bound:.3g} s ≥ {limit:.3g} s"
    )


def _chunk_sums(array: np.ndarray, chunks: int) -> np.ndarray:
    """``[level, layer]`` → ``[level, chunk]``: sums over ``chunks`` equal runs of layers."""
    levels, layers = array.shape
    return array.reshape(levels, chunks, layers // chunks).sum(axis=2)


def _chunk_max(array: np.ndarray, chunks: int) -> np.ndarray:
    levels, layers = array.shape
    return array.reshape(levels, chunks, layers // chunks).max(axis=2)


def _layer_compute_seconds(
    graph: OpGraph, layers: Sequence[PlanningLayer], context: PlanningContext
) -> np.ndarray:
    """``[[forward], [backward]]`` seconds per layer of its FLOPs at the captured batch on one
    device at the matmul rate, times the device's `compute_scale` (the roofline's compute term
    as `CostModel.op_time` scales it, a floor of every strategy)."""
    device = context.cluster.device
    rate = context.cost_model.matmul_efficiency / device.compute_scale
    out = np.zeros((2, len(layers)))
    for index, layer in enumerate(layers):
        for part in layer.parts:
            for name in part.nodes:
                node = graph.nodes[name]
                peak = device.peak_flops(node.compute_dtype) * rate
                out[0, index] += node.profile.forward_flops / peak
                out[1, index] += node.profile.backward_flops / peak
    return out


def _placements(strings: Sequence[str]) -> Placements:
    """The plan's placement strings (``"R"``, ``"S(d)"``) as DTensor placements."""
    return tuple(Shard(int(s[2:-1])) if s.startswith("S(") else REPLICATE for s in strings)


def _sequence_length(graph: OpGraph) -> int | None:
    if not graph.model_inputs:
        return None
    shape = graph.input_values[graph.model_inputs[0]].shape
    return shape[1] if len(shape) >= 2 else None
