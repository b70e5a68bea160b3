"""The outer pass: search stage slicings, submeshes, micro-batching and schedules.

``plan_parallel`` searches, for each candidate global micro-batch size ``b`` (``B = batch / b``
micro-batches):

1. **Alpa's DP** (``stage_partitioner.dp``) over the coarse planning layers and every submesh
   of the submesh space, minimising ``Σ t_i + (B − 1)·max t_i`` under 1F1B memory limits, with
   each stage's option (logical mesh, memory level of its shardings, recomputation) taken from its
   Pareto front (``stage_partitioner.search``);
2. **uniform slicings** over the fine layers (one per block): ``p`` equal stages on equal
   submeshes, with 1F1B or interleaved 1F1B (``v`` chunks per rank), each option, screened
   with the closed forms ``Σ t + (B − 1)·max t`` and ``(Σ t + (v·B − 1)·max t)/v`` — the
   interleaved schedule is not expressible in Eq. 2, and Megatron-style configurations live
   here.

The best few of each are simulated (``stage_partitioner.simulator``: event timeline, transfers,
gradient sync, exact in-flight memory), in order of a lower bound on their step time so that
those that cannot beat a fitting one are skipped, and the fastest that fits the memory budget
becomes the ``ParallelPlan``. The ILPs behind every table are solved once per (part kind, mesh, b,
memory level) in parallel worker processes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import NoFeasiblePlanError, PlannerOptionError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.plan import ParallelPlan, PlanLayer, PlanStage, model_fingerprint
from hierarchical_ap.schedules import makespan_lower_bound
from intra_op.cost_graph import TrainingMemory
from intra_op.zero import ZeroStage
from stage_partitioner import dp
from stage_partitioner.layers import PlanningLayer, block_layers, planning_layers
from stage_partitioner.search import dp_arrays
from stage_partitioner.simulator import Candidate, Simulation, Simulator
from stage_partitioner.stage_costs import (
    MEMORY_LEVELS,
    MeshChoice,
    PartSolver,
    StageCostTable,
    StageOption,
    build_table,
    layer_prefix,
    logical_meshes,
    part_tasks,
    submesh_space,
)
from stage_partitioner.submeshes import place_submeshes

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``."""


@dataclass(frozen=True)
class PlannerOptions:
    """What the search may choose; ``None`` leaves it to the search."""

    global_batch: int
    memory_fraction: float = 0.9
    num_stages: int | None = None
    microbatch_sizes: Sequence[int] | None = None
    max_microbatch_candidates: int = 4
    max_layers: int = 32
    schedules: tuple[str, ...] = ("1f1b", "interleaved")
    simulate_top: int = 3
    relative_epsilon: float = 0.005
    workers: int | None = None
    time_limit_s: float = 30.0
    zero_stage: int | None = None
    """A ZeRO stage (0–3) every stage's parameters are held to on mesh axis 0
    (``intra_op.zero``); ``None``: the ILP chooses each parameter's storage itself."""
    zero_list_collectives: bool = False
    """With ``zero_stage = 3``: cost its gathers as DeepSpeed's 2021 list-based collectives
    (``intra_op.zero``), as the published ZeRO-3 runs ran them."""


@dataclass
class PlanningContext:
    """Everything the search shares: graph, cluster, costs, solver and simulator."""

    graph: OpGraph
    cluster: Cluster
    options: PlannerOptions
    training_memory: TrainingMemory
    cost_model: CostModel
    solver: PartSolver = field(init=False)
    simulator: Simulator = field(init=False)

    def __post_init__(self) -> None:
        batch = self.options.global_batch
        self.solver = PartSolver(
            self.graph,
            self.cluster,
            cost_model=self.cost_model,
            training_memory=self.training_memory,
            num_microbatches_of=lambda b: batch // b,
            device_budget=self.budget,
            workers=self.options.workers,
            time_limit_s=self.options.time_limit_s,
            zero=self._zero_stage(),
        )
        self.simulator = Simulator(self.graph, self.cluster, self.solver)

    def _zero_stage(self) -> ZeroStage | None:
        if self.options.zero_stage is None:
            if self.options.zero_list_collectives:
                raise PlannerOptionError(
                    "zero_list_collectives models ZeRO-3's gathers; set zero_stage=3 or drop it"
                )
            return None
        return ZeroStage(
            self.options.zero_stage, list_collectives=self.options.zero_list_collectives
        )

    @property
    def budget(self) -> float:
        return self.cluster.device.memory_bytes * self.options.memory_fraction

    def meshes(self, microbatch: int) -> list[MeshChoice]:
        per_host = self.cluster.devices_per_host
        return [
            MeshChoice(submesh, logical)
            for submesh in submesh_space(self.cluster.num_hosts, per_host)
            for logical in logical_meshes(submesh, per_host, microbatch)
        ]


