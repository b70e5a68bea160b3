"""One pipeline stage's program: its slice of the captured graph, sharded with DTensor.

``StageProgram`` wraps ``intra_op.apply`` restricted to the stage's nodes on the stage's
``DeviceMesh``:

* parameters are stored as the plan's ``param_placements`` say (``"R"`` / ``"S(d)"`` per
  logical mesh axis; replicated where the plan names none);
* user inputs, and values received from the previous stage, enter split along the batch
  (``Shard(0)``) on mesh axis 0 — the data-parallel axis of the planner's ``(D/t, t)`` logical
  meshes — when their first dim is the micro-batch and divides evenly, else replicated;
* every node's placements are those DTensor's own sharding rules give from there
  (``propagate_solution`` on zero-valued inputs of the micro-batch's shapes; the plan stores
  parameter placements, not per-node ones), so tensor parallelism (sharded weights) and data
  parallelism (sharded batch) inside a stage run for real.

``forward(mb, received, user_inputs)`` returns the tensors to send on (``runtime.boundary``)
and, on the last stage, the micro-batch's loss; ``backward(mb, grads)`` runs autograd from the
sent tensors (or from ``loss / num_microbatches`` on the last stage), accumulating parameter
gradients locally (``ShardedProgram.open_step``), and returns the gradients of the received
values;
``free(mb)`` drops what the micro-batch kept; ``evaluate(received, user_inputs)`` is the
forward in evaluation form (``intra_op.evaluation``), without autograd and keeping nothing.
Summing ``loss_i / m`` over the ``m`` equal micro-batches gives the gradient of the mean loss
over the global batch (for a loss that is a mean over the batch).

Execution is chosen by the mesh (``ShardedProgram.run_part``): on a one-device mesh (``tp=1,
dp=1`` stages, as Megatron runs plain modules at ``tp=1``) the slice runs as a compiled
``fx.GraphModule`` on plain tensors (``ShardedProgram.run_plain_part``), and received and sent
values stay the plain full tensors they are (``runtime.boundary``'s DTensor wrapping is the
identity there). On a larger mesh, a stage that is plain data parallelism (every parameter
replicated, the batch split along axis 0, a forward DTensor runs without collectives:
``intra_op.local_execution``) runs the same compiled module on each device's rows, built from
``local_graph``, the program the worker captured at the local batch; received and sent values
are DTensors whose local tensors it reads and writes. Any other stage runs node by node on
DTensors. Either way the parameters
are wrapped once per optimizer step (``ShardedProgram.open_step``): every schedule runs a
stage's forwards in micro-batch order, so the forward of micro-batch 0 opens the step, and the
``m``-th backward closes it: the gradients accumulated over the step are reduced to the
parameters' placements once (on a data-parallel mesh, one bucketed all-reduce per replicating
axis instead of one all-reduce per parameter and micro-batch; ``intra_op.gradient_sync``) and
handed to the DTensor parameters before the worker synchronises shared parameters and steps.

Mixed precision (``runtime.precision``): the graph is captured in the compute dtype (bf16), so
received, computed and sent values are bf16 and the boundary metadata (``received_metas``,
``sent_metas``) says so; with ``master_dtype`` the parameters are stored in that dtype (fp32
master weights) and cast once per step by ``open_step``, their gradients arriving in fp32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from hierarchical_ap.errors import PlanError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.plan import PlanStage
from intra_op.apply import ShardedProgram, apply, propagate_solution
from runtime import boundary
from runtime.stage_graph import StageSlice

_SHARD = re.compile(r"^S\((\d+)\)$")


def plan_placement(text: str) -> Placement:
    """A plan's placement string (``"R"`` or ``"S(d)"``) as a DTensor placement."""
    if text == "R":
        return Replicate()
    match = _SHARD.match(text)
    if match is None:
        raise PlanError(f"placement {text!r} is neither 'R' nor 'S(d)'; re-plan with `hap plan`")
    return Shard(int(match.group(1)))


def batch_placements(
    shape: Sequence[int], microbatch: int, mesh_shape: Sequence[int]
) -> tuple[Placement, ...]:
    """``Shard(0)`` on mesh axis 0 for a value whose dim 0 is the micro-batch and splits evenly
    over that axis (size > 1); replicated on every other axis."""
    rows = mesh_shape[0]
    split = rows > 1 and len(shape) > 0 and shape[0] == microbatch and microbatch % rows == 0
    first: Placement = Shard(0) if split else Replicate()
    return (first, *(Replicate() for _ in mesh_shape[1:]))


@dataclass
class _Saved:
    """What one micro-batch keeps between its forward and its backward."""

    received: list[torch.Tensor]
    sent: list[torch.Tensor]
    loss: torch.Tensor | None


