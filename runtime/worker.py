"""What one device's worker does: join the process groups, build its stages, run its list.

``PipelineWorker`` is plain Python (the Ray actor in ``runtime.actors`` wraps it; tests also run
it on bare gloo processes). Its life:

1. ``join``: ``torch.distributed`` with the global group (gloo on CPU, NCCL on GPU) and a
   timeout, so a vanished peer surfaces as an error instead of a hang;
2. ``build``: capture the model at the micro-batch size (and at the local batch of a
   data-parallel mesh, for stages that run plain data parallelism on their rows:
   ``intra_op.local_execution``), slice it into the plan's stages, make
   one ``DeviceMesh`` per pipeline rank (every worker creates every mesh and group, in the same
   order, as ``torch.distributed`` requires), the ``StageProgram`` of each stage this worker
   holds (sharded from the model's weights, or, for a meta-device model, allocated as empty
   shards and initialised in place, shard by shard, by ``init_held``: the model's own
   initialisation with random draws keyed by ``(init_seed, FQN, index)``, so only this
   worker's stages' parameters are materialised, and of a sharded one only its shard where
   the initialisation is elementwise; ``initialisation_report`` says what it allocated), one
   group per parameter that several stages read (a tied embedding), the optimizer over its shards
   (``runtime.optimizer``: plain-tensor aliases of the local shards where that is exact), and
   its static instruction lists (the schedule's, and the forwards-only one ``eval_step``
   runs), and the seed of its random ops (dropout): one stream per pipeline rank, shared by
   the devices of its mesh. The plan's precision (``runtime.precision``) decides the dtype
   the model is captured and run in and the dtype the parameters are stored in (fp32 masters
   under bf16);
3. ``train_step``: run the list over the global batch's micro-batches, then synchronise the
   gradients of parameters shared between stages (sum of the stages' full gradients, stored
   back in each copy's placement), clip them by their global norm if asked
   (``runtime.grad_clip``: one all-reduce of a scalar over all workers), then step the
   optimizer on every shard, and the learning-rate schedule after it. Data-parallel
   gradient reduction inside a stage runs once per step, when the stage's last backward
   closes its step (``ShardedProgram.close_step``: the micro-batches' partial gradients are
   summed locally and all-reduced in buckets; ``intra_op.gradient_sync``), while a
   parameter stored sharded over the data axis has its gradient reduce-scattered in every
   backward.
4. ``save_checkpoint`` / ``load_checkpoint``: DCP save of the shards it owns (parameters,
   persistent buffers, optimizer state; rank 0 adds the learning-rate schedule's state) or
   load of the shards it holds, resharded (``runtime.checkpoint``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _set_pg_timeout
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import _random as dtensor_random

from hierarchical_ap.errors import CaptureError
from hierarchical_ap.graph import OpGraph, capture
from hierarchical_ap.models.materialize import InitReport, init_held, meta_copy
from hierarchical_ap.plan import ParallelPlan, PlanStage
from hierarchical_ap.schedules import BACKWARD, FORWARD, build_schedule, forward_only
from runtime import boundary, checkpoint, grad_clip
from runtime.instructions import (
    FREE,
    RECV_ACTIVATION,
    RECV_GRADIENT,
    SEND_ACTIVATION,
    SEND_GRADIENT,
    Instruction,
    ReceivePosting,
    build_instructions,
    receive_posting,
)
from runtime.optimizer import LRSchedulerFn, OptimizerFn, ShardOptimizer
from runtime.precision import PrecisionPolicy, master_fingerprint, policy_for
from runtime.stage_graph import slice_stages
from runtime.stage_program import StageProgram, batch_placements, full_parameters
from runtime.step_trace import CLIP_GRADIENTS, OPTIMIZER, SYNC_SHARED, WAIT_SENDS, TimedOp

logger = logging.getLogger(__name__)

RANDOM_STREAM_STRIDE = 1 << 20
"""Seeds of consecutive pipeline ranks' random streams lie this far apart."""


