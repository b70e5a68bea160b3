"""Predicted step time and memory of a pipeline plan, from the same costs the planner uses.

A *candidate* is a list of stages (layer ranges, each with a mesh, a memory level of shardings,
and recomputation), a micro-batching and a schedule. Its prediction:

* per stage and micro-batch: forward ``f_i`` and backward ``b_i`` times from the intra-op ILP
  of its parts (full recomputation runs the forward again inside the backward; the backward
  includes accumulating the parameters' gradients), without the gradient synchronisation and
  the optimizer step, which run once after the stage's last backward;
* the schedule (``hierarchical_ap.schedules``) is played as an event simulation over ranks,
  with the activation (and gradient) transfer between consecutive stages,
  ``send = boundary_bytes / rows_of_receiving_mesh`` over the link between them;
* the step ends when the last rank has finished its last backward, its gradient sync and its
  optimizer step:

      T = max_r (end of rank r's last task + Σ_{stages i on r} (sync_i + update_i))

* memory per device of stage ``i`` on rank ``r``: training state plus the activations of the
  micro-batches the schedule keeps in flight on ``r`` (``schedules.in_flight``), plus what a
  recomputed layer needs while it runs. A parameter several parts of the rank read (tied
  input and output embeddings with one pipeline rank) is held once: each part's ILP counts
  it, so the state of all copies but the largest is taken off,

      state_r = Σ_{parts p on r} state_p − Σ_{shared w} (Σ_p state_p(w) − max_p state_p(w)).

``predicted_tflops_per_device`` counts model FLOPs (no recomputation): the graph's training
FLOPs for the global batch over the step time and the devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hierarchical_ap import schedules
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.plan import MemoryBreakdown
from stage_partitioner.layers import PlanningLayer
from stage_partitioner.stage_costs import PartSolver, StageOption, _graph_at, duplicate_bytes


@dataclass(frozen=True)
class Candidate:
    """Stages over ``layers`` with their options, micro-batching and schedule."""

    layers: tuple[PlanningLayer, ...]
    ranges: tuple[tuple[int, int], ...]
    options: tuple[StageOption, ...]
    microbatch: int
    num_microbatches: int
    schedule: str
    virtual_stages: int = 1

    @property
    def num_ranks(self) -> int:
        return len(self.ranges) // self.virtual_stages


@dataclass(frozen=True)
class StageEstimate:
    forward_s: float
    backward_s: float
    gradient_sync_s: float
    optimizer_s: float
    send_s: float
    """Moving this stage's output to the next stage (and its gradient back), per micro-batch."""
    state_bytes: float
    activation_bytes: float
    """Kept per micro-batch in flight."""
    extra_bytes: float

    @property
    def time_per_microbatch_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def closing_s(self) -> float:
        """What closes the step on this stage's devices: gradient sync plus optimizer step."""
        return self.gradient_sync_s + self.optimizer_s


@dataclass(frozen=True)
class Simulation:
    step_time_s: float
    stages: tuple[StageEstimate, ...]
    memory: tuple[MemoryBreakdown, ...]
    """Peak per device of each stage."""
    timeline: schedules.Timeline
    tflops_per_device: float

    @property
    def peak_memory_bytes(self) -> int:
        return max(m.total for m in self.memory)


