"""Graph capture: an unmodified ``nn.Module`` becomes an aten-level ``OpGraph``.

``capture`` runs ``torch.export.export(strict=False)`` over the model (and the loss, when a loss
function is given) on fake tensors, so nothing is allocated: a model built on the meta device
with 175 B parameters is captured in seconds. The exported program is in PyTorch's training IR
(``aten.linear``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention``, …) with parameters
lifted to graph inputs, which is the level the sharding pass reasons about.

On top of the fx graph, ``OpGraph`` keeps per node

* the symbolic profile (``hierarchical_ap.profile``): forward / backward FLOPs, bytes, saved
  activations;
* the output shapes and dtypes, the parameters it reads, whether its output needs a gradient;
* its module path and layer: the module path up to and including its first numeric component
  (``blocks.17.attn.qkv`` → ``blocks.17``), else the top-level child (``embed``, ``head``);
  nodes outside any module join the layer of their first producer (or first consumer);

and per layer a structural hash: the sequence of ops, shapes, dtypes, constants and internal
edges with parameter names relative to the layer, so that all blocks of GPT-3 share one hash.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import InputKind

from hierarchical_ap.errors import CaptureError
from hierarchical_ap.profile import NodeProfile, SymbolicProfiler, TensorMeta

logger = logging.getLogger(__name__)

_MODEL_ATTR = "model"


@dataclass
class OpNode:
    """One call node of the captured graph with its profile and placement in the model."""

    name: str
    target: str
    inputs: tuple[str, ...]
    """Names of the graph values (nodes or graph inputs) whose tensors this node reads, in order."""
    outputs: tuple[TensorMeta, ...]
    params: tuple[str, ...]
    """Fully qualified names (as in ``model.state_dict()``) of the parameters read directly."""
    module_path: str
    layer: str
    requires_grad: bool
    profile: NodeProfile
    alias_of: str | None
    """For views: the graph value whose storage the output shares (resolved to the root)."""

    @property
    def output_bytes(self) -> int:
        return sum(m.nbytes for m in self.outputs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype its maths is priced in: its first output's, fp32 when it has none."""
        return self.outputs[0].dtype if self.outputs else torch.float32


@dataclass
class Layer:
    """A contiguous group of nodes that belong to one module (a transformer block, the head…)."""

    name: str
    nodes: list[str]
    params: list[str]
    structural_hash: str = ""