@dataclass(frozen=True)
class TrainingProgram:
    """Everything a worker needs to build its stages (pickled to every worker)."""

    plan: ParallelPlan
    model: nn.Module
    """Real weights, or on the meta device (initialised on the workers)."""
    microbatch_inputs: Any
    """Example model inputs of one micro-batch (tuple or dict of tensors; meta is fine)."""
    microbatch_targets: Any
    loss_fn: Callable[..., torch.Tensor] | None
    optimizer_fn: OptimizerFn
    init_seed: int = 0
    max_grad_norm: float | None = None
    """Clip the gradients to this global L2 norm before each optimizer step (``None``: not)."""
    lr_scheduler_fn: LRSchedulerFn | None = None
    """Builds the learning-rate schedule over the worker's optimizer; stepped after it."""


def _wait_all(transfers: Iterable[boundary.PendingTransfer]) -> None:
    for transfer in transfers:
        transfer.wait()


def model_leaves(inputs: Any) -> list[Any]:
    """The model inputs' leaves in the order ``capture`` numbers them."""
    if isinstance(inputs, Mapping):
        return pytree.tree_leaves(((), dict(inputs)))
    if isinstance(inputs, (tuple, list)):
        return pytree.tree_leaves((tuple(inputs), {}))
    return pytree.tree_leaves(((inputs,), {}))


def _first_rows(value: Any, batch: int | None, rows: int) -> Any:
    """``value`` with every tensor whose dim 0 is ``batch`` cut to its first ``rows`` rows."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t[:rows] if t.dim() > 0 and t.shape[0] == batch else t, value
    )


def to_meta(value: Any) -> Any:
    """``value`` with every tensor (at any depth) moved to the meta device."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), value)


def is_on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def pipeline_layout(plan: ParallelPlan) -> list[tuple[int, ...]]:
    """Stage → the global worker ranks (device ids) it runs on, row-major over its mesh."""
    return [tuple(stage.devices) for stage in plan.stages]