def plan_parallel(
    graph: OpGraph,
    cluster: Cluster,
    options: PlannerOptions,
    *,
    training_memory: TrainingMemory,
    model_name: str = "model",
    precision: str = "fp32",
    cost_model: CostModel | None = None,
    progress: Progress | None = None,
) -> tuple[ParallelPlan, Simulation]:
    """Search the best plan (see the module docstring). ``graph`` must have a dynamic batch."""
    context = PlanningContext(
        graph, cluster, options, training_memory, cost_model or CostModel.for_cluster(cluster)
    )
    return plan_in_context(context, model_name=model_name, precision=precision, progress=progress)


def plan_in_context(
    context: PlanningContext,
    *,
    model_name: str = "model",
    precision: str = "fp32",
    progress: Progress | None = None,
) -> tuple[ParallelPlan, Simulation]:
    """``plan_parallel`` with a prepared context (its solver cache is reused by later calls)."""
    started = time.perf_counter()
    graph, cluster, options = context.graph, context.cluster, context.options
    _check_inputs(graph, cluster, options)
    coarse = tuple(planning_layers(graph, max_layers=options.max_layers))
    fine = tuple(block_layers(graph))
    microbatches = microbatch_candidates(cluster, options, len(fine))
    tasks = [task for b in microbatches for task in part_tasks(coarse, b, context.meshes(b))]
    context.solver.solve_all(
        tasks, (lambda done, total: progress("sharding ILPs", done, total)) if progress else None
    )
    candidates: list[Candidate] = []
    for index, b in enumerate(microbatches):
        if progress:
            progress("stage DP", index, len(microbatches))
        candidates += _dp_candidates(context, coarse, b)
        candidates += _uniform_candidates(context, fine, b)
    if progress:
        progress("stage DP", len(microbatches), len(microbatches))
    simulated = _simulate_best(context, candidates, progress)
    fitting = [r for r in simulated if r[1].peak_memory_bytes <= context.budget]
    if not fitting:
        smallest = simulated + _simulate_all(
            context, _smallest_candidates(context, coarse, microbatches), None
        )
        raise _no_plan_error(context, smallest)
    candidate, simulation = min(fitting, key=lambda r: r[1].step_time_s)
    plan = to_parallel_plan(
        candidate,
        simulation,
        graph,
        cluster,
        context.solver,
        model_name=model_name,
        precision=precision,
        planning_time_s=time.perf_counter() - started,
    )
    return plan, simulation


def microbatch_candidates(cluster: Cluster, options: PlannerOptions, num_layers: int) -> list[int]:
    """Global micro-batch sizes to try: divisors ``b`` of the batch from the smallest that can
    fill the cluster with at most one stage per layer (``b ≥ devices / (M · L)``, ``L`` the
    fine layers, one per block), or with ``num_stages`` stages when it is fixed; the first few
    of them, each at least twice the one before (consecutive divisors span too narrow a
    range: the published GPT-1T run's b = 6 on 3072 GPUs lies below the fourth divisor above
    a 32-stage bound, and its 64 stages need the fine layers' bound)."""
    if options.microbatch_sizes:
        return sorted(set(options.microbatch_sizes))
    stages = options.num_stages or num_layers
    smallest = max(1, math.ceil(cluster.num_devices / (cluster.devices_per_host * stages)))
    divisors = [b for b in range(1, options.global_batch + 1) if options.global_batch % b == 0]
    chosen: list[int] = []
    for b in divisors:
        if len(chosen) == options.max_microbatch_candidates:
            break
        if b >= smallest and (not chosen or b >= 2 * chosen[-1]):
            chosen.append(b)
    return chosen or divisors[-1:]