@dataclass
class OpGraph:
    """A captured training program: the fx graph plus the symbolic profile of every node."""

    exported: torch.export.ExportedProgram
    nodes: dict[str, OpNode]
    layers: list[Layer]
    param_shapes: dict[str, TensorMeta]
    """Parameter FQN → shape/dtype, in the order of the graph's inputs."""
    input_values: dict[str, TensorMeta]
    """Graph input value name → meta, for the non-parameter inputs (user inputs, targets, buffers)."""
    value_to_param: dict[str, str]
    model_inputs: list[str]
    """Graph input value names of the model's own inputs (example_inputs), in pytree order."""
    target_inputs: list[str]
    """Graph input value names of the loss targets, in pytree order."""
    capture_time_s: float
    has_loss: bool
    batch_size: int | None = None
    """Size of dim 0 of the model inputs, when they share one (the batch)."""
    _consumers: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _fx_nodes: dict[str, fx.Node] | None = field(default=None, repr=False)
    _rebuild: Callable[[int], OpGraph] | None = field(default=None, repr=False)
    """Set on graphs captured with ``dynamic_batch=True``: re-derives the graph at a batch."""
    frozen_params: frozenset[str] = frozenset()
    """Parameter FQNs that do not require a gradient (frozen: no gradient, no update)."""
    stamped: bool = False
    """Built by ``hierarchical_ap.stamping`` from a shallower trace: it plans like a traced graph
    but has no executable program of its own (``exported`` is the shallow trace's)."""

    @property
    def batch_is_dynamic(self) -> bool:
        """Whether ``at_batch`` can re-derive this graph at another batch size."""
        return self._rebuild is not None

    def at_batch(self, batch: int) -> OpGraph:
        """The same program at another batch size, without tracing the model again.

        Needs a graph captured with ``capture(..., dynamic_batch=True)``: its shapes are
        expressions of one batch symbol, evaluated here at ``batch``; node profiles are
        recomputed (memoised by signature, so a model of identical blocks costs a few replays).
        """
        if batch == self.batch_size:
            return self
        if self._rebuild is None:
            raise ValueError(
                "this graph was captured with a fixed batch size; capture it with "
                "capture(..., dynamic_batch=True) to re-derive it at other batch sizes"
            )
        if batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch}")
        return self._rebuild(batch)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The aten-level ``fx.GraphModule`` (parameters are its leading inputs)."""
        if self.stamped:
            raise ValueError(
                "this graph was stamped from a shallower trace for planning and has no "
                "executable program; capture the model with hierarchical_ap.graph.capture to run it"
            )
        return self.exported.graph_module

    @property
    def num_params(self) -> int:
        return sum(m.numel for m in self.param_shapes.values())

    @property
    def param_bytes(self) -> int:
        return sum(m.nbytes for m in self.param_shapes.values())

    @property
    def forward_flops(self) -> int:
        return sum(n.profile.forward_flops for n in self.nodes.values())

    @property
    def backward_flops(self) -> int:
        return sum(n.profile.backward_flops for n in self.nodes.values())

    @property
    def train_flops(self) -> int:
        """FLOPs of one training step (forward + backward), without recomputation."""
        return self.forward_flops + self.backward_flops

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers are {[lay.name for lay in self.layers]}")

    def consumers(self, value: str) -> list[str]:
        """Names of the call nodes that read ``value``."""
        return self._consumers.get(value, [])

    def root_value(self, value: str) -> str:
        """The value owning the storage of ``value`` (follows views back to their base)."""
        node = self.nodes.get(value)
        while node is not None and node.alias_of is not None:
            value = node.alias_of
            node = self.nodes.get(value)
        return value

    def fx_node(self, name: str) -> fx.Node:
        """The fx node called ``name`` in ``graph_module`` (its ``args`` hold dims, flags…)."""
        if self._fx_nodes is None:
            self._fx_nodes = {n.name: n for n in self.graph_module.graph.nodes}
        return self._fx_nodes[name]

    def value_meta(self, value: str) -> TensorMeta:
        """Shape, stride and dtype of a graph value: a node's (first) output, an input or a
        parameter placeholder."""
        if value in self.nodes:
            return self.nodes[value].outputs[0]
        if value in self.input_values:
            return self.input_values[value]
        return self.param_shapes[self.value_to_param[value]]

    def value_bytes(self, value: str) -> int:
        if value in self.nodes:
            return self.nodes[value].output_bytes
        if value in self.input_values:
            return self.input_values[value].nbytes
        return self.param_shapes[self.value_to_param[value]].nbytes

    def saved_roots(self, node_names: Iterable[str] | None = None) -> set[str]:
        """Values whose storage autograd keeps for the given nodes, each at its root (views are
        followed back to their base); parameters included."""
        names = self.nodes.keys() if node_names is None else node_names
        roots: set[str] = set()
        for name in names:
            node = self.nodes[name]
            for saved in node.profile.saved:
                if saved.kind == "input":
                    roots.add(self.root_value(node.inputs[saved.index]))
                elif saved.kind == "output":
                    roots.add(self.root_value(name))
        return roots

    def saved_activation_bytes(self, node_names: Iterable[str] | None = None) -> int:
        """Bytes autograd keeps alive between forward and backward for the given nodes.

        Every distinct storage counts once: a graph value saved by several consumers (or saved
        through a view) is counted at its root; parameters are not activations and are left out;
        internal buffers (masks, statistics) count per node.
        """
        names = list(self.nodes if node_names is None else node_names)
        internal = sum(self.nodes[name].profile.internal_saved_bytes for name in names)
        roots = self.saved_roots(names)
        return internal + sum(self.value_bytes(r) for r in roots if r not in self.value_to_param)

    def layer_summary(self) -> list[dict[str, Any]]:
        """Per layer: name, structural hash, parameters, FLOPs and saved activation bytes."""
        summary = []
        for layer in self.layers:
            nodes = [self.nodes[n] for n in layer.nodes]
            summary.append(
                {
                    "name": layer.name,
                    "hash": layer.structural_hash,
                    "params": sum(self.param_shapes[p].numel for p in layer.params),
                    "forward_flops": sum(n.profile.forward_flops for n in nodes),
                    "backward_flops": sum(n.profile.backward_flops for n in nodes),
                    "saved_activation_bytes": self.saved_activation_bytes(layer.nodes),
                }
            )
        return summary


class _TrainingProgram(nn.Module):
    """The model followed by its loss, so that the exported program ends in the scalar loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None) -> None:
        super().__init__()
        setattr(self, _MODEL_ATTR, model)
        self.loss_fn = loss_fn

    def forward(self, args: tuple, kwargs: dict, targets: Any = None) -> Any:
        output = getattr(self, _MODEL_ATTR)(*args, **kwargs)
        if self.loss_fn is None:
            return output
        if targets is None:
            return self.loss_fn(output)
        return self.loss_fn(output, targets)


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    targets: Any = None,
    dynamic_batch: bool = False,
) -> OpGraph:
    """Capture ``model`` (and ``loss_fn(model(*example_inputs), targets)``) as an ``OpGraph``.

    ``example_inputs`` is a tuple of positional arguments or a dict of keyword arguments; their
    tensors may live on the meta device. With ``loss_fn``, the program ends in the scalar loss
    (``loss_fn(output)`` when ``targets`` is None). With ``dynamic_batch``, dim 0 of every input
    and target tensor is exported as one symbolic batch size, so that ``OpGraph.at_batch`` gives
    the graph at any batch without tracing again (the planner tries several micro-batch sizes);
    the example batch must then be at least 2 (export specialises sizes 0 and 1). Raises
    ``CaptureError`` naming the module and source line when ``torch.export`` cannot trace the
    model.
    """
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    program = _TrainingProgram(model, loss_fn)
    started = time.perf_counter()
    dynamic_shapes = _batch_dynamic_shapes((args, kwargs, targets)) if dynamic_batch else None
    try:
        exported = torch.export.export(
            program, (args, kwargs, targets), dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        raise _capture_error(model, exc) from exc
    num_model_inputs = len(pytree.tree_leaves((args, kwargs)))
    _inline_region_wrappers(exported.graph_module)
    _remove_identity_dropout(exported.graph_module)
    _detach_constants_out_of_place(exported)
    if loss_fn is not None:
        _check_scalar_loss(exported)
    builder = _GraphBuilder(
        exported,
        canonical=_canonical_param_names(model),
        trainable={name for name, p in model.named_parameters() if p.requires_grad},
        num_model_inputs=num_model_inputs,
        has_loss=loss_fn is not None,
    )
    graph = builder.build(builder.example_batch)
    graph.capture_time_s = time.perf_counter() - started
    logger.info(
        "captured %d nodes in %d layers (%d distinct node signatures) in %.2f s",
        len(graph.nodes),
        len(graph.layers),
        len({n.profile for n in graph.nodes.values()}),
        graph.capture_time_s,
    )
    return graph


_REGION_WRAPPERS = {
    # higher-order op name -> index of its subgraph argument (the operands follow it)
    "wrap_with_set_grad_enabled": 1,
    "wrap_with_autocast": 4,
}


def _inline_region_wrappers(module: fx.GraphModule) -> None:
    """Inline export's ``torch.no_grad()`` / ``torch.autocast`` regions into the main graph.

    Export keeps such regions (e.g. transformers' rotary tables) as higher-order ops that call a
    sub-graph. The profiler and the sharding pass want one flat graph of aten ops; the regions
    hold no parameter-dependent values, so inlining them leaves forward and backward unchanged.
    """
    graph = module.graph
    for node in list(graph.nodes):
        name = getattr(node.target, "__name__", "")
        if node.op != "call_function" or name not in _REGION_WRAPPERS:
            continue
        sub_index = _REGION_WRAPPERS[name]
        submodule = getattr(module, node.args[sub_index].target)
        operands = node.args[sub_index + 1 :]
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in submodule.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands, strict=True))
        results: Any = None
        with graph.inserting_before(node):
            for sub_node in submodule.graph.nodes:
                if sub_node.op == "placeholder":
                    continue
                if sub_node.op == "output":
                    results = pytree.tree_map(
                        lambda a, env=env: env[a] if isinstance(a, fx.Node) else a, sub_node.args[0]
                    )
                    continue
                env[sub_node] = graph.node_copy(sub_node, env.__getitem__)
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(results)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    module.recompile()