class Simulator:
    """Evaluates candidates of one graph and cluster; part costs come from ``solver``."""

    def __init__(self, graph: OpGraph, cluster: Cluster, solver: PartSolver) -> None:
        self.graph = graph
        self.cluster = cluster
        self.solver = solver
        self.cost = solver.cost_model
        self._boundaries: dict[tuple, float] = {}

    def ensure_solved(self, candidate: Candidate) -> None:
        """Run the ILPs a candidate needs that the solver has not cached yet."""
        tasks = [
            (part, candidate.microbatch, option.mesh)
            for (first, last), option in zip(candidate.ranges, candidate.options, strict=True)
            for layer in candidate.layers[first : last + 1]
            for part in layer.parts
        ]
        self.solver.solve_all(tasks)

    def estimate(self, candidate: Candidate, index: int) -> StageEstimate | None:
        """One stage's costs; ``None`` when its mesh has no sharding for one of its parts."""
        first, last = candidate.ranges[index]
        option = candidate.options[index]
        costs = [
            self.solver.cost(part, candidate.microbatch, option.mesh, option.level)
            for layer in candidate.layers[first : last + 1]
            for part in layer.parts
        ]
        if any(c is None for c in costs):
            return None
        sync = sum(c.gradient_sync_s for c in costs)
        update = sum(c.optimizer_s for c in costs)
        total = sum(c.time_s for c in costs) - (sync + update) / candidate.num_microbatches
        forward = sum(c.forward_time_s for c in costs)
        kept = sum(c.activation_bytes for c in costs)
        if option.recompute == "full":
            total += forward
            activation = sum(c.input_bytes for c in costs)
            extra = max(c.activation_bytes for c in costs)
        else:
            activation, extra = kept, 0.0
        return StageEstimate(
            forward_s=forward,
            backward_s=total - forward,
            gradient_sync_s=sync,
            optimizer_s=update,
            send_s=self._send_time(candidate, index),
            state_bytes=sum(c.state_bytes for c in costs),
            activation_bytes=activation,
            extra_bytes=extra,
        )

    def simulate(self, candidate: Candidate) -> Simulation | None:
        """The candidate's step time, memory and timeline; ``None`` if a stage cannot run."""
        self.ensure_solved(candidate)
        estimates = [self.estimate(candidate, i) for i in range(len(candidate.ranges))]
        if any(e is None for e in estimates):
            return None
        tasks = schedules.build_schedule(
            candidate.schedule,
            candidate.num_ranks,
            candidate.num_microbatches,
            candidate.virtual_stages,
        )
        timeline = schedules.simulate(
            tasks,
            [e.forward_s for e in estimates],
            [e.backward_s for e in estimates],
            send_time=[e.send_s for e in estimates],
            virtual_stages=candidate.virtual_stages,
        )
        in_flight = schedules.in_flight(tasks)
        ranks = candidate.num_ranks
        step = 0.0
        for rank, timed in enumerate(timeline.per_rank()):
            end = max((t.end for t in timed), default=0.0)
            closing = sum(e.closing_s for e in estimates[rank::ranks])
            step = max(step, end + closing)
        shared = [self._duplicate_state_bytes(candidate, rank) for rank in range(ranks)]
        memory = tuple(
            _memory(self.solver, estimates, i, ranks, in_flight[i % ranks], shared[i % ranks])
            for i in range(len(estimates))
        )
        flops = _graph_at(self.graph, candidate.microbatch).train_flops
        total_flops = flops * candidate.num_microbatches
        tflops = total_flops / step / self.cluster.num_devices / 1e12 if step > 0 else 0.0
        return Simulation(step, tuple(estimates), memory, timeline, tflops)

    def _duplicate_state_bytes(self, candidate: Candidate, rank: int) -> float:
        """State that rank ``rank``'s parts count more than once (module docstring)."""
        copies: dict[str, list[float]] = {}
        for index in range(rank, len(candidate.ranges), candidate.num_ranks):
            first, last = candidate.ranges[index]
            option = candidate.options[index]
            for layer in candidate.layers[first : last + 1]:
                for part in layer.parts:
                    names = self.solver.shared.of(part)
                    if not names:
                        continue
                    cost = self.solver.cost(part, candidate.microbatch, option.mesh, option.level)
                    for fqn, key in names:
                        copies.setdefault(fqn, []).append(cost.param_state_bytes[key])
        return duplicate_bytes(copies)

    def _send_time(self, candidate: Candidate, index: int) -> float:
        if index + 1 >= len(candidate.ranges):
            return 0.0
        last = candidate.ranges[index][1]
        nbytes = self._boundary_bytes(candidate.layers, last, candidate.microbatch)
        receiver = candidate.options[index + 1].mesh
        link = self.cluster.inter_host_link
        if receiver.submesh[0] == 1 and candidate.options[index].mesh.submesh[0] == 1:
            link = self.cluster.intra_host_link if self.cluster.num_hosts == 1 else link
        return self.cost.send_recv_time(nbytes / receiver.logical[0], link)

    def _boundary_bytes(self, layers: Sequence[PlanningLayer], last: int, batch: int) -> float:
        """Bytes of the values layers ``..last`` produce that later layers read."""
        key = (id(layers[0]), len(layers), last, batch)
        if key not in self._boundaries:
            graph = _graph_at(self.graph, batch)
            before = {n for layer in layers[: last + 1] for n in layer.nodes}
            after = [n for layer in layers[last + 1 :] for n in layer.nodes]
            crossing = {v for n in after for v in graph.nodes[n].inputs if v in before}
            self._boundaries[key] = float(sum(graph.value_bytes(v) for v in crossing))
        return self._boundaries[key]