class StageProgram:
    """The program of one stage on one worker (see the module docstring)."""

    def __init__(
        self,
        graph: OpGraph,
        stage_slice: StageSlice,
        stage: PlanStage,
        mesh: DeviceMesh,
        state: Mapping[str, torch.Tensor] | nn.Module | None,
        *,
        num_microbatches: int,
        master_dtype: torch.dtype | None = None,
        local_graph: OpGraph | None = None,
    ) -> None:
        self.slice = stage_slice
        self.mesh = mesh
        self.num_microbatches = num_microbatches
        self.device = torch.device(mesh.device_type)
        microbatch = graph.batch_size or 0
        mesh_shape = tuple(mesh.shape)
        params = {
            fqn: tuple(plan_placement(p) for p in stage.param_placements.get(fqn, ("R", "R")))
            for fqn in stage_slice.params
        }
        outside = [*stage_slice.user_inputs, *stage_slice.received]
        metas = {name: graph.value_meta(name) for name in outside}
        inputs = {
            name: batch_placements(meta.shape, microbatch, mesh_shape)
            for name, meta in metas.items()
        }
        zeros = {
            name: torch.zeros(meta.shape, dtype=meta.dtype, device=self.device)
            for name, meta in metas.items()
        }
        solution = propagate_solution(graph, mesh, params, inputs, zeros, nodes=stage_slice.nodes)
        self.program: ShardedProgram = apply(
            graph,
            solution,
            mesh,
            state,
            nodes=stage_slice.nodes,
            master_dtype=master_dtype,
            local_graph=local_graph,
        )
        self.received_metas = [(metas[n].shape, metas[n].dtype) for n in stage_slice.received]
        self.received_needs_grad = [_needs_grad(graph, n) for n in stage_slice.received]
        sent_metas = [graph.value_meta(n) for n in stage_slice.sent]
        self.sent_metas = [(m.shape, m.dtype) for m in sent_metas]
        self.sent_needs_grad = [_needs_grad(graph, n) for n in stage_slice.sent]
        self._saved: dict[int, _Saved] = {}
        self._backwards_in_step = 0

    @property
    def is_last(self) -> bool:
        return bool(self.slice.outputs)

    def parameters_by_fqn(self) -> dict[str, nn.Parameter]:
        return self.program.parameters_by_fqn()

    def forward(
        self,
        microbatch: int,
        received: Sequence[torch.Tensor],
        user_inputs: Mapping[str, torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The tensors to send to the next stage and, on the last stage, the loss."""
        if microbatch == 0:
            self.program.open_step()
            self._backwards_in_step = 0
        leaves = [
            t.requires_grad_(needs)
            for t, needs in zip(received, self.received_needs_grad, strict=True)
        ]
        sent, loss = self._run(leaves, user_inputs)
        self._saved[microbatch] = _Saved(leaves, sent, loss)
        return [t.detach() for t in sent], (None if loss is None else loss.detach())

    def evaluate(
        self, received: Sequence[torch.Tensor], user_inputs: Mapping[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``forward`` in evaluation form (``ShardedProgram.evaluation``: dropout off, batch
        norms on their running statistics, no autograd), keeping nothing and updating no
        buffer: the tensors to send and, on the last stage, the loss."""
        with self.program.evaluation():
            return self._run(received, user_inputs)

    def _run(
        self, received: Sequence[torch.Tensor], user_inputs: Mapping[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The stage's slice on one micro-batch: the values to send and the loss (if last)."""
        wanted = [*self.slice.sent, *self.slice.outputs]
        values: dict[str, object] = {name: user_inputs[name] for name in self.slice.user_inputs}
        if self.program.runs_plain:
            # one device: the received full tensors are the values, the results are full
            values.update(zip(self.slice.received, received, strict=True))
            out = self.program.run_plain_part(values, wanted)
            sent = [out[name] for name in self.slice.sent]
            loss = out[self.slice.outputs[0]] if self.slice.outputs else None
        else:
            values.update(
                (name, boundary.entering(t, self.mesh))
                for name, t in zip(self.slice.received, received, strict=True)
            )
            out = self.program.run_part(values, wanted)
            sent = [boundary.leaving(out[name]) for name in self.slice.sent]
            loss = boundary.leaving(out[self.slice.outputs[0]]) if self.slice.outputs else None
        return sent, loss

    def backward(self, microbatch: int, grads: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """Gradients of the received values that need one (zeros where autograd gave none)."""
        saved = self._saved[microbatch]
        if saved.loss is not None:
            torch.autograd.backward(saved.loss / self.num_microbatches)
        else:
            assert grads is not None
            pairs = [
                (t, g)
                for t, g, needs in zip(saved.sent, grads, self.sent_needs_grad, strict=True)
                if needs and t.requires_grad
            ]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self._backwards_in_step += 1
        if self._backwards_in_step == self.num_microbatches:
            self.program.close_step()
        return [
            t.grad if t.grad is not None else torch.zeros_like(t)
            for t, needs in zip(saved.received, self.received_needs_grad, strict=True)
            if needs
        ]

    def free(self, microbatch: int) -> None:
        del self._saved[microbatch]


def _needs_grad(graph: OpGraph, value: str) -> bool:
    node = graph.nodes.get(value)
    return bool(node is not None and node.requires_grad and node.outputs[0].dtype.is_floating_point)


def full_parameters(program: StageProgram) -> dict[str, torch.Tensor]:
    """Every parameter of the stage as a full tensor (a collective on the stage's mesh)."""
    return {
        fqn: p.full_tensor().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
        for fqn, p in program.parameters_by_fqn().items()
    }