def _remove_identity_dropout(module: fx.GraphModule) -> None:
    """Drop ``aten.dropout(x, p=0, ...)`` nodes: they return ``x`` unchanged.

    Models keep dropout modules with p = 0 (the norm for large-model pre-training); removing
    them keeps an all-reduce-free path open for ``Partial`` values (a row-parallel output can
    be reduce-scattered straight into a sequence-sharded residual add).
    """
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            probability = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            if probability == 0:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
    module.recompile()


def _detach_constants_out_of_place(exported: torch.export.ExportedProgram) -> None:
    """Make ``aten.detach_`` of a lifted tensor constant an out-of-place ``aten.detach``.

    transformers' key/value cache starts from ``torch.tensor([])`` constants that the graph
    detaches in place. The runtime hands a constant to the graph as a view (a DTensor's local
    tensor), which ``detach_`` refuses; a constant never requires a gradient, so the
    out-of-place detach returns the same value.
    """
    constants = {
        spec.arg.name
        for spec in exported.graph_signature.input_specs
        if spec.kind is InputKind.CONSTANT_TENSOR
    }
    module = exported.graph_module
    for node in module.graph.nodes:
        if (
            node.op == "call_function"
            and node.target is torch.ops.aten.detach_.default
            and isinstance(node.args[0], fx.Node)
            and node.args[0].name in constants
        ):
            node.target = torch.ops.aten.detach.default
    module.recompile()