def _dp_candidates(
    context: PlanningContext, layers: tuple[PlanningLayer, ...], b: int
) -> list[Candidate]:
    cluster, options = context.cluster, context.options
    num_microbatches = options.global_batch // b
    table = build_table(context.solver, list(layers), b, context.meshes(b))
    unit = cluster.devices_per_host if cluster.num_hosts > 16 else 1
    arrays = dp_arrays(table, context.budget, num_microbatches, unit)
    result = dp.solve(
        arrays.stage_time,
        arrays.max_succ,
        arrays.choice_devices,
        cluster.num_devices // unit,
        num_microbatches,
        relative_epsilon=options.relative_epsilon,
        num_stages=options.num_stages,
    )
    if result is None or "1f1b" not in options.schedules:
        return []
    ranges = tuple((k, j) for k, j, _ in result.stages)
    stage_options = tuple(table.options[arrays.option_index[k, j, m]] for k, j, m in result.stages)
    return [Candidate(layers, ranges, stage_options, b, num_microbatches, "1f1b")]


def _uniform_candidates(
    context: PlanningContext, layers: tuple[PlanningLayer, ...], b: int
) -> list[Candidate]:
    """Equal stages on equal submeshes, screened by the closed-form step time."""
    cluster, options = context.cluster, context.options
    num_microbatches = options.global_batch // b
    space = set(submesh_space(cluster.num_hosts, cluster.devices_per_host))
    table = build_table(context.solver, list(layers), b, context.meshes(b))
    num_layers = len(layers)
    scored: list[tuple[float, Candidate]] = []
    for pp in range(1, num_layers + 1):
        if num_layers % pp or cluster.num_devices % pp:
            continue
        if options.num_stages is not None and pp != options.num_stages:
            continue
        submesh = submesh_of(cluster.num_devices // pp, cluster.devices_per_host)
        if submesh not in space:
            continue
        for v in _virtual_stage_counts(options, num_layers, pp, num_microbatches):
            chunks = pp * v
            ranges = equal_ranges(num_layers, chunks)
            for q in distinct_options(table):
                option = table.options[q]
                if option.mesh.submesh != submesh:
                    continue
                screened = _screen(table, q, ranges, pp, v, num_microbatches, context.budget)
                if screened is not None:
                    schedule = "interleaved" if v > 1 else "1f1b"
                    candidate = Candidate(
                        layers, ranges, (option,) * chunks, b, num_microbatches, schedule, v
                    )
                    scored.append((screened, candidate))
    scored.sort(key=lambda item: item[0])
    return [c for _, c in scored[: options.simulate_top]]


def distinct_options(table: StageCostTable) -> list[int]:
    """Indices of the table's options, each of a set whose options agree on the logical mesh,
    the recomputation and every layer's time, gradient sync, state, activations and extra
    peak once (the first): memory levels whose ILPs found the same shardings are one stage to
    the simulator, and would otherwise fill the few simulated slots with copies."""
    columns = (
        table.time,
        table.gradient_sync,
        table.state,
        table.activation,
        table.peak_extra,
        *table.shared_state.values(),
    )
    seen: set[tuple] = set()
    kept = []
    for q, option in enumerate(table.options):
        key = (option.mesh, option.recompute, *(column[:, q].tobytes() for column in columns))
        if key not in seen:
            seen.add(key)
            kept.append(q)
    return kept


def _virtual_stage_counts(
    options: PlannerOptions, num_layers: int, pp: int, num_microbatches: int
) -> list[int]:
    counts = [1] if "1f1b" in options.schedules else []
    if "interleaved" in options.schedules and pp > 1 and num_microbatches % pp == 0:
        counts += [v for v in range(2, num_layers // pp + 1) if num_layers % (pp * v) == 0]
    return counts


def _screen(table, q, ranges, pp, v, num_microbatches, budget) -> float | None:
    """Closed-form step time of a uniform candidate, or ``None`` when rank 0 cannot fit.

    Rank 0 keeps ``pp`` micro-batches in flight under 1F1B, ``pp·(1 + (pp−1)/(pp·v))`` under
    interleaving (Korthikanti et al., §4.2.3), each holding its chunks' activations."""
    rank_time = np.zeros(pp)
    rank_act = np.zeros(pp)
    rank_extra = np.zeros(pp)
    rank_layers: list[list[int]] = [[] for _ in range(pp)]
    for chunk, (first, last) in enumerate(ranges):
        rank = chunk % pp
        rank_time[rank] += table.time[first : last + 1, q].sum()
        rank_layers[rank].extend(range(first, last + 1))
        rank_act[rank] += table.activation[first : last + 1, q].sum()
        rank_extra[rank] = max(rank_extra[rank], table.peak_extra[first : last + 1, q].max())
    if not np.all(np.isfinite(rank_time)):
        return None
    in_flight = min(pp, num_microbatches) * (1 + (pp - 1) / (pp * v) if v > 1 else 1)
    if table.state_of(rank_layers[0], q) + in_flight * rank_act[0] + rank_extra[0] > budget:
        return None
    return float((rank_time.sum() + (v * num_microbatches - 1) * rank_time.max()) / v)


def equal_ranges(num_layers: int, chunks: int) -> tuple[tuple[int, int], ...]:
    """``chunks`` consecutive ranges of ``num_layers // chunks`` layers each (inclusive)."""
    size = num_layers // chunks
    return tuple((c * size, (c + 1) * size - 1) for c in range(chunks))


def submesh_of(devices: int, per_host: int) -> tuple[int, int]:
    """The submesh shape of ``devices`` devices: inside one host, or whole hosts; ``(0, 0)``
    when neither."""
    if devices <= per_host:
        return (1, devices)
    return (devices // per_host, per_host) if devices % per_host == 0 else (0, 0)


def _simulate_best(
    context: PlanningContext, candidates: list[Candidate], progress: Progress | None
) -> list[tuple[Candidate, Simulation]]:
    """The candidates that may be the fastest that fits, with their simulations.

    Candidates are simulated in order of ``schedules.makespan_lower_bound`` of their stage
    times; once a simulated candidate fits memory, every candidate whose bound is no better
    than its step time is skipped (it cannot be faster). When none fits, all are simulated.
    """
    bounded = []
    for candidate in candidates:
        bound = _lower_bound(context, candidate)
        if bound is not None:
            bounded.append((bound, candidate))
    bounded.sort(key=lambda item: item[0])
    simulated = []
    best = math.inf
    for index, (bound, candidate) in enumerate(bounded):
        if progress:
            progress("simulating", index, len(bounded))
        if bound >= best:
            break
        simulation = context.simulator.simulate(candidate)
        if simulation is None:
            continue
        simulated.append((candidate, simulation))
        if simulation.peak_memory_bytes <= context.budget:
            best = min(best, simulation.step_time_s)
    if progress:
        progress("simulating", len(bounded), len(bounded))
    return simulated


def _lower_bound(context: PlanningContext, candidate: Candidate) -> float | None:
    """``makespan_lower_bound`` of a candidate's stage times; ``None`` if a stage cannot run."""
    context.simulator.ensure_solved(candidate)
    estimates = [context.simulator.estimate(candidate, i) for i in range(len(candidate.ranges))]
    if any(e is None for e in estimates):
        return None
    return makespan_lower_bound(
        [e.forward_s for e in estimates],
        [e.backward_s for e in estimates],
        candidate.num_microbatches,
        candidate.virtual_stages,
    )


def _simulate_all(
    context: PlanningContext, candidates: list[Candidate], progress: Progress | None
) -> list[tuple[Candidate, Simulation]]:
    """Every candidate that can run, with its simulation."""
    simulated = []
    for index, candidate in enumerate(candidates):
        if progress:
            progress("simulating", index, len(candidates))
        simulation = context.simulator.simulate(candidate)
        if simulation is not None:
            simulated.append((candidate, simulation))
    if progress:
        progress("simulating", len(candidates), len(candidates))
    return simulated


def _check_inputs(graph: OpGraph, cluster: Cluster, options: PlannerOptions) -> None:
    if options.global_batch < 1:
        raise PlannerOptionError(
            f"global batch must be a positive integer, got {options.global_batch}"
        )
    if not 0 < options.memory_fraction <= 1:
        raise PlannerOptionError(
            f"memory fraction must be in (0, 1], got {options.memory_fraction}; "
            "e.g. 0.9 keeps 10% of device memory for the framework"
        )
    if not graph.batch_is_dynamic:
        raise PlannerOptionError(
            "the planner needs a graph captured with capture(..., dynamic_batch=True) "
            "to try several micro-batch sizes"
        )
    if options.num_stages is not None and options.num_stages < 1:
        raise PlannerOptionError(
            f"the number of pipeline stages must be ≥ 1, got {options.num_stages}"
        )


def _smallest_candidates(
    context: PlanningContext, layers: tuple[PlanningLayer, ...], microbatches: list[int]
) -> list[Candidate]:
    """One stage on the whole cluster, the leanest shardings and full recomputation: the
    least memory per device a plan needs (used for the error when nothing fits)."""
    cluster = context.cluster
    submesh = submesh_of(cluster.num_devices, cluster.devices_per_host)
    return [
        Candidate(
            layers,
            ((0, len(layers) - 1),),
            (StageOption(mesh, MEMORY_LEVELS - 1, "full"),),
            b,
            context.options.global_batch // b,
            "1f1b",
        )
        for b in microbatches
        for mesh in context.meshes(b)
        if mesh.submesh == submesh
    ]


def _no_plan_error(
    context: PlanningContext, simulated: list[tuple[Candidate, Simulation]]
) -> NoFeasiblePlanError:
    needed = [s.peak_memory_bytes for _, s in simulated]
    smallest = (
        f"the smallest plan found needs {min(needed) / 2**30:.2f} GiB per device"
        if needed
        else "no stage has a sharding on the cluster's meshes"
    )
    return NoFeasiblePlanError(
        f"no plan fits in {context.budget / 2**30:.1f} GiB per device "
        f"({context.options.memory_fraction:.0%} of {context.cluster.device.name}); {smallest}. "
        "Use more devices or devices with more memory, smaller micro-batches "
        "(--microbatch-sizes), a smaller global batch or --memory-fraction closer to 1"
    )


def to_parallel_plan(
    candidate: Candidate,
    simulation: Simulation,
    graph: OpGraph,
    cluster: Cluster,
    solver: PartSolver,
    *,
    model_name: str,
    precision: str,
    planning_time_s: float | None = None,
    notes: tuple[str, ...] = (),
) -> ParallelPlan:
    """The ``ParallelPlan`` of a simulated candidate: devices placed, placements filled in."""
    ranks = candidate.num_ranks
    rank_submeshes = place_submeshes([o.mesh.submesh for o in candidate.options[:ranks]], cluster)
    stages = []
    for index, ((first, last), option) in enumerate(
        zip(candidate.ranges, candidate.options, strict=True)
    ):
        submesh = rank_submeshes[index % ranks]
        devices = submesh.device_ids
        placements: dict[str, tuple[str, ...]] = {}
        for layer in candidate.layers[first : last + 1]:
            for part in layer.parts:
                cost = solver.cost(part, candidate.microbatch, option.mesh, option.level)
                prefix = layer_prefix(graph, part.nodes)
                for name, placement in cost.param_placements.items():
                    placements[prefix + name] = placement
        per_host = cluster.devices_per_host
        stages.append(
            PlanStage(
                layers=(first, last),
                hosts=tuple(sorted({d // per_host for d in devices})),
                devices=tuple(devices),
                submesh=option.mesh.submesh,
                logical_mesh=option.mesh.logical,
                recompute=option.recompute,
                param_placements=placements,
                time_per_microbatch_s=simulation.stages[index].time_per_microbatch_s,
                memory=simulation.memory[index],
            )
        )
    layers = tuple(
        PlanLayer(
            name=layer.name,
            module_layers=tuple(layer.module_layers),
            first_node=layer.nodes[0],
            last_node=layer.nodes[-1],
        )
        for layer in candidate.layers
    )
    return ParallelPlan(
        model=model_name,
        model_fingerprint=model_fingerprint(graph),
        cluster=cluster.to_dict(),
        global_batch=candidate.microbatch * candidate.num_microbatches,
        micro_batch_size=candidate.microbatch,
        num_microbatches=candidate.num_microbatches,
        schedule=candidate.schedule,
        virtual_stages=candidate.virtual_stages,
        precision=precision,
        layers=layers,
        stages=tuple(stages),
        predicted_step_time_s=simulation.step_time_s,
        predicted_peak_memory_bytes_per_device=int(simulation.peak_memory_bytes),
        predicted_tflops_per_device=simulation.tflops_per_device,
        planning_time_s=planning_time_s,
        seq_len=_sequence_length(graph),
        notes=notes,
    )


def _sequence_length(graph: OpGraph) -> int | None:
    """Dim 1 of the first model input (token ids ``(batch, seq)``), so that ``hap simulate
    plan.json`` captures the model at the sequence length it was planned for."""
    if not graph.model_inputs:
        return None
    shape = graph.input_values[graph.model_inputs[0]].shape
    return shape[1] if len(shape) >= 2 else None
