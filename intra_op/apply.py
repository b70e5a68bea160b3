"""Applying a sharding solution: the captured graph runs on DTensors placed as the solution says.

``apply(graph, solution, device_mesh, state)`` returns a ``ShardedProgram``, an ``nn.Module``
whose parameters are DTensors stored with ``solution.param_placements`` (same FQNs as the
original ``model.state_dict()``; tied weights share one parameter). Its ``forward`` takes the
user inputs of the captured program (model inputs then loss targets), distributes them with
``solution.input_placements`` and executes the aten graph node by node:

* before a node runs, each of its tensor inputs is redistributed to ``solution.node_inputs``;
* the aten op runs on DTensors (DTensor's dispatcher shards the computation; where its own
  sharding rule wants other input placements it redistributes once more);
* the output(s) are redistributed to ``solution.node_outputs``.

Autograd runs through DTensor, so ``loss.backward()`` leaves DTensor gradients on the
parameters, in their storage placement (a replicated parameter's partial gradient is
all-reduced, a ZeRO-sharded one's is reduce-scattered). Inside a step of several
micro-batches (``open_step`` / ``close_step``, below) the data-parallel all-reduce runs once
per step instead, on the gradients summed over the micro-batches (``intra_op.gradient_sync``).

The graph may have been captured on the meta device: device arguments (``arange(…,
device=meta)``, ``to(meta)``) are rewritten to the mesh's device, ``_assert_tensor_metadata``
checks are skipped, and tensors that ops create from nothing (``arange``, ``full``…) become
replicated DTensors.

Where DTensor (torch 2.13) falls short, the program steps in:

* attention runs the device's own kernel on each device's batch / head shard (DTensor has no
  rule for the fused CPU kernel, and planning its math decomposition is slow);
* DTensor's public ``redistribute`` refuses to make a value ``Partial``; the program keeps
  one summand itself;
* DTensor's private partials (a vocabulary-parallel embedding's masked partial) are reduced
  at once, since a solution cannot name them and DTensor reduces a masked partial only once;
* redistributed values (and their gradients) are made contiguous: DTensor labels collective
  results with their source's strides, and a later ``view`` of the local tensor fails;
* placements DTensor would compute wrongly rather than refuse (a convolution's channel-sharded
  input, a batch norm updating its running statistics in a redistributed copy, any op writing
  into a redistributed copy) raise ``ShardingExecutionError``, as does any node DTensor cannot
  run, naming the node, the op and the placements.

``propagate_solution`` runs the graph once, with only the parameters and inputs placed, and
records the placements DTensor's own sharding rules give every node: a complete, runnable
``ShardingSolution`` (DTensor's default plan for those placements), with the number of
collectives that forward ran.

Parts of a graph (pipeline stages). ``apply(..., nodes=names)`` builds a program that holds only
the parameters and buffers those nodes read and runs only them: ``ShardedProgram.run_part(
values, outputs)`` takes the values the part reads from outside (graph user inputs and other
nodes' outputs, by name; full tensors or DTensors) and returns the named values it computes.
Values from outside are placed as ``solution.input_placements`` says (replicated when it names
none). ``propagate_solution(..., nodes=names)`` records DTensor's placements for a part.

On a one-device mesh every DTensor holds its whole value whatever its placements, so
``run_part`` there runs the part as a compiled ``fx.GraphModule`` on the local tensors
(``intra_op.plain_part``): the same aten ops on the same values, without DTensor's dispatch
or the node-by-node interpreter. ``open_step`` / ``close_step`` bracket the micro-batches of
one optimizer step, so the parameters are wrapped once per step rather than per call, and
their gradients accumulate locally over the step: along a mesh axis that replicates a
parameter, the micro-batches' ``Partial`` gradients are summed unreduced and ``close_step``
all-reduces the sum once, in flat buckets (``intra_op.gradient_sync``); along an axis that
shards it (ZeRO) each micro-batch's gradient is reduce-scattered in its backward.

On a larger mesh, a part that is plain data parallelism (a forward DTensor runs without
collectives, replicated parameters, the batch split along some axes: the conditions of
``intra_op.local_execution``) runs the same compiled module on each device's local shards
inside an open step: values from outside are cut to their local pieces, the results are
wrapped back as DTensors in the placements DTensor gives them (the gradient of a ``Partial``
average scaled by ``1/k``), and each parameter's gradient is the local ``Partial`` sum over
the batch axes that ``close_step`` all-reduces in buckets, as DDP does. Without an open step
such a part runs on DTensors.

Master weights (mixed precision). ``apply(..., master_dtype=torch.float32)`` on a graph captured
in a lower precision (bfloat16) stores the floating parameters in ``master_dtype``: they are
what ``parameters_by_fqn``, ``load_full_state_dict`` and an optimizer see. The graph reads each
one cast to its captured dtype, by a differentiable cast made once per step (``open_step``; per
call without an open step); the cast's backward turns every gradient back into
``master_dtype`` before it is accumulated and reduced to the parameter's placement, so
accumulation and the data-parallel reduction run in ``master_dtype``.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import empty as dtensor_empty
from torch.distributed.tensor.debug import CommDebugMode
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from hierarchical_ap.errors import HapError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.profile import METADATA_CHECKS, TensorMeta
from intra_op.evaluation import ATTENTION, Call, evaluation_calls, is_training_batch_norm
from intra_op.gradient_sync import (
    AccumulatedGradient,
    StepGradients,
    StepParameter,
    reduce_to_stored,
)
from intra_op.local_execution import LocalExecution, ScaledGradient, local_execution
from intra_op.placement import (
    Partial,
    Placement,
    Placements,
    Replicate,
    Shard,
    format_placements,
    normalize,
    replicated,
)
from intra_op.plain_part import plain_part_module
from intra_op.solution import ShardingSolution

__all__ = [
    "InvalidSolutionError",
    "ShardedProgram",
    "ShardingExecutionError",
    "ShardingSolution",
    "apply",
    "full_value",
    "propagate_solution",
    "validate_solution",
]

_ATTENTION_ARGS = [argument.name for argument in ATTENTION._schema.arguments]

_MODEL_PREFIX = "model."
_USER_OUTPUTS = (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)


class InvalidSolutionError(HapError, ValueError):
    """A solution that does not cover the graph or does not fit its tensors or mesh."""


class ShardingExecutionError(HapError, RuntimeError):
    """DTensor cannot run a node (or redistribute a value) with the placements requested."""


def apply(
    graph: OpGraph,
    solution: ShardingSolution,
    device_mesh: DeviceMesh,
    state: Mapping[str, torch.Tensor] | nn.Module | None = None,
    *,
    nodes: Collection[str] | None = None,
    plain: bool | None = None,
    master_dtype: torch.dtype | None = None,
    local_graph: OpGraph | None = None,
) -> ShardedProgram:
    """The program that runs ``graph`` sharded as ``solution`` says on ``device_mesh``.

    ``state`` holds the full (unsharded) parameters and buffers, keyed like the original
    model's ``state_dict()`` plus its non-persistent buffers, or is the original module itself;
    every rank passes the same values (rank 0's are used). Without it, parameters and buffers
    are allocated uninitialised for ``ShardedProgram.load_full_state_dict`` or a shard-by-shard
    initialisation. ``nodes`` restricts the program to those nodes (a pipeline stage; see the
    module docstring). ``plain`` chooses how ``run_part`` executes: ``None`` (the default)
    runs plain tensors when the mesh has one device, and plain local shards inside a step on a
    larger mesh where the part qualifies (``intra_op.local_execution``; ``local_graph`` is the
    program captured at the local batch it then runs), ``False`` runs DTensors on any mesh (to
    compare the paths), ``True`` raises ``ValueError`` where a larger mesh's part does not
    qualify, naming why. ``master_dtype`` stores the floating parameters in that
    dtype (master weights; see the module docstring). Raises ``InvalidSolutionError`` when the
    solution misses or misfits a value.
    """
    validate_solution(graph, solution, tuple(device_mesh.shape), nodes=nodes)
    return ShardedProgram(
        graph,
        solution,
        device_mesh,
        state,
        nodes=nodes,
        plain=plain,
        master_dtype=master_dtype,
        local_graph=local_graph,
    )


def full_value(value: Any) -> Any:
    """``value`` with every DTensor (at any depth) replaced by its full tensor."""
    return pytree.tree_map_only(DTensor, lambda t: t.full_tensor(), value)


def propagate_solution(
    graph: OpGraph,
    device_mesh: DeviceMesh,
    param_placements: Mapping[str, Placements],
    input_placements: Mapping[str, Placements],
    inputs: Sequence[Any] | Mapping[str, Any],
    state: Mapping[str, torch.Tensor] | nn.Module | None = None,
    *,
    nodes: Collection[str] | None = None,
) -> ShardingSolution:
    """The solution DTensor's own sharding rules pick, given parameter and input placements.

    Runs the graph once, without autograd, on real ``inputs`` (as ``ShardedProgram.forward``
    takes them) and records the placements of every node's tensor inputs and outputs. Nothing
    is redistributed on purpose, except where DTensor cannot run a node as its inputs are
    placed (that node then runs on replicated inputs) or computes it wrongly (see
    ``_supported_input``). With ``nodes`` only those nodes run, and ``inputs`` maps the values
    they read from outside to tensors, as ``ShardedProgram.run_part`` takes them.
    """
    solution = ShardingSolution(
        mesh_shape=tuple(device_mesh.shape),  # type: ignore[arg-type]
        param_placements=dict(param_placements),
        input_placements=dict(input_placements),
        node_inputs={},
        node_outputs={},
    )
    _check_leaf_placements(graph, solution, device_mesh.ndim, nodes)
    program = ShardedProgram(graph, solution, device_mesh, state, nodes=nodes, plain=False)
    recorder = _Recorder(solution, device_mesh.ndim)
    with torch.no_grad(), CommDebugMode() as comms:
        if nodes is None:
            program._run(inputs, recorder)  # type: ignore[arg-type]
        else:
            program._run_part(inputs, (), recorder)  # type: ignore[arg-type]
    solution.forward_collectives = comms.get_total_counts()
    return solution


def validate_solution(
    graph: OpGraph,
    solution: ShardingSolution,
    mesh_shape: Sequence[int],
    *,
    nodes: Collection[str] | None = None,
) -> None:
    """Raise ``InvalidSolutionError`` unless ``solution`` places every parameter, input and
    executed node of ``graph`` (of ``nodes`` and what they read, when given) on a mesh of
    ``mesh_shape``, with shard dims the tensors have."""
    if tuple(solution.mesh_shape) != tuple(mesh_shape):
        raise InvalidSolutionError(
            f"the solution is for a {tuple(solution.mesh_shape)} mesh but the device mesh is "
            f"{tuple(mesh_shape)}; solve for the mesh the program runs on"
        )
    _check_leaf_placements(graph, solution, len(mesh_shape), nodes)
    for fx_node in graph.graph_module.graph.nodes:
        if fx_node.op != "call_function" or fx_node.target in METADATA_CHECKS:
            continue
        if nodes is not None and fx_node.name not in nodes:
            continue
        name = fx_node.name
        node = graph.nodes[name]
        if name not in solution.node_inputs or name not in solution.node_outputs:
            raise InvalidSolutionError(
                f"the solution has no placements for node '{name}' ({node.target}); every "
                "executed node needs node_inputs and node_outputs entries"
            )
        chosen = solution.node_inputs[name]
        if len(chosen) != len(node.inputs):
            raise InvalidSolutionError(
                f"node '{name}' ({node.target}) has {len(node.inputs)} tensor inputs "
                f"{list(node.inputs)} but the solution gives {len(chosen)} input placements"
            )
        if fx_node.target is not operator.getitem:
            for index, (value, placements) in enumerate(zip(node.inputs, chosen, strict=True)):
                _check_fits(
                    f"input {index} ('{value}') of node '{name}'",
                    graph.value_meta(value),
                    placements,
                    len(mesh_shape),
                )
        for meta in node.outputs:
            _check_fits(
                f"the output of node '{name}'",
                meta,
                solution.node_outputs[name],
                len(mesh_shape),
            )


def _read_placeholders(graph: OpGraph, nodes: Collection[str] | None) -> set[str] | None:
    """Names of the graph inputs (placeholders) that ``nodes`` read; ``None``: all nodes."""
    if nodes is None:
        return None
    return {
        value.name
        for node in graph.graph_module.graph.nodes
        if node.name in nodes
        for value in node.all_input_nodes
        if value.op == "placeholder"
    }


def _check_leaf_placements(
    graph: OpGraph,
    solution: ShardingSolution,
    mesh_ndim: int,
    nodes: Collection[str] | None = None,
) -> None:
    read = _read_placeholders(graph, nodes)
    params = (
        graph.param_shapes
        if read is None
        else {graph.value_to_param[v]: None for v in read if v in graph.value_to_param}
    )
    for fqn in params:
        meta = graph.param_shapes[fqn]
        if fqn not in solution.param_placements:
            raise InvalidSolutionError(
                f"the solution has no placement for parameter '{fqn}'; add it to "
                "param_placements (e.g. Replicate on every mesh axis)"
            )
        _check_fits(f"parameter '{fqn}'", meta, solution.param_placements[fqn], mesh_ndim)
    for value, placements in solution.input_placements.items():
        if value in graph.input_values:  # buffers may be placed too (replicated if not)
            _check_fits(f"graph input '{value}'", graph.input_values[value], placements, mesh_ndim)
    for value in [*graph.model_inputs, *graph.target_inputs]:
        if read is not None and value not in read:
            continue
        if value not in solution.input_placements:
            raise InvalidSolutionError(
                f"the solution has no placement for graph input '{value}'; add it to "
                "input_placements"
            )


def _check_fits(what: str, meta: TensorMeta, placements: Placements, mesh_ndim: int) -> None:
    if len(placements) != mesh_ndim:
        raise InvalidSolutionError(
            f"{what} is placed {format_placements(placements)} ({len(placements)} placements) "
            f"on a mesh with {mesh_ndim} axes; give one placement per mesh axis"
        )
    ndim = len(meta.shape)
    for p in normalize(placements, ndim):
        if p.is_shard() and not 0 <= p.dim < ndim:  # type: ignore[attr-defined]
            raise InvalidSolutionError(
                f"{what} is placed {format_placements(placements)} but has only {ndim} dims "
                f"(shape {meta.shape}); shard a dim it has"
            )


class _Placer(Protocol):
    """Decides where a node's tensor inputs and outputs go (``None``: where they are)."""

    replicate_on_failure: bool
    """Whether a node DTensor cannot run as placed is retried on replicated inputs."""

    def node_input(self, node: fx.Node, index: int) -> Placements | None: ...

    def node_output(self, node: fx.Node) -> Placements | None: ...

    def observe(self, node: fx.Node, inputs: tuple[Placements, ...], output: Any) -> None:
        """Called after the node ran with its inputs placed ``inputs``."""


class _FollowSolution:
    """Redistribute to the placements a solution chose."""

    replicate_on_failure = False

    def __init__(self, solution: ShardingSolution) -> None:
        self.solution = solution

    def node_input(self, node: fx.Node, index: int) -> Placements | None:
        return self._entry(self.solution.node_inputs, node)[index]

    def node_output(self, node: fx.Node) -> Placements | None:
        return self._entry(self.solution.node_outputs, node)

    def observe(self, node: fx.Node, inputs: tuple[Placements, ...], output: Any) -> None:
        pass

    @staticmethod
    def _entry(table: Mapping[str, Any], node: fx.Node) -> Any:
        if node.name not in table:
            raise InvalidSolutionError(
                f"the solution has no placements for node '{node.name}' ({node.target}); "
                "check it with validate_solution before running"
            )
        return table[node.name]


class _Recorder:
    """Leave every value where DTensor puts it (replicate where DTensor cannot run a node as
    placed) and write the placements into a solution."""

    replicate_on_failure = True

    def __init__(self, solution: ShardingSolution, mesh_ndim: int) -> None:
        self.solution = solution
        self.mesh_ndim = mesh_ndim

    def node_input(self, node: fx.Node, index: int) -> Placements | None:
        return None

    def node_output(self, node: fx.Node) -> Placements | None:
        return None

    def observe(self, node: fx.Node, inputs: tuple[Placements, ...], output: Any) -> None:
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, DTensor)]
        placements = tuple(tensors[0].placements) if tensors else replicated(self.mesh_ndim)
        self.solution.node_outputs[node.name] = placements
        # ``getitem`` reads one element of a tuple: its input is placed as its output
        self.solution.node_inputs[node.name] = (
            (placements,) if node.target is operator.getitem else inputs
        )