def _check_scalar_loss(exported: torch.export.ExportedProgram) -> None:
    output_node = next(n for n in exported.graph.nodes if n.op == "output")
    values = [
        a.meta.get("val") for a in pytree.tree_leaves(output_node.args) if isinstance(a, fx.Node)
    ]
    if len(values) != 1 or not isinstance(values[0], torch.Tensor) or values[0].numel() != 1:
        raise CaptureError(
            "loss_fn must return one scalar tensor (the loss), but the captured program returns "
            f"{[tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]}; "
            "reduce the loss, e.g. with F.cross_entropy(logits.flatten(0, 1), labels.flatten())"
        )


def _strip_model_prefix(path: str) -> str:
    prefix = _MODEL_ATTR + "."
    if path == _MODEL_ATTR:
        return ""
    return path[len(prefix) :] if path.startswith(prefix) else path


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _strip_model_prefix(path)


def _layer_of_path(path: str) -> str:
    if not path:
        return ""
    parts = path.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return parts[0]


def _batch_dynamic_shapes(inputs: Any) -> Any:
    """``dynamic_shapes`` for export: dim 0 of every tensor leaf is one shared batch ``Dim``."""
    batch = torch.export.Dim("batch")
    return pytree.tree_map(
        lambda leaf: {0: batch} if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None,
        inputs,
    )


class _GraphBuilder:
    """Builds ``OpGraph``s from one exported program, at its example batch or another one.

    Shapes of a dynamic-batch export are sympy expressions of one batch symbol; they are
    evaluated at the requested batch. The profiler is shared, so re-deriving the graph at a new
    batch replays only the node signatures it has not seen.
    """

    def __init__(
        self,
        exported: torch.export.ExportedProgram,
        *,
        canonical: Mapping[str, str],
        trainable: set[str],
        num_model_inputs: int,
        has_loss: bool,
    ) -> None:
        self.exported = exported
        self.canonical = canonical
        self.trainable = trainable
        self.num_model_inputs = num_model_inputs
        self.has_loss = has_loss
        self.profiler = SymbolicProfiler()
        user_inputs = [n for n in exported.graph_signature.user_inputs if isinstance(n, str)]
        placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
        batch_sizes = [
            placeholders[name].meta["val"].shape[0]
            for name in user_inputs
            if isinstance(placeholders[name].meta.get("val"), torch.Tensor)
            and placeholders[name].meta["val"].dim() > 0
        ]
        symbols = {
            free
            for size in batch_sizes
            if isinstance(size, torch.SymInt)
            for free in size.node.expr.free_symbols
        }
        self.symbol = symbols.pop() if len(symbols) == 1 else None
        hints = {
            size.node.hint if isinstance(size, torch.SymInt) else int(size) for size in batch_sizes
        }
        self.example_batch = hints.pop() if len(hints) == 1 else None

    def build(self, batch: int | None) -> OpGraph:
        sizes = {self.symbol: batch} if self.symbol is not None else {}

        def concrete(size: Any) -> int:
            if isinstance(size, torch.SymInt):
                return int(size.node.expr.xreplace(sizes))
            return int(size)

        graph = _build_op_graph(self.exported, self, concrete)
        graph.batch_size = batch
        graph.has_loss = self.has_loss
        if self.symbol is not None:
            graph._rebuild = self.build
        return graph