def _memory(
    solver: PartSolver,
    estimates: Sequence[StageEstimate],
    index: int,
    ranks: int,
    in_flight: int,
    duplicate_state: float,
) -> MemoryBreakdown:
    """Peak per device of stage ``index``'s rank: all of the rank's chunks share the devices;
    ``duplicate_state``: state its parts count more than once."""
    own = [e for i, e in enumerate(estimates) if i % ranks == index % ranks]
    state = sum(e.state_bytes for e in own) - duplicate_state
    per_chunk = sum(e.activation_bytes for e in own) / len(own)
    activations = in_flight * per_chunk + max(e.extra_bytes for e in own)
    factors = solver.training_memory
    weights = state / (1 + factors.gradient_factor + factors.optimizer_factor)
    return MemoryBreakdown(
        parameters=int(weights),
        gradients=int(weights * factors.gradient_factor),
        optimizer=int(weights * factors.optimizer_factor),
        activations=int(math.ceil(activations)),
    )


def candidate_from_plan(context, plan) -> Candidate:
    """The candidate a saved ``ParallelPlan`` describes, to simulate it again.

    Its layers are re-derived from their node ranges; each stage keeps the memory level whose parameter
    placements the plan recorded.
    """
    from stage_partitioner.stage_costs import MeshChoice, StageOption

    layers = _planning_layers_of(context.graph, plan)
    options = []
    for stage in plan.stages:
        mesh = MeshChoice(tuple(stage.submesh), tuple(stage.logical_mesh))
        recompute = "full" if stage.recompute == "full" else "none"
        level = _recorded_level(context, layers, stage, mesh, plan.micro_batch_size)
        options.append(StageOption(mesh, level, recompute))
    return Candidate(
        layers,
        tuple(tuple(stage.layers) for stage in plan.stages),
        tuple(options),
        plan.micro_batch_size,
        plan.num_microbatches,
        plan.schedule,
        plan.virtual_stages,
    )


def _planning_layers_of(graph: OpGraph, plan) -> tuple[PlanningLayer, ...]:
    """The planner's layering (coarse or one per block) whose node ranges the plan lists."""
    from hierarchical_ap.errors import PlanError
    from stage_partitioner.layers import planning_layers

    wanted = [(layer.first_node, layer.last_node) for layer in plan.layers]
    for max_layers in sorted({len(plan.layers), 32, max(len(graph.layers), 1)}):
        layers = planning_layers(graph, max_layers=max_layers)
        if [(layer.nodes[0], layer.nodes[-1]) for layer in layers] == wanted:
            return tuple(layers)
    raise PlanError(
        "the plan's layers are not a layering the planner makes of this model; "
        "re-run `hap plan` to write a new plan"
    )


def _recorded_level(context, layers, stage, mesh, microbatch: int) -> int:
    """The memory level whose parameter placements the plan recorded for this stage."""
    from stage_partitioner.stage_costs import MEMORY_LEVELS, layer_prefix

    first, last = stage.layers
    parts = [p for layer in layers[first : last + 1] for p in layer.parts]
    context.solver.solve_all([(p, microbatch, mesh) for p in parts])
    recorded = dict(stage.param_placements)
    for level in range(MEMORY_LEVELS):
        placements: dict[str, tuple[str, ...]] = {}
        for part in parts:
            cost = context.solver.cost(part, microbatch, mesh, level)
            if cost is None:
                break
            prefix = layer_prefix(context.graph, part.nodes)
            placements.update({prefix + name: p for name, p in cost.param_placements.items()})
        if placements == recorded:
            return level
    return 0