_CONVOLUTIONS = frozenset(
    {
        torch.ops.aten.conv1d.default,
        torch.ops.aten.conv2d.default,
        torch.ops.aten.conv3d.default,
        torch.ops.aten.convolution.default,
    }
)


def _supported_input(node: fx.Node, index: int, placements: Placements) -> Placements:
    """The placements nearest to ``placements`` that DTensor runs the node's input ``index`` in.

    * Convolutions run in a DTensor handler that does not redistribute its inputs: only a
      batch-sharded (``Shard(0)``) or replicated input with a replicated weight and bias is
      computed correctly.
    * A training-mode batch norm updates its running statistics in place; DTensor's channel
      sharding would update a redistributed copy and lose the update, so it runs replicated.

    Other ops take any placement (DTensor redistributes as its sharding rules need).
    """
    if node.target in _CONVOLUTIONS:
        keep = (Replicate(), Shard(0)) if index == 0 else (Replicate(),)
        return tuple(p if p in keep else Replicate() for p in placements)
    if is_training_batch_norm(node):
        return replicated(len(placements))
    return placements


def _tensor_arguments(node: fx.Node) -> tuple[bool, ...]:
    """Per graph-value argument of ``node`` (in ``fx.node.map_arg`` order): whether it is a
    tensor input the node's placements cover (``getitem`` reads a tuple, placed as its
    output)."""
    flags: list[bool] = []

    def visit(arg: fx.Node) -> fx.Node:
        flags.append(
            node.target is not operator.getitem and isinstance(arg.meta.get("val"), torch.Tensor)
        )
        return arg

    fx.node.map_arg((node.args, node.kwargs), visit)
    return tuple(flags)