def _build_op_graph(
    exported: torch.export.ExportedProgram,
    builder: _GraphBuilder,
    concrete: Callable[[Any], int],
) -> OpGraph:
    signature = exported.graph_signature
    user_inputs = [name for name in signature.user_inputs if isinstance(name, str)]
    value_to_param = {
        name: builder.canonical.get(_strip_model_prefix(fqn), _strip_model_prefix(fqn))
        for name, fqn in signature.inputs_to_parameters.items()
    }

    param_shapes: dict[str, TensorMeta] = {}
    input_values: dict[str, TensorMeta] = {}
    requires_grad: dict[str, bool] = {}
    nodes: dict[str, OpNode] = {}
    consumers: dict[str, list[str]] = {}

    for node in exported.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                continue
            meta = TensorMeta.of(val, concrete)
            if node.name in value_to_param:
                fqn = value_to_param[node.name]
                param_shapes.setdefault(fqn, meta)
                requires_grad[node.name] = fqn in builder.trainable
            else:
                input_values[node.name] = meta
                requires_grad[node.name] = False
        elif node.op == "call_function" and not isinstance(val, (torch.SymInt, int)):
            nodes[node.name] = _build_node(
                node, value_to_param, requires_grad, builder.profiler, nodes, concrete
            )
            for value in nodes[node.name].inputs:
                consumers.setdefault(value, []).append(node.name)

    layers = _assign_layers(nodes, consumers)
    num_model_inputs = builder.num_model_inputs
    graph = OpGraph(
        exported=exported,
        nodes=nodes,
        layers=layers,
        param_shapes=param_shapes,
        input_values=input_values,
        value_to_param=value_to_param,
        model_inputs=user_inputs[:num_model_inputs],
        target_inputs=user_inputs[num_model_inputs:],
        capture_time_s=0.0,
        has_loss=False,
        frozen_params=frozenset(
            fqn for name, fqn in value_to_param.items() if not requires_grad.get(name, False)
        ),
        _consumers=consumers,
    )
    for layer in layers:
        layer.structural_hash = structural_hash(graph, layer)
    logger.debug("profiled %d distinct node signatures", builder.profiler.distinct_signatures)
    return graph