class PipelineWorker:
    """One device's worker (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.programs: dict[int, StageProgram] = {}
        self.last_step_trace: tuple[TimedOp, ...] = ()
        """The timeline of the last ``train_step`` (``runtime.step_trace``; host-side times, so
        on a GPU a forward or backward shows when its kernels were launched, not run)."""

    # ------------------------------------------------------------------------ setting up

    def join(self, init_method: str) -> None:
        dist.init_process_group(
            self.backend,
            init_method=init_method,
            rank=self.rank,
            world_size=self.world_size,
            timeout=self.timeout,
        )

    def build(self, program: TrainingProgram) -> dict[str, Any]:
        """Build this worker's stages; returns which stages it runs and which user inputs
        (``"inputs"``, ``"targets"``) it reads."""
        plan = program.plan
        self.plan = plan
        self.policy: PrecisionPolicy = policy_for(plan.precision)
        self.graph = self._capture(program)
        self.slices = slice_stages(self.graph, plan)
        layout = pipeline_layout(plan)
        p = plan.num_ranks
        meshes = [
            DeviceMesh(
                self.device.type,
                torch.tensor(layout[r]).reshape(plan.stages[r].logical_mesh),
            )
            for r in range(p)
        ]
        self.pipeline_rank = next(r for r in range(p) if self.rank in layout[r])
        self.mesh = meshes[self.pipeline_rank]
        for dim in range(self.mesh.ndim):
            # DeviceMesh makes its groups with torch's 30-minute default timeout
            _set_pg_timeout(self.timeout, self.mesh.get_group(dim))
        state = self._initial_state(program)
        held = [s for s in range(len(plan.stages)) if s % p == self.pipeline_rank]
        local_graph = self._local_graph(program, [plan.stages[s] for s in held])
        for s in held:
            self.programs[s] = StageProgram(
                self.graph,
                self.slices[s],
                plan.stages[s],
                self.mesh,
                state,
                num_microbatches=plan.num_microbatches,
                master_dtype=self.policy.master_dtype,
                local_graph=local_graph,
            )
        del state
        self.init_report = self._initialise_shards(program)
        self.shared = self._shared_parameter_groups(layout)
        self.channels = self._boundary_groups(layout)
        self._plans: dict[
            tuple[int, int, int],
            tuple[boundary.TransferPlan, boundary.MeshSide, boundary.MeshSide],
        ] = {}
        self._axis_groups = {axis: self.mesh.get_group(axis) for axis in range(self.mesh.ndim)}
        self.optimizer = ShardOptimizer(program.optimizer_fn, self._unique_parameters())
        self.max_grad_norm = program.max_grad_norm
        self.last_grad_norm: float | None = None
        """N of the last step's clipping (``runtime.grad_clip``), before clipping."""
        self.lr_scheduler = (
            None
            if program.lr_scheduler_fn is None
            else program.lr_scheduler_fn(self.optimizer.optimizer)
        )
        tasks = build_schedule(plan.schedule, p, plan.num_microbatches, plan.virtual_stages)
        self.instructions: list[Instruction] = build_instructions(tasks, layout)[self.rank]
        self.receive_posting = receive_posting(self.instructions)
        self._layout = layout
        self._eval_lists: dict[int, tuple[list[Instruction], ReceivePosting]] = {}
        """Micro-batches → the forwards-only instruction list of that many, and its posting."""
        self._seed_random_streams(program.init_seed)
        reads = {name for s in self.programs for name in self.slices[s].user_inputs}
        return {
            "stages": sorted(self.programs),
            "inputs": bool(reads & set(self.graph.model_inputs)),
            "targets": bool(reads & set(self.graph.target_inputs)),
            "reports_loss": self._reports_loss(),
            "master_fingerprint": master_fingerprint(self.graph, self.policy),
            "lr_scheduler": None if self.lr_scheduler is None else type(self.lr_scheduler).__name__,
        }

    def _seed_random_streams(self, seed: int) -> None:
        """Seed the random ops of training (dropout): the workers of pipeline rank r draw from
        ``seed + RANDOM_STREAM_STRIDE·r``, the same stream on every device of a mesh (DTensor's
        rule for SPMD random ops: replicas draw the same values) and another per pipeline
        rank (as Megatron-LM and torchtitan seed stages). On GPUs, DTensor's random-number
        tracker is made here, on every worker, so that the first dropout on a DTensor does
        not make it lazily, with a broadcast over all workers that only one stage's workers
        would join."""
        stream = seed + RANDOM_STREAM_STRIDE * self.pipeline_rank
        torch.manual_seed(stream)
        if self.device.type == "cuda":
            dtensor_random.manual_seed(stream, self.mesh)

    def _capture(self, program: TrainingProgram, rows: int | None = None) -> OpGraph:
        """The model's training program at the micro-batch size (or at its first ``rows``
        rows: every input and target whose dim 0 is the micro-batch is cut), in the compute
        dtype."""
        model = program.model
        dtype = self.policy.compute_dtype
        if not is_on_meta(model) or dtype is not None:
            model = meta_copy(model, dtype)
        inputs, targets = to_meta(program.microbatch_inputs), to_meta(program.microbatch_targets)
        if rows is not None:
            inputs, targets = _first_rows((inputs, targets), self.graph.batch_size, rows)
        return capture(
            model, self.policy.compute_inputs(inputs), loss_fn=program.loss_fn, targets=targets
        )

    def _local_graph(self, program: TrainingProgram, stages: list[PlanStage]) -> OpGraph | None:
        """The program captured at the local batch of this worker's mesh, when one of its
        stages may run data-parallel on plain local shards (``intra_op.local_execution``):
        every parameter replicated, the batch split along mesh axis 0 (``StageProgram``);
        ``None`` otherwise, or when the model does not capture at that batch."""
        rows, batch = self.mesh.shape[0], self.graph.batch_size
        replicated = any(
            all(p == "R" for ps in stage.param_placements.values() for p in ps) for stage in stages
        )
        if rows == 1 or not batch or batch % rows or not replicated:
            return None
        try:
            return self._capture(program, batch // rows)
        except CaptureError as exc:
            logger.info("no local graph at batch %d: %s", batch // rows, str(exc).splitlines()[0])
            return None

    def _initial_state(self, program: TrainingProgram) -> nn.Module | None:
        """The full weights the stage programs are sharded from: the model's own, or ``None``
        for a meta-device model (the programs allocate empty shards; ``_initialise_shards``)."""
        return None if is_on_meta(program.model) else program.model

    def _initialise_shards(self, program: TrainingProgram) -> InitReport | None:
        """Initialise the empty shards of a meta-device model's parameters and buffers that
        this worker's stages hold, in place (``hierarchical_ap.models.materialize``)."""
        if not is_on_meta(program.model):
            return None
        held: dict[str, list[torch.Tensor]] = {}
        for s in sorted(self.programs):
            module = self.programs[s].program
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                held.setdefault(name, []).append(tensor)
        report = init_held(program.model, program.init_seed, held)
        logger.info(
            "worker %d initialised %d tensors shard by shard and %d whole (%d bytes held)",
            self.rank,
            len(report.replayed),
            len(report.whole),
            report.held_bytes,
        )
        return report

    def initialisation_report(self) -> InitReport | None:
        """What initialising a meta-device model materialised here (``None``: real weights)."""
        return self.init_report

    def _shared_parameter_groups(
        self, layout: list[tuple[int, ...]]
    ) -> list[tuple[str, list[int], Any]]:
        """(FQN, stages reading it, group of their workers) per parameter several stages read;
        every worker creates every group, in FQN order."""
        readers: dict[str, list[int]] = {}
        for stage_slice in self.slices:
            for fqn in stage_slice.params:
                readers.setdefault(fqn, []).append(stage_slice.index)
        shared = []
        for fqn in sorted(readers):
            stages = readers[fqn]
            if len(stages) < 2:
                continue
            ranks = sorted({w for s in stages for w in layout[s]})
            group = dist.new_group(ranks, timeout=self.timeout) if len(ranks) > 1 else None
            if self.rank in ranks:
                shared.append((fqn, stages, group))
        return shared

    def _boundary_groups(self, layout: list[tuple[int, ...]]) -> dict[tuple[int, int], Any]:
        """(kind, sending stage) → the process group of the two stages' workers that carries
        that direction of the boundary (one per direction, so each group's messages run in
        micro-batch order on both sides; NCCL matches no tags). Every worker creates every
        group, in boundary order."""
        channels = {}
        for s in range(len(layout) - 1):
            common = sorted(set(layout[s]) & set(layout[s + 1]))
            if common:
                raise ValueError(
                    f"stages {s} and {s + 1} share workers {common}; consecutive stages must run "
                    "on different workers: re-plan with more pipeline ranks"
                )
            ranks = sorted({*layout[s], *layout[s + 1]})
            for kind, sender in ((boundary.ACTIVATION, s), (boundary.GRADIENT, s + 1)):
                group = dist.new_group(ranks, timeout=self.timeout)
                if self.rank in ranks:
                    channels[kind, sender] = group
                    if self.backend == "nccl":
                        # NCCL: the first operation on a group must involve all its ranks
                        dist.barrier(group=group)
        return channels

    def _unique_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for program in self.programs.values():
            for param in program.parameters_by_fqn().values():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def _is_mesh_origin(self) -> bool:
        coordinate = self.mesh.get_coordinate()
        return coordinate is not None and all(c == 0 for c in coordinate)

    def _reports_loss(self) -> bool:
        return any(p.is_last for p in self.programs.values()) and self._is_mesh_origin()

    # -------------------------------------------------------------------------- training

    def train_step(self, inputs: Any, targets: Any) -> list[float] | None:
        """One optimizer step on the global batch; the micro-batch losses from the worker
        that reports them, else None."""
        user = self._microbatch_inputs(inputs, targets, self.plan.num_microbatches)
        self.optimizer.zero_grad()
        clock = time.perf_counter
        began = clock()
        losses, pending, trace = self._run_list(
            self.instructions, self.receive_posting, user, began, evaluate=False
        )
        for phase, run in (
            (WAIT_SENDS, lambda: _wait_all(pending)),
            (SYNC_SHARED, self._sync_shared_gradients),
            (CLIP_GRADIENTS, self._clip_gradients),
            (OPTIMIZER, self._optimizer_step),
        ):
            started = clock() - began
            run()
            trace.append(TimedOp(phase, -1, -1, started, clock() - began))
        self.last_step_trace = tuple(trace)
        return self._reported(losses, self.plan.num_microbatches)

    def eval_step(self, inputs: Any, targets: Any, num_microbatches: int) -> list[float] | None:
        """The losses of a batch of ``num_microbatches`` micro-batches (of the plan's size) in
        evaluation form (forwards only, ``StageProgram.evaluate``; no gradient, no parameter
        or buffer changes) from the worker that reports them, else None."""
        if num_microbatches not in self._eval_lists:
            tasks = forward_only(self.plan.num_ranks, num_microbatches, self.plan.virtual_stages)
            steps = build_instructions(tasks, self._layout)[self.rank]
            self._eval_lists[num_microbatches] = (steps, receive_posting(steps))
        steps, posting = self._eval_lists[num_microbatches]
        user = self._microbatch_inputs(inputs, targets, num_microbatches)
        losses, pending, _ = self._run_list(
            steps, posting, user, time.perf_counter(), evaluate=True
        )
        _wait_all(pending)
        return self._reported(losses, num_microbatches)

    def _reported(self, losses: Mapping[int, float], num_microbatches: int) -> list[float] | None:
        if not self._reports_loss():
            return None
        return [losses[mb] for mb in range(num_microbatches)]

    def _run_list(
        self,
        steps: list[Instruction],
        posting: ReceivePosting,
        user: list[dict[str, Any]],
        began: float,
        *,
        evaluate: bool,
    ) -> tuple[dict[int, float], list[boundary.PendingTransfer], list[TimedOp]]:
        """Run an instruction list (forwards in evaluation form with ``evaluate``): the
        micro-batch losses this worker computed, its sends still in flight and the timeline
        (seconds since ``began``)."""
        clock = time.perf_counter
        losses: dict[int, float] = {}
        inbox: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        outbox: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        pending: list[boundary.PendingTransfer] = []
        trace: list[TimedOp] = []
        posted = {i: self._start_receive(steps[i]) for i in posting.at_start}
        for index, step in enumerate(steps):
            started = clock() - began
            program = self.programs[step.stage]
            mb = step.microbatch
            if step.op in (RECV_ACTIVATION, RECV_GRADIENT):
                following = posting.after.get(index)
                if following is not None:
                    posted[following] = self._start_receive(steps[following])
                received = [boundary.finish(t, dst, self.mesh) for t, dst in posted.pop(index)]
                if step.op == RECV_ACTIVATION:
                    inbox["act", step.stage, mb] = received
                else:
                    grads = iter(received)
                    inbox["grad", step.stage, mb] = [
                        next(grads) if needs else None for needs in program.sent_needs_grad
                    ]
            elif step.op == FORWARD:
                received = inbox.pop(("act", step.stage, mb), [])
                if evaluate:
                    sent, loss = program.evaluate(received, user[mb])
                else:
                    sent, loss = program.forward(mb, received, user[mb])
                outbox["act", step.stage, mb] = sent
                if loss is not None:
                    losses[mb] = float(loss)
            elif step.op == SEND_ACTIVATION:
                pending += self._send(
                    step, outbox.pop(("act", step.stage, mb)), boundary.ACTIVATION
                )
            elif step.op == BACKWARD:
                grads = inbox.pop(("grad", step.stage, mb), None)
                outbox["grad", step.stage, mb] = program.backward(mb, grads)
            elif step.op == FREE:
                program.free(mb)
            elif step.op == SEND_GRADIENT:
                pending += self._send(step, outbox.pop(("grad", step.stage, mb)), boundary.GRADIENT)
            trace.append(TimedOp(step.op, step.stage, mb, started, clock() - began))
        return losses, pending, trace

    def step_trace(self) -> tuple[TimedOp, ...]:
        """``last_step_trace`` (a method, so a Ray actor can return it)."""
        return self.last_step_trace

    def grad_norm(self) -> float | None:
        """``last_grad_norm`` (a method, so a Ray actor can return it)."""
        return self.last_grad_norm

    def _clip_gradients(self) -> None:
        """Clip every gradient this worker holds by the model's global norm (see
        ``runtime.grad_clip``): each parameter's pieces count once, a parameter several stages
        read in its first stage's copy only."""
        if self.max_grad_norm is None:
            return
        first_reader = {fqn: stages[0] for fqn, stages, _ in self.shared}
        coordinate = self.mesh.get_coordinate()
        counted, held = [], []
        for s, program in sorted(self.programs.items()):  # each stage's own parameters
            for fqn, param in program.parameters_by_fqn().items():
                grad = param.grad
                if grad is None:
                    continue
                piece = grad_clip.local_piece(grad)
                held.append(piece)
                placements = grad.placements if isinstance(grad, DTensor) else param.placements
                if first_reader.get(fqn, s) == s and grad_clip.counts_on(placements, coordinate):
                    counted.append(piece)
        self.last_grad_norm = grad_clip.clip_by_global_norm(
            counted, held, self.max_grad_norm, self.device
        )

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _microbatch_inputs(
        self, inputs: Any, targets: Any, num_microbatches: int
    ) -> list[dict[str, torch.Tensor]]:
        values: dict[str, torch.Tensor] = {}
        if inputs is not None:
            leaves = self.policy.compute_inputs(model_leaves(inputs))
            values.update(zip(self.graph.model_inputs, leaves, strict=True))
        if targets is not None:
            values.update(zip(self.graph.target_inputs, pytree.tree_leaves(targets), strict=True))
        return [
            {name: t.chunk(num_microbatches)[mb] for name, t in values.items()}
            for mb in range(num_microbatches)
        ]

    def _side(self, stage: int, shape: torch.Size, receiving: bool) -> boundary.MeshSide:
        """Stage ``stage``'s mesh and a value's placement on it: the placement the stage's
        program reads a received value in, or the boundary placement it sends a value in."""
        logical = tuple(self.plan.stages[stage].logical_mesh)
        ranks = np.array(self.plan.stages[stage].devices).reshape(logical)
        if receiving:
            placements = batch_placements(shape, self.graph.batch_size or 0, logical)
        else:
            placements = boundary.boundary_placements(shape, logical)
        return boundary.MeshSide(ranks, tuple(placements))

    def _sides(
        self, kind: int, from_stage: int, shape: torch.Size
    ) -> tuple[boundary.MeshSide, boundary.MeshSide]:
        """(source, destination) of a boundary value: an activation goes from the sender's
        boundary placement to the receiver's input placement, its gradient the other way."""
        if kind == boundary.ACTIVATION:
            return self._side(from_stage, shape, False), self._side(from_stage + 1, shape, True)
        return self._side(from_stage, shape, True), self._side(from_stage - 1, shape, False)

    def _transfer_plan(
        self, kind: int, from_stage: int, index: int, shape: torch.Size, dtype: torch.dtype
    ) -> tuple[boundary.TransferPlan, boundary.MeshSide, boundary.MeshSide]:
        key = (kind, from_stage, index)
        planned = self._plans.get(key)
        if planned is None:
            src, dst = self._sides(kind, from_stage, shape)
            planned = self._plans[key] = (boundary.transfer_plan(shape, dtype, src, dst), src, dst)
        return planned

    def _send(
        self, step: Instruction, tensors: list[torch.Tensor], kind: int
    ) -> list[boundary.PendingTransfer]:
        """Post this worker's pieces of every value (in value order) to the next stage's (an
        activation) or the previous stage's (a gradient) workers."""
        pending = []
        for i, tensor in enumerate(tensors):
            plan, src, _ = self._transfer_plan(kind, step.stage, i, tensor.shape, tensor.dtype)
            pending.append(
                boundary.start(
                    plan,
                    boundary.local_piece(tensor, src),
                    self.rank,
                    self.channels[kind, step.stage],
                    None,
                    tensor.dtype,
                    self.device,
                )
            )
        return pending

    def _start_receive(
        self, step: Instruction
    ) -> list[tuple[boundary.PendingTransfer, boundary.MeshSide]]:
        """Post the receives of a ``recv_*`` step (this worker's piece of every value it
        brings, in value order: the stage's inputs, or the gradients of the sent values that
        need one); ``boundary.finish`` each to wait for it (raises on timeout or a vanished
        peer)."""
        program = self.programs[step.stage]
        if step.op == RECV_ACTIVATION:
            kind, from_stage, metas = boundary.ACTIVATION, step.stage - 1, program.received_metas
        else:
            kind, from_stage = boundary.GRADIENT, step.stage + 1
            metas = [
                m
                for m, needs in zip(program.sent_metas, program.sent_needs_grad, strict=True)
                if needs
            ]
        started = []
        for i, (shape, dtype) in enumerate(metas):
            plan, _, dst = self._transfer_plan(kind, from_stage, i, shape, dtype)
            transfer = boundary.start(
                plan,
                None,
                self.rank,
                self.channels[kind, from_stage],
                self._axis_groups,
                dtype,
                self.device,
            )
            started.append((transfer, dst))
        return started

    def _sync_shared_gradients(self) -> None:
        """Sum the full gradients of a parameter read by several stages over those stages
        (one contribution per stage, from its mesh origin) and store the sum in every copy."""
        for fqn, stages, group in self.shared:
            mine = [self.programs[s].parameters_by_fqn()[fqn] for s in stages if s in self.programs]
            if not mine[0].requires_grad:  # frozen: no gradient on any copy
                continue
            total = torch.zeros(mine[0].shape, dtype=mine[0].dtype, device=self.device)
            for param in mine:
                if param.grad is not None:
                    grad = (
                        param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
                    )
                    if self._is_mesh_origin():
                        total += grad
            if group is not None:
                dist.all_reduce(total, group=group)
            for param in mine:
                param.grad = distribute_tensor(
                    total, self.mesh, param.placements, src_data_rank=None
                )

    # ------------------------------------------------------------------------- state

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full parameters and buffers of this worker's stages, from the mesh origin (other
        workers of the stage join the gathers and return nothing). Parameters are in the dtype
        they are stored in (the fp32 masters under bf16), floating buffers in that dtype too
        (under bf16 they hold bf16 values, as ``model.to(torch.bfloat16)`` would)."""
        state: dict[str, torch.Tensor] = {}
        master = self.policy.master_dtype
        for program in self.programs.values():
            state.update(full_parameters(program))
            for name, buffer in program.program.named_buffers():
                value = buffer.full_tensor() if isinstance(buffer, DTensor) else buffer
                if master is not None and value.is_floating_point():
                    value = value.to(master)
                state[name] = value.detach().clone()
        return {k: v.cpu() for k, v in state.items()} if self._is_mesh_origin() else {}

    def optimizer_class(self) -> str:
        return self.optimizer.class_name

    def stage_dtypes(self) -> dict[int, dict[str, list[str]]]:
        """Stage → the dtypes of the values it receives and sends (what the transfer buffers
        are allocated in), of its parameters (as stored) and of the gradients they hold."""
        return {
            s: {
                "received": [str(dtype) for _, dtype in program.received_metas],
                "sent": [str(dtype) for _, dtype in program.sent_metas],
                "parameters": sorted({str(p.dtype) for p in program.parameters_by_fqn().values()}),
                "gradients": sorted(
                    {
                        str(p.grad.dtype)
                        for p in program.parameters_by_fqn().values()
                        if p.grad is not None
                    }
                ),
            }
            for s, program in sorted(self.programs.items())
        }

    def save_checkpoint(self, directory: str) -> None:
        """Save the shards of the tensors this worker owns, and their optimizer state, into
        ``directory`` with DCP (every worker calls it; see ``runtime.checkpoint``)."""
        held, lowest = self._held_state()
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, lowest)
        owners = checkpoint.lowest_holders(gathered)
        owned = {
            key: copies[0].detach() for key, copies in held.items() if owners[key] == lowest[key]
        }
        params = self._first_parameter_copies()
        state = dict(owned)
        state.update(
            checkpoint.optimizer_entries(
                {fqn: self.optimizer.state_of(p) for fqn, p in params.items() if fqn in owned}
            )
        )
        if self.lr_scheduler is not None and self.rank == 0:
            state[checkpoint.LR_SCHEDULER_KEY] = checkpoint.scheduler_entry(self.lr_scheduler)
        checkpoint.save_shards(state, Path(directory))

    def load_checkpoint(self, directory: str) -> None:
        """Load every tensor this worker holds, the optimizer state of its parameters and the
        learning-rate schedule's state (if both the checkpoint and this worker have one) from
        the DCP checkpoint in ``directory``, resharded to this plan's placements."""
        held, _ = self._held_state()
        params = self._first_parameter_copies()
        saved = checkpoint.saved_entries(directory)
        templates = checkpoint.optimizer_templates(saved, params)
        state: dict[str, Any] = {key: copies[0].detach() for key, copies in held.items()}
        for fqn, entries in templates.items():
            state.update({checkpoint.optimizer_key(fqn, n): v for n, v in entries.items()})
        schedule = self.lr_scheduler is not None and checkpoint.LR_SCHEDULER_KEY in saved
        if schedule:
            state[checkpoint.LR_SCHEDULER_KEY] = None
        checkpoint.load_shards(state, Path(directory))
        if schedule:
            checkpoint.load_scheduler_entry(self.lr_scheduler, state[checkpoint.LR_SCHEDULER_KEY])
        for copies in held.values():
            for other in copies[1:]:
                checkpoint.copy_into(other, copies[0])
        for fqn, entries in templates.items():
            loaded = {name: state[checkpoint.optimizer_key(fqn, name)] for name in entries}
            for copy_ in self._parameter_copies(fqn):
                self.optimizer.load_state(
                    copy_,
                    loaded
                    if copy_ is params[fqn]
                    else {n: checkpoint.clone_like(v, copy_) for n, v in loaded.items()},
                )

    def _held_state(self) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
        """Key → every copy of that parameter or persistent buffer this worker holds (in
        stage order), and key → the lowest of its stages that holds it."""
        held: dict[str, list[torch.Tensor]] = {}
        lowest: dict[str, int] = {}
        for s in sorted(self.programs):
            module = self.programs[s].program
            buffers = dict(module.named_buffers())
            persistent = {
                k: v for k, v in module.state_dict(keep_vars=True).items() if k in buffers
            }
            for key, value in [*self.programs[s].parameters_by_fqn().items(), *persistent.items()]:
                held.setdefault(key, []).append(value)
                lowest.setdefault(key, s)
        return held, lowest

    def _parameter_copies(self, fqn: str) -> list[nn.Parameter]:
        return [
            p.parameters_by_fqn()[fqn]
            for _, p in sorted(self.programs.items())
            if fqn in p.parameters_by_fqn()
        ]

    def _first_parameter_copies(self) -> dict[str, nn.Parameter]:
        first: dict[str, nn.Parameter] = {}
        for s in sorted(self.programs):
            for fqn, param in self.programs[s].parameters_by_fqn().items():
                first.setdefault(fqn, param)
        return first

    def stages(self) -> Iterable[int]:
        return sorted(self.programs)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