@dataclass(frozen=True)
class _PlainPart:
    """A part compiled for the plain path, and what it takes: (kind, name) per argument,
    kind ``given`` (from ``run_part``'s values), ``parameter``, ``buffer`` or ``constant``."""

    module: fx.GraphModule
    sources: tuple[tuple[str, str], ...]


def _written_inputs(node: fx.Node) -> set[fx.Node]:
    """The graph values ``node`` writes into: arguments its schema marks as mutated (``add_``)
    and a training batch norm's running statistics."""
    written: set[fx.Node] = set()
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        names = [argument.name for argument in schema.arguments]
        bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        for argument in schema.arguments:
            value = bound.get(argument.name)
            alias = argument.alias_info
            if alias is not None and alias.is_write and isinstance(value, fx.Node):
                written.add(value)
    if is_training_batch_norm(node):
        written.update(a for a in node.args[3:5] if isinstance(a, fx.Node))
    return written


class ShardedProgram(nn.Module):
    """A captured training program whose parameters and values are DTensors on a mesh.

    ``forward(*user_inputs)`` takes the model inputs then the loss targets (flattened in pytree
    order): full tensors, the same on every rank, or DTensors. It returns the program's output
    (the loss) as DTensor(s); ``full_value`` gives full tensors. Prefer ``apply``, which
    validates the solution before anything runs.
    """

    def __init__(
        self,
        graph: OpGraph,
        solution: ShardingSolution,
        device_mesh: DeviceMesh,
        state: Mapping[str, torch.Tensor] | nn.Module | None = None,
        *,
        nodes: Collection[str] | None = None,
        plain: bool | None = None,
        master_dtype: torch.dtype | None = None,
        local_graph: OpGraph | None = None,
    ) -> None:
        super().__init__()
        self._graph = graph
        self._part = None if nodes is None else frozenset(nodes)
        """The nodes this program runs (``None``: the whole graph)."""
        self._read = _read_placeholders(graph, nodes)
        self._params_by_fqn: dict[str, nn.Parameter] = {}
        self._master_dtype = master_dtype
        """The dtype floating parameters are stored in (``None``: their captured dtype)."""
        self._solution = solution
        self._mesh = device_mesh
        self._device = torch.device(device_mesh.device_type)
        self._placeholders: dict[str, tuple[str, str]] = {}
        """Graph input name → (``parameter`` | ``buffer`` | ``constant`` | ``input``, key)."""
        self._constants: dict[str, Any] = {}
        self._build_state(graph)
        self._call_args = self._device_call_args(graph)
        self._written = {node: _written_inputs(node) for node in self._call_args}
        self._eval_calls: dict[fx.Node, Call] = evaluation_calls(
            self._call_args, self._buffer_writers()
        )
        """Node → its call in evaluation form (``intra_op.evaluation``), where it differs."""
        self._evaluating = False
        self._tensor_args = {node: _tensor_arguments(node) for node in self._call_args}
        self._last_uses = _last_uses(graph.graph_module.graph)
        self._follow = _FollowSolution(solution)
        self._checked_inputs: dict[tuple[fx.Node, int], Placements] = {}
        """(node, input index) → the solution's placements for it, checked against DTensor."""
        self._plain = device_mesh.size() == 1 and plain is not False
        """Whether parts run as plain-tensor graph modules on whole values (a one-device mesh;
        see ``intra_op.plain_part``)."""
        self._local: LocalExecution | None = None
        """How parts run as plain-tensor graph modules on local shards (a larger mesh; see
        ``intra_op.local_execution``), or ``None``."""
        if device_mesh.size() > 1 and plain is not False:
            reads = {
                name: entry
                for name, entry in self._placeholders.items()
                if self._read is None or name in self._read
            }
            local = local_execution(
                graph, solution, tuple(device_mesh.shape), self._part, reads, local_graph
            )
            if isinstance(local, LocalExecution):
                self._local = local
            elif plain:
                raise ValueError(
                    f"this part cannot run on plain local shards of a {tuple(device_mesh.shape)} "
                    f"mesh: {local}; leave plain=None to choose by the solution"
                )
        self._local_graph = local_graph if self._local is not None else None
        """The program at the local batch whose nodes the local path runs."""
        self._local_call_args = (
            None if self._local_graph is None else self._device_call_args(self._local_graph)
        )
        """The arguments of the local graph's nodes (as ``_call_args`` for the global one)."""
        self._value_names = frozenset(node.name for node in graph.graph_module.graph.nodes)
        self._plain_parts: dict[tuple[tuple[str, ...], tuple[str, ...], bool], _PlainPart] = {}
        self._step_params: dict[str, torch.Tensor] | None = None
        """FQN → the parameter as the open step's micro-batches read it (see ``open_step``)."""
        self._step_leaves: dict[str, torch.Tensor] = {}
        """FQN → the leaf (the parameter's local tensor) the open step's gradients accumulate
        in."""
        self._step_gradients = StepGradients()
        """DTensor path: the open step's gradients, summed per parameter in its accumulation
        placement by the backward of ``StepParameter``."""
        if state is not None:
            self.load_full_state_dict(state)

    @property
    def graph(self) -> OpGraph:
        return self._graph

    @property
    def solution(self) -> ShardingSolution:
        return self._solution

    @property
    def device_mesh(self) -> DeviceMesh:
        return self._mesh

    def parameters_by_fqn(self) -> dict[str, nn.Parameter]:
        """The program's parameters keyed like the original model's (one entry per tied
        group, at its first name in the graph)."""
        return dict(self._params_by_fqn)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Inside, ``run_part`` runs the program in evaluation form (``intra_op.evaluation``:
        dropout off, batch norms on their running statistics, no buffer updated) without
        autograd, on DTensors or, on a one-device mesh, plain tensors. Raises
        ``RuntimeError`` inside an open step."""
        if self._step_params is not None:
            raise RuntimeError("a training step is open; evaluate between steps")
        self._evaluating = True
        try:
            with torch.no_grad():
                yield
        finally:
            self._evaluating = False

    def _buffer_writers(self) -> set[fx.Node]:
        """The nodes that write into a buffer through their first argument."""
        writers = set()
        for node, written in self._written.items():
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and first in written:
                if self._placeholders.get(first.name, ("", ""))[0] == "buffer":
                    writers.add(node)
        return writers

    def _current_call(self, node: fx.Node) -> tuple[Any, tuple[Any, Any]]:
        """The op and (args, kwargs) ``node`` runs now: its evaluation call while evaluating,
        else the captured one."""
        if self._evaluating and node in self._eval_calls:
            target, args, kwargs = self._eval_calls[node]
            return target, (args, kwargs)
        return node.target, self._call_args[node]

    def forward(self, *inputs: Any) -> Any:
        if self._part is not None:
            raise RuntimeError("a program of part of a graph runs with run_part, not forward")
        return self._run(inputs, _FollowSolution(self._solution))

    def run_part(self, values: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
        """Run this program's nodes on ``values`` (graph user inputs and outside nodes'
        outputs the part reads, by name) and return the named values ``outputs`` (computed
        here or given), as DTensors. On a one-device mesh the part runs as a compiled graph
        module on plain tensors (same values: every DTensor there holds its whole value)."""
        if self._local is not None and self._step_params is not None:
            return {
                name: self._local_result(name, value)
                for name, value in self._run_compiled(values, outputs).items()
            }
        if not self._plain:
            return self._run_part(values, outputs, self._follow)
        everywhere = replicated(self._mesh.ndim)
        return {
            name: DTensor.from_local(value, self._mesh, everywhere, run_check=False)
            if isinstance(value, torch.Tensor)
            else value
            for name, value in self.run_plain_part(values, outputs).items()
        }

    @property
    def runs_plain(self) -> bool:
        """Whether ``run_part`` runs on plain tensors holding whole values (the mesh has one
        device)."""
        return self._plain

    @property
    def runs_local(self) -> bool:
        """Whether ``run_part`` runs on plain local shards inside an open step (a larger mesh
        and a part that qualifies: ``intra_op.local_execution``)."""
        return self._local is not None

    def _local_result(self, name: str, value: Any) -> Any:
        """A value the local module computed (or was given) as the DTensor of its placement;
        the gradient of a ``Partial`` average is scaled by ``1/k`` on the way back."""
        if not isinstance(value, torch.Tensor):
            return value
        assert self._local is not None
        placements = self._solution.node_outputs.get(name) or self._solution.input_placements.get(
            name, replicated(self._mesh.ndim)
        )
        scale = self._local.gradient_scale(placements)
        if scale != 1.0:
            value = ScaledGradient.apply(value, scale)
        meta = self._graph.value_meta(name)
        return DTensor.from_local(
            value,
            self._mesh,
            placements,
            run_check=False,
            shape=torch.Size(meta.shape),
            stride=meta.stride,
        )

    def open_step(self) -> None:
        """Wrap the parameters once for the micro-batches of one optimizer step, until
        ``close_step``; without an open step every ``run_part`` wraps them afresh.

        Each parameter's local tensor becomes a leaf of the step (same storage). On the plain
        path the graph reads the leaf itself, which accumulates the micro-batches' gradients.
        On the DTensor path it reads the leaf as a DTensor in the parameter's placement
        (``intra_op.gradient_sync.StepParameter``) whose backward sums each gradient locally
        (``StepGradients``), unreduced along the mesh axes that replicate the parameter (a
        data-parallel ``Partial`` stays a local summand) and reduce-scattered along the axes
        that shard it (ZeRO), as the cost model charges. ``close_step`` reduces the sums once
        and hands them to the parameters, so each parameter gets ``sum_i grad_i`` in its
        placement, as autograd through DTensor would give it. Master weights are cast to the
        captured dtype here, once for the step's micro-batches; the cast's backward returns
        each gradient to the master dtype before it is accumulated and reduced."""
        self._step_leaves = {
            fqn: param.to_local().detach().requires_grad_(param.requires_grad)
            for fqn, param in self._params_by_fqn.items()
        }
        self._step_gradients = StepGradients()
        if self._plain or self._local is not None:
            self._step_params = {
                fqn: self._as_captured(fqn, leaf) for fqn, leaf in self._step_leaves.items()
            }
        else:
            self._step_params = {
                fqn: self._as_captured(fqn, self._step_parameter(fqn, leaf))
                for fqn, leaf in self._step_leaves.items()
            }

    def _step_parameter(self, fqn: str, leaf: torch.Tensor) -> DTensor:
        param = self._params_by_fqn[fqn]
        return StepParameter.apply(
            leaf,
            self._mesh,
            tuple(param.placements),
            param.shape,
            param.stride(),
            fqn,
            self._step_gradients,
        )

    def close_step(self) -> None:
        """End the step ``open_step`` opened: bring each parameter's accumulated gradient to
        its placement (on a mesh of several devices, one bucketed all-reduce per replicating
        axis for all the data-parallel gradients: ``intra_op.gradient_sync.reduce_to_stored``,
        a collective over the mesh) and add it to the parameter's ``grad`` (a DTensor in the
        parameter's placement)."""
        step, self._step_params = self._step_params, None
        leaves, self._step_leaves = self._step_leaves, {}
        if step is None:
            return
        del step
        summed = self._step_gradients.take()
        accumulated: dict[str, AccumulatedGradient] = {}
        with torch.no_grad():
            for fqn, param in self._params_by_fqn.items():
                stored = tuple(param.placements)
                leaf = leaves[fqn]
                if fqn in summed:  # the DTensor path
                    accumulated[fqn] = summed.pop(fqn)
                elif leaf.grad is not None:  # the plain paths: the leaf holds the local sum
                    staged = stored if self._local is None else self._local.gradient_placements
                    accumulated[fqn] = AccumulatedGradient(
                        leaf.grad, staged, stored, param.shape, param.stride()
                    )
                    leaf.grad = None
            del leaves
            for fqn, local in reduce_to_stored(self._mesh, accumulated).items():
                param = self._params_by_fqn[fqn]
                grad = shard_as_dtensor(local, param)
                param.grad = grad if param.grad is None else param.grad + grad

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor] | nn.Module) -> None:
        """Copy full tensors into the sharded parameters and buffers (each rank keeps its
        shard of rank 0's values). ``state`` is keyed like ``model.state_dict()`` and must also
        hold non-persistent buffers; passing the module itself covers both."""
        if isinstance(state, nn.Module):
            state = dict(state.named_parameters(remove_duplicate=False)) | dict(
                state.named_buffers(remove_duplicate=False)
            )
        targets = dict(self.named_parameters()) | dict(self.named_buffers())
        missing = sorted(set(targets) - set(state))
        if missing:
            raise ValueError(
                f"the state lacks {missing}; pass the model itself to include non-persistent "
                "buffers, or a state dict with every parameter and buffer"
            )
        with torch.no_grad():
            for name, target in targets.items():
                full = state[name].detach().to(self._device, target.dtype)
                if full.shape != target.shape:
                    raise ValueError(
                        f"'{name}' has shape {tuple(full.shape)} in the state but "
                        f"{tuple(target.shape)} in the captured graph"
                    )
                shard = distribute_tensor(full, self._mesh, target.placements).to_local()
                target.to_local().copy_(shard)

    def _run(self, inputs: Sequence[Any], placer: _Placer) -> Any:
        """Execute the graph on ``inputs`` with ``placer`` choosing node placements."""
        user_values = iter(pytree.tree_leaves(list(inputs)))
        num_user = sum(kind == "input" for kind, _ in self._placeholders.values())
        env: dict[fx.Node, Any] = {}
        result: Any = None
        for node in self._graph.graph_module.graph.nodes:
            if node.op == "placeholder":
                env[node] = self._placeholder_value(node, user_values, num_user)
            elif node.op == "call_function" and node.target not in METADATA_CHECKS:
                env[node] = self._call(node, env, placer)
            elif node.op == "output":
                result = self._outputs(node, env)
            for value in self._last_uses.get(node, ()):
                env.pop(value, None)
        if next(user_values, None) is not None:
            raise ValueError(f"the program takes {num_user} tensor inputs; more were given")
        return result

    def _run_part(self, values: Mapping[str, Any], outputs: Sequence[str], placer: _Placer) -> Any:
        """Execute the part's nodes, values from outside taken from ``values``."""
        env: dict[fx.Node, Any] = {}
        keep = set(outputs)
        by_name: dict[str, Any] = {}
        for node in self._graph.graph_module.graph.nodes:
            if node.name in values:
                env[node] = self._outside_value(node.name, values[node.name])
            elif node.op == "placeholder" and (self._read is None or node.name in self._read):
                kind, _ = self._placeholders[node.name]
                if kind == "input":
                    raise ValueError(f"the part reads graph input '{node.name}'; pass it in values")
                env[node] = self._placeholder_value(node, iter(()), 0)
            elif node in self._call_args and node.target not in METADATA_CHECKS:
                env[node] = self._call(node, env, placer)
            else:
                continue
            if node.name in keep:
                by_name[node.name] = env[node]
            for value in self._last_uses.get(node, ()):
                if value.name not in keep:
                    env.pop(value, None)
        missing = sorted(keep - set(by_name))
        if missing:
            raise ValueError(f"the part neither computes nor receives {missing}")
        return by_name

    def run_plain_part(
        self, values: Mapping[str, Any], outputs: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """``run_part`` on a one-device mesh, on plain tensors: ``values`` are full tensors
        (DTensors are read as their local tensors) and the named results are the plain tensors
        the part's compiled graph module returns (autograd flows through both)."""
        if not self._plain:
            raise RuntimeError(
                "this program runs DTensors (its mesh has more than one device, or it was built "
                "with plain=False); call run_part"
            )
        return self._run_compiled(values, outputs)

    def _run_compiled(
        self, values: Mapping[str, Any], outputs: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The part's compiled graph module on the plain (whole or local) tensors of
        ``values`` and the program's state; the named results."""
        given = tuple(name for name in values if name in self._value_names)
        key = (given, tuple(outputs), self._evaluating)
        part = self._plain_parts.get(key)
        if part is None:
            part = self._plain_parts[key] = self._build_plain_part(given, tuple(outputs))
        args = [self._plain_source(kind, name, values) for kind, name in part.sources]
        return dict(zip(outputs, part.module(*args), strict=True))

    def _build_plain_part(self, given: tuple[str, ...], outputs: tuple[str, ...]) -> _PlainPart:
        sources: list[tuple[str, str]] = [("given", name) for name in given]
        constants: dict[str, Any] = {}
        for node in self._graph.graph_module.graph.nodes:
            if node.op != "placeholder" or node.name in given:
                continue
            if self._read is not None and node.name not in self._read:
                continue
            kind, key = self._placeholders[node.name]
            if kind == "input":
                raise ValueError(f"the part reads graph input '{node.name}'; pass it in values")
            if kind == "constant" and not isinstance(self._constants[key], torch.Tensor):
                constants[node.name] = self._constants[key]
            else:
                sources.append((kind, node.name))
        local = None if self._evaluating else self._local_graph
        call_args = self._call_args if local is None else self._local_call_args
        targets = {}
        if self._evaluating:
            call_args = dict(call_args)
            for node, (target, args, kwargs) in self._eval_calls.items():
                call_args[node], targets[node] = (args, kwargs), target
        module = plain_part_module(
            (local or self._graph).graph_module.graph,
            self._part,
            [name for _, name in sources],
            constants,
            call_args,
            METADATA_CHECKS,
            outputs,
            targets,
        )
        return _PlainPart(module, tuple(sources))

    def _device_call_args(self, graph: OpGraph) -> dict[fx.Node, tuple[Any, Any]]:
        """The arguments of the part's call nodes of ``graph``, device arguments rewritten to
        the mesh's device."""
        return {
            node: pytree.tree_map_only(
                torch.device, lambda _: self._device, (node.args, node.kwargs)
            )
            for node in graph.graph_module.graph.nodes
            if node.op == "call_function" and (self._part is None or node.name in self._part)
        }

    def _plain_source(self, kind: str, name: str, values: Mapping[str, Any]) -> Any:
        """The plain tensor (or value) the plain graph module takes for source ``name``."""
        if kind == "given":
            value = values[name]
            if self._local is not None and isinstance(value, torch.Tensor):
                return self._outside_value(name, value).to_local()
            if isinstance(value, DTensor):
                return value.to_local()
            return value.to(self._device) if isinstance(value, torch.Tensor) else value
        _, key = self._placeholders[name]
        if kind == "parameter":
            if self._step_params is not None:
                return self._step_params[key]
            return self._as_captured(key, self._params_by_fqn[key].to_local())
        if kind == "buffer":
            return self.get_buffer(key).to_local()
        return self._constants[key].to_local()

    def _outside_value(self, name: str, value: Any) -> Any:
        """A value from outside the part, placed as the solution's ``input_placements``."""
        if not isinstance(value, torch.Tensor):
            return value
        placements = self._solution.input_placements.get(name, replicated(self._mesh.ndim))
        if isinstance(value, DTensor):
            return self._redistribute(value, placements, f"value '{name}' from outside the part")
        return distribute_tensor(value.to(self._device), self._mesh, placements, src_data_rank=None)

    def _build_state(self, graph: OpGraph) -> None:
        """Allocate every parameter and buffer the program reads as an uninitialised DTensor,
        at its FQN."""
        params = self._params_by_fqn
        for spec in graph.exported.graph_signature.input_specs:
            name = spec.arg.name
            if (
                self._read is not None
                and name not in self._read
                and spec.kind
                in (
                    InputKind.PARAMETER,
                    InputKind.BUFFER,
                    InputKind.CONSTANT_TENSOR,
                )
            ):
                continue
            if spec.kind is InputKind.PARAMETER:
                fqn = graph.value_to_param[name]
                if fqn not in params:
                    params[fqn] = nn.Parameter(
                        self._allocate(
                            graph.param_shapes[fqn],
                            self._solution.param_placements[fqn],
                            self._master_dtype,
                        ),
                        requires_grad=fqn not in graph.frozen_params,
                    )
                alias = spec.target.removeprefix(_MODEL_PREFIX)
                _owner(self, alias).register_parameter(alias.rsplit(".", 1)[-1], params[fqn])
                self._placeholders[name] = ("parameter", fqn)
            elif spec.kind is InputKind.BUFFER:
                fqn = spec.target.removeprefix(_MODEL_PREFIX)
                meta = graph.input_values[name]
                _owner(self, fqn).register_buffer(
                    fqn.rsplit(".", 1)[-1],
                    self._allocate(
                        meta,
                        self._solution.input_placements.get(name, replicated(self._mesh.ndim)),
                    ),
                    persistent=spec.persistent is not False,
                )
                self._placeholders[name] = ("buffer", fqn)
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                self._constants[name] = self._replicate(self._constant(graph, spec.target))
                self._placeholders[name] = ("constant", name)
            elif spec.kind is InputKind.USER_INPUT and isinstance(spec.arg, ConstantArgument):
                self._constants[name] = spec.arg.value  # e.g. targets=None, fixed at capture
                self._placeholders[name] = ("constant", name)
            elif spec.kind is InputKind.USER_INPUT:
                self._placeholders[name] = ("input", name)
            else:
                raise NotImplementedError(
                    f"graph input '{name}' is a {spec.kind.name}, which sharded programs do not "
                    "support; capture a model without custom objects or effect tokens"
                )

    def _allocate(
        self, meta: TensorMeta, placements: Placements, master_dtype: torch.dtype | None = None
    ) -> DTensor:
        """An uninitialised DTensor of ``meta``'s shape, in ``master_dtype`` if given and the
        value is floating, else in ``meta``'s dtype."""
        floating = master_dtype is not None and meta.dtype.is_floating_point
        dtype = master_dtype if floating else meta.dtype
        return dtensor_empty(meta.shape, dtype=dtype, device_mesh=self._mesh, placements=placements)

    def _as_captured(self, fqn: str, value: torch.Tensor) -> torch.Tensor:
        """Parameter ``fqn`` (a DTensor or its local tensor) in the dtype the graph was captured
        with: a differentiable cast where it is stored in another (master weights)."""
        dtype = self._graph.param_shapes[fqn].dtype
        return value if value.dtype == dtype else value.to(dtype)

    def _constant(self, graph: OpGraph, target: str) -> torch.Tensor:
        """The tensor constant ``target`` of the graph; an empty one captured on the meta
        device (transformers' key/value cache starts from ``torch.tensor([])``) is made again,
        as it holds no data to lose."""
        value = graph.exported.constants[target]
        if isinstance(value, torch.Tensor) and value.is_meta and value.numel() == 0:
            return torch.empty(value.shape, dtype=value.dtype)
        if not isinstance(value, torch.Tensor) or value.is_meta:
            raise ValueError(
                f"tensor constant '{target}' of the captured graph has no data (captured on the "
                "meta device); capture the model on cpu, or register the constant as a buffer"
            )
        return value

    def _replicate(self, tensor: torch.Tensor) -> DTensor:
        return DTensor.from_local(
            tensor.to(self._device), self._mesh, replicated(self._mesh.ndim), run_check=False
        )

    def _placeholder_value(self, node: fx.Node, user_values: Any, num_user: int) -> Any:
        kind, key = self._placeholders[node.name]
        if kind == "parameter":
            if self._step_params is not None:
                return self._step_params[key]
            return self._as_captured(key, self._pin_gradient(self._params_by_fqn[key]))
        if kind == "buffer":
            return self.get_buffer(key)
        if kind == "constant":
            return self._constants[key]
        value = next(user_values, None)
        if value is None:
            raise ValueError(f"the program takes {num_user} tensor inputs; fewer were given")
        placements = self._solution.input_placements[key]
        if isinstance(value, DTensor):
            return self._redistribute(value, placements, f"graph input '{key}'")
        return distribute_tensor(value.to(self._device), self._mesh, placements, src_data_rank=None)

    def _pin_gradient(self, value: DTensor) -> DTensor:
        """``value`` as a new graph value whose gradient is redistributed to ``value``'s own
        placement (DTensor would otherwise hand back e.g. a ``Partial`` gradient to a
        replicated parameter)."""
        return DTensor.from_local(
            value.to_local(),
            self._mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )

    def _call(self, node: fx.Node, env: dict[fx.Node, Any], placer: _Placer) -> Any:
        used: list[Placements] = []
        is_tensor = iter(self._tensor_args[node])
        written = self._written[node]

        def load(arg: fx.Node) -> Any:
            value = env[arg]
            if next(is_tensor):
                index = len(used)
                wanted = placer.node_input(node, index)
                value = self._place_input(node, index, value, wanted, arg in written)
                used.append(tuple(value.placements))
            return value

        target, call_args = self._current_call(node)
        args, kwargs = fx.node.map_arg(call_args, load)
        try:
            output = self._execute(target, args, kwargs)
        except Exception as exc:  # DTensor raises many types for unsupported shardings
            if not placer.replicate_on_failure:
                raise _execution_error(node, used, exc) from exc
            everywhere = replicated(self._mesh.ndim)
            where = f"an input of node '{node.name}'"
            args, kwargs = pytree.tree_map_only(
                DTensor, lambda t: self._redistribute(t, everywhere, where), (args, kwargs)
            )
            used = [everywhere] * len(used)
            try:
                output = self._execute(target, args, kwargs)
            except Exception as retry_exc:  # as above
                raise _execution_error(node, used, retry_exc) from retry_exc
        placer.observe(node, tuple(used), output)
        target = placer.node_output(node)
        if target is None:
            return output
        where = f"the output of node '{node.name}'"
        if isinstance(output, DTensor):
            return self._redistribute(output, target, where)
        return pytree.tree_map_only(DTensor, lambda t: self._redistribute(t, target, where), output)

    def _execute(self, target: Any, args: Any, kwargs: Any) -> Any:
        """Run the op; outputs are DTensors in placements a solution can name."""
        if target is ATTENTION:
            output = self._local_attention(args, kwargs)
        else:
            output = target(*args, **kwargs)
        if isinstance(output, DTensor):
            return self._settle(output)
        output = pytree.tree_map_only(torch.Tensor, self._as_dtensor, output)
        return pytree.tree_map_only(DTensor, self._settle, output)

    def _local_attention(self, args: Any, kwargs: Any) -> DTensor:
        """Attention computed by the device's own kernel on each device's batch / head shard.

        Batches and heads are independent, so on every mesh axis where the query is split by
        batch (``Shard(0)``) or by heads (``Shard(1)``, evenly for the query and the key/value
        heads, so grouped-query attention keeps its groups) the local tensors are attended
        alone; other axes are replicated first. This needs no DTensor sharding rule: DTensor
        has none for the fused CPU kernel, and the math decomposition it could shard is slow to
        plan and builds the full score matrix.
        """
        bound = dict(zip(_ATTENTION_ARGS, args, strict=False)) | dict(kwargs)
        query, key, value = bound["query"], bound["key"], bound["value"]
        split = {0: 1, 1: 1}  # how many pieces batch and heads are cut into so far
        chosen: list[Placement] = []
        for axis, p in enumerate(query.placements):
            if p in (Shard(0), Shard(1)):
                dim = p.dim  # type: ignore[attr-defined]
                pieces = split[dim] * self._mesh.size(axis)
                if all(t.shape[dim] % pieces == 0 for t in (query, key, value)):
                    split[dim] = pieces
                    chosen.append(p)
                    continue
            chosen.append(Replicate())
        placements = tuple(chosen)
        where = "an input of attention"
        for name in ("query", "key", "value"):
            bound[name] = self._redistribute(bound[name], placements, where).to_local()
        mask = bound.get("attn_mask")
        if isinstance(mask, DTensor):
            # a mask broadcast along batch or heads (size 1 there) is replicated on that axis
            mask_placements = tuple(
                p if p.is_shard() and mask.ndim == 4 and mask.shape[p.dim] > 1 else Replicate()
                for p in placements
            )
            bound["attn_mask"] = self._redistribute(mask, mask_placements, where).to_local()
        return DTensor.from_local(ATTENTION(**bound), self._mesh, placements, run_check=False)

    def _settle(self, value: DTensor) -> DTensor:
        """Reduce DTensor's private kinds of ``Partial`` (a vocabulary-parallel embedding's
        masked partial, a vector norm's partial) to ``Replicate`` at once: a solution cannot
        name them, DTensor reduces a masked partial only once (a second reader fails) and
        cannot send a ``Partial`` gradient back through that reduction."""
        if not any(p.is_partial() and type(p) is not Partial for p in value.placements):
            return value
        placements = tuple(
            Replicate() if p.is_partial() and type(p) is not Partial else p
            for p in value.placements
        )
        return self._pin_gradient(self._redistribute(value, placements, "a private partial"))

    def _place_input(
        self,
        node: fx.Node,
        index: int,
        value: DTensor,
        wanted: Placements | None,
        written: bool,
    ) -> DTensor:
        """``value`` redistributed to ``wanted`` (``None``: where it is), checked against what
        DTensor runs the node with; a value the node writes into must stay where it is."""
        current = tuple(value.placements)
        if wanted is None:
            placements = _supported_input(node, index, current)
        else:
            placements = self._checked_inputs.get((node, index))
            if placements is None:
                placements = normalize(wanted, value.ndim)
                supported = _supported_input(node, index, placements)
                if supported != placements:
                    raise ShardingExecutionError(
                        f"node '{node.name}' ({node.target}) cannot take input {index} placed "
                        f"{format_placements(placements)}: DTensor computes it correctly only "
                        f"with {format_placements(supported)}; place the input so in the "
                        "solution"
                    )
                self._checked_inputs[node, index] = placements
        if written and placements != current:
            raise ShardingExecutionError(
                f"node '{node.name}' ({node.target}) writes into input {index} in place, so it "
                f"must run on the input where it is stored ({format_placements(current)}), not "
                f"on a copy redistributed to {format_placements(placements)}; store the value "
                f"{format_placements(placements)} (a buffer: in input_placements) or ask for "
                f"{format_placements(current)} at this node"
            )
        return self._redistribute(value, placements, f"input {index} of node '{node.name}'")

    def _as_dtensor(self, value: torch.Tensor) -> DTensor:
        """DTensors pass; a plain tensor (made by an op from constants) becomes replicated."""
        return value if isinstance(value, DTensor) else self._replicate(value)

    def _redistribute(self, value: DTensor, placements: Placements, where: str) -> DTensor:
        placements = normalize(placements, value.ndim)
        current = tuple(value.placements)
        if current == placements:
            return value
        to_partial = [a for a, p in enumerate(placements) if p.is_partial() and current[a] != p]
        staged = tuple(Replicate() if a in to_partial else p for a, p in enumerate(placements))
        try:
            if staged != current:
                # DTensor gives a redistributed tensor (and, in backward, its gradient) the
                # strides of its source while collectives return contiguous local tensors; a
                # later view of a transposed value would then fail on the local tensor
                value = value.contiguous().redistribute(self._mesh, staged)
                if value.requires_grad:
                    value.register_hook(_contiguous)
            if to_partial:
                value = self._to_partial(value, placements)
        except Exception as exc:  # DTensor raises many types for unsupported redistributions
            raise ShardingExecutionError(
                f"DTensor cannot redistribute {where} (shape {tuple(value.shape)}) from "
                f"{format_placements(current)} to {format_placements(placements)}: "
                f"{type(exc).__name__}: {_first_line(exc)}; choose another placement for it "
                "in the solution"
            ) from exc
        return value

    def _to_partial(self, value: DTensor, placements: Placements) -> DTensor:
        """``value``, replicated on the axes where ``placements`` is ``Partial``, as a partial
        value there: the first device along such an axis keeps a ``sum`` summand, the others
        hold zeros (``avg``, ``max``, ``min`` keep the value everywhere). DTensor's public
        ``redistribute`` refuses every move to ``Partial``."""
        coordinate = self._mesh.get_coordinate()
        assert coordinate is not None, "this rank is not part of the mesh"
        summed = [
            axis
            for axis, p in enumerate(placements)
            if isinstance(p, Partial) and p.reduce_op == "sum" and value.placements[axis] != p
        ]
        keep = all(coordinate[axis] == 0 for axis in summed)
        # the local gradient is a summand where a summand was kept; a partial value's gradient
        # is replicated
        grad_placements = tuple(
            Partial() if axis in summed else Replicate() if p.is_partial() else p
            for axis, p in enumerate(placements)
        )
        local = value.to_local(grad_placements=grad_placements)
        return DTensor.from_local(
            local if keep else local * 0,
            self._mesh,
            placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )

    def _outputs(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        values = pytree.tree_leaves(fx.node.map_arg(node.args[0], env.__getitem__))
        specs = self._graph.exported.graph_signature.output_specs
        user = [v for v, spec in zip(values, specs, strict=True) if spec.kind in _USER_OUTPUTS]
        return pytree.tree_unflatten(user, self._graph.exported.call_spec.out_spec)


def shard_as_dtensor(local: torch.Tensor, param: DTensor) -> DTensor:
    """``local``, this rank's shard of a tensor laid out like ``param``, as a DTensor with
    ``param``'s mesh, placements, global shape and stride (no communication)."""
    return DTensor.from_local(
        local,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def _contiguous(value: DTensor) -> DTensor:
    """``value`` with a contiguous local tensor and contiguous global strides."""
    if value.is_contiguous() and value.to_local().is_contiguous():
        return value
    return DTensor.from_local(
        value.to_local().contiguous(),
        value.device_mesh,
        value.placements,
        run_check=False,
        shape=value.shape,
        stride=torch.empty(value.shape, device="meta").stride(),
    )


def _owner(root: nn.Module, fqn: str) -> nn.Module:
    """The module that holds ``fqn``'s last component, creating empty containers on the way."""
    module = root
    for part in fqn.split(".")[:-1]:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]  # type: ignore[assignment]
    return module


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Node → the values whose last reader it is (they can be dropped once it ran)."""
    seen: set[fx.Node] = set()
    last: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for value in node.all_input_nodes:
            if value not in seen:
                seen.add(value)
                last.setdefault(node, []).append(value)
    return last


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _execution_error(
    node: fx.Node, inputs: list[Placements], exc: Exception
) -> ShardingExecutionError:
    placed = [format_placements(p) for p in inputs]
    return ShardingExecutionError(
        f"node '{node.name}' ({node.target}) cannot run on inputs placed {placed}: "
        f"{type(exc).__name__}: {_first_line(exc)}. Choose input placements DTensor supports "
        "for this op in the solution (replicated inputs work for every op DTensor has a sharding "
        "rule for); an op with no rule at all (e.g. a custom op) needs one registered with "
        "DTensor"
    )