def _canonical_param_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name → the first name of the same tensor (tied weights share one FQN)."""
    first_name: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical[name] = first_name.setdefault(id(param), name)
    return canonical


def _to_meta(value: Any, concrete: Callable[[Any], int]) -> Any:
    """Replace fx nodes in an argument structure by the ``TensorMeta`` of their value.

    Devices become ``cpu``: the profiler replays every node on fake CPU tensors, whatever device
    (often ``meta``) the model was captured on. Symbolic sizes become ``concrete`` integers.
    """

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, torch.device):
            return torch.device("cpu")
        if isinstance(leaf, torch.SymInt):
            return concrete(leaf)
        if isinstance(leaf, fx.Node):
            val = leaf.meta.get("val")
            if isinstance(val, torch.Tensor):
                return TensorMeta.of(val, concrete)
            if isinstance(val, torch.SymInt):
                return concrete(val)
            return val
        return leaf

    return pytree.tree_map(convert, value)


def _build_node(
    node: fx.Node,
    value_to_param: Mapping[str, str],
    requires_grad: dict[str, bool],
    profiler: SymbolicProfiler,
    nodes: Mapping[str, OpNode],
    concrete: Callable[[Any], int],
) -> OpNode:
    val = node.meta.get("val")
    outputs = tuple(
        TensorMeta.of(t, concrete) for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor)
    )
    if node.target is operator.getitem:
        return _build_getitem(node, outputs, requires_grad, nodes)

    tensor_inputs = [
        a
        for a in pytree.tree_leaves((node.args, node.kwargs))
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
    ]
    input_requires_grad = [requires_grad.get(a.name, False) for a in tensor_inputs]
    needs_grad = any(input_requires_grad) and any(m.dtype.is_floating_point for m in outputs)
    requires_grad[node.name] = needs_grad
    profile = profiler.profile(
        node.target,
        _to_meta(node.args, concrete),
        _to_meta(node.kwargs, concrete),
        input_requires_grad,
    )
    alias_of = None
    if profile.output_aliases_input is not None:
        alias_of = tensor_inputs[profile.output_aliases_input].name
    module_path = _module_path(node)
    return OpNode(
        name=node.name,
        target=str(node.target),
        inputs=tuple(a.name for a in tensor_inputs),
        outputs=outputs,
        params=tuple(
            dict.fromkeys(value_to_param[a.name] for a in tensor_inputs if a.name in value_to_param)
        ),
        module_path=module_path,
        layer=_layer_of_path(module_path),
        requires_grad=needs_grad,
        profile=profile,
        alias_of=alias_of,
    )


def _build_getitem(
    node: fx.Node,
    outputs: tuple[TensorMeta, ...],
    requires_grad: dict[str, bool],
    nodes: Mapping[str, OpNode],
) -> OpNode:
    """``getitem`` picks one output of a multi-output op; it costs nothing.

    It aliases its source when the source is itself a view (``split``, ``chunk``, ``unbind``);
    an element of a tuple of fresh tensors owns its own storage.
    """
    source = node.args[0]
    assert isinstance(source, fx.Node)
    needs_grad = requires_grad.get(source.name, False) and any(
        m.dtype.is_floating_point for m in outputs
    )
    requires_grad[node.name] = needs_grad
    source_node = nodes.get(source.name)
    module_path = _module_path(node)
    return OpNode(
        name=node.name,
        target=str(node.target),
        inputs=(source.name,),
        outputs=outputs,
        params=(),
        module_path=module_path,
        layer=_layer_of_path(module_path),
        requires_grad=needs_grad,
        profile=NodeProfile(0, 0, 0, 0, (), None),
        alias_of=source.name if source_node is not None and source_node.alias_of else None,
    )


def _assign_layers(nodes: dict[str, OpNode], consumers: Mapping[str, list[str]]) -> list[Layer]:
    """Place module-less nodes, then group nodes into layers in order of first appearance.

    A module-less node joins the layer of its first non-constant producer. Nodes computed from
    constants alone (position ids, rotary tables) join the graph's first layer, so that the
    blocks that consume them stay structurally identical. Anything left joins the layer of its
    first consumer.
    """
    order = list(nodes)
    constant: dict[str, bool] = {}
    for name in order:
        constant[name] = all(v in nodes and constant[v] for v in nodes[name].inputs)
    first_layer = next((nodes[n].layer for n in order if nodes[n].layer), "root")
    for name in order:
        node = nodes[name]
        if node.layer:
            continue
        producers = [
            nodes[v].layer for v in node.inputs if v in nodes and nodes[v].layer and not constant[v]
        ]
        if producers:
            node.layer = producers[0]
        elif constant[name]:
            node.layer = first_layer
    for name in reversed(order):
        node = nodes[name]
        if not node.layer:
            users = [nodes[u].layer for u in consumers.get(name, []) if nodes[u].layer]
            node.layer = users[0] if users else first_layer

    layers: dict[str, Layer] = {}
    for name in order:
        node = nodes[name]
        layer = layers.setdefault(node.layer, Layer(node.layer, [], []))
        layer.nodes.append(name)
        for param in node.params:
            if param not in layer.params:
                layer.params.append(param)
    return list(layers.values())


def structural_hash(graph: OpGraph, layer: Layer) -> str:
    """Hash of a layer's structure: equal for identical blocks at different depths."""
    local_index = {name: i for i, name in enumerate(layer.nodes)}
    prefix = layer.name + "."
    items: list[Any] = []
    for name in layer.nodes:
        node = graph.nodes[name]
        operands = []
        for value in node.inputs:
            if value in local_index:
                operands.append(("local", local_index[value]))
            elif value in graph.value_to_param:
                fqn = graph.value_to_param[value]
                rel = fqn[len(prefix) :] if fqn.startswith(prefix) else fqn
                operands.append(("param", rel, graph.param_shapes[fqn]))
            else:
                operands.append(
                    (
                        "external",
                        graph.nodes[value].outputs
                        if value in graph.nodes
                        else graph.input_values.get(value),
                    )
                )
        items.append((node.target, tuple(operands), node.outputs, node.profile))
    return hashlib.sha1(repr(items).encode()).hexdigest()[:16]


def _capture_error(model: nn.Module, exc: Exception) -> CaptureError:
    """Name the module and the user source line where tracing failed, and what to change."""
    module_names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
    module_desc, source_line = "", ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if "/torch/" in filename or "/hierarchical_ap/graph.py" in filename:
            continue
        source_line = f"{filename}:{lineno} (in {frame.f_code.co_name})"
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in module_names:
            module_desc = f"module '{module_names[id(owner)]}' ({type(owner).__name__})"
    where = ", ".join(p for p in (module_desc, f"at {source_line}" if source_line else "") if p)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CaptureError(
        f"torch.export could not capture the model{': ' + where if where else ''}: "
        f"{type(exc).__name__}: {first_line}. "
        "Make forward() traceable: no Python control flow on tensor values (use torch.where / "
        "torch.cond), no .item() / .tolist() / data-dependent shapes, no unsupported Python calls "
        "on tensors; see https://pytorch.org/docs/stable/export.html"
    )
