"""Capture a deep model of identical blocks from three of them: trace few, stamp the rest.

``torch.export`` traces every block of a deep model although the blocks are identical, about
0.15 s of a 2-core machine per transformer block: 16 s of the 80 blocks of LLaMA-3 70B, most of
what planning it costs. ``capture_repeated`` traces the model with its block list cut to three
blocks, then *stamps* the middle block until the graph has all ``n`` of them.

Stamping. Let the template graph ``T`` hold blocks ``b0, b1, b2`` (layers ``P.0, P.1, P.2``
of the block list at module path ``P``), and let its nodes in graph order be
``head · body · tail`` with ``body`` = the nodes of ``b1`` (``head`` ends with ``b0``,
``tail`` starts with ``b2``). The stamped graph is

    head · body⁽¹⁾ · body⁽²⁾ · … · body⁽ⁿ⁻²⁾ · tail⁽ⁿ⁻¹⁾

where copy ``j`` of the body

* renames each node ``base_c`` to ``base_{c + (j − 1)·k_base}``: fx numbers the nodes of one
  base name (``linear``, ``linear_1``, …) in graph order, and ``k_base`` is the count of that
  base in the body;
* renames module paths, layers and parameter FQNs ``P.1.`` → ``P.j.``;
* reads, where ``b1`` read a node of ``b0`` (the previous block), the node at the same position
  of copy ``j − 1``, and everything else (shared tables, graph inputs) as ``b1`` did;

and the tail shifts its counters by ``(n − 3)·k_base``, renames ``P.2.`` → ``P.(n−1).`` and reads
copy ``n − 2`` where it read ``b1``. Parameters keep the order of the graph's inputs.

The rules are checked before they are trusted: the template stamped to four blocks must equal
the model traced with four blocks, node for node (names, ops, operands, shapes, profiles,
layers, structural hashes, parameters). A model that fails the check, or has no block list of
identical modules, is traced whole. A stamped graph plans like a traced one; it has no
executable program (``OpGraph.graph_module`` raises), so the runtime traces the model itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from hierarchical_ap.graph import Layer, OpGraph, OpNode, capture, structural_hash

logger = logging.getLogger(__name__)

#: Blocks traced for the template (the middle one is stamped) and for the check.
TEMPLATE_BLOCKS = 3
CHECK_BLOCKS = 4
#: Block lists shorter than this are traced whole: stamping would save little.
MIN_STAMPED_BLOCKS = 8

_NAME = re.compile(r"^([a-zA-Z_][0-9a-zA-Z_]*?)(?:_(\d+))?$")  # torch.fx's own name regex


def capture_repeated(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    loss_fn: Callable[..., Any] | None = None,
    targets: Any = None,
    dynamic_batch: bool = False,
) -> OpGraph:
    """``capture(model, ...)``, tracing only three blocks of a deep block list (see module doc).

    Same arguments and result as ``hierarchical_ap.graph.capture``; the graph is exactly the one
    ``capture`` returns, without its executable program.
    """
    started = time.perf_counter()
    found = repeated_block_list(model)

    def traced(blocks: int | None) -> OpGraph:
        with _truncated(model, found[0] if found else "", blocks):
            return capture(
                model, example_inputs, loss_fn=loss_fn, targets=targets, dynamic_batch=dynamic_batch
            )

    if found is None or found[1] < MIN_STAMPED_BLOCKS:
        return traced(None)
    path, count = found
    template = traced(TEMPLATE_BLOCKS)
    check = traced(CHECK_BLOCKS)
    stamped_check = stamp(template, path, CHECK_BLOCKS)
    difference = (
        "the stamping rules do not apply"
        if stamped_check is None
        else graph_difference(stamped_check, check)
    )
    if difference:
        logger.info("tracing all %d blocks of %s: %s", count, path, difference)
        return traced(None)
    graph = stamp(template, path, count)
    assert graph is not None  # the rules held for four blocks, so they hold for ``count``
    if template.batch_is_dynamic:
        _rebuild_from(graph, template, path, count)
    graph.capture_time_s = time.perf_counter() - started
    logger.info(
        "captured %d blocks of %s from %d traced ones in %.2f s",
        count,
        path,
        TEMPLATE_BLOCKS,
        graph.capture_time_s,
    )
    return graph


def repeated_block_list(model: nn.Module) -> tuple[str, int] | None:
    """The module path and length of the model's longest ``nn.ModuleList`` of identical blocks
    (same class, same parameter names and shapes), if any has at least ``CHECK_BLOCKS``."""
    best: tuple[str, int] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < CHECK_BLOCKS:
            continue
        signatures = {_module_signature(block) for block in module}
        if len(signatures) == 1 and (best is None or len(module) > best[1]):
            best = (path, len(module))
    return best


def _module_signature(module: nn.Module) -> tuple:
    return (
        type(module),
        tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers()),
    )


@contextlib.contextmanager
def _truncated(model: nn.Module, path: str, blocks: int | None) -> Iterator[None]:
    """The model with the block list at ``path`` cut to its first ``blocks`` (None: whole)."""
    if blocks is None:
        yield
        return
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    original = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(original)[:blocks]))
    try:
        yield
    finally:
        setattr(parent, attr, original)


def _rebuild_from(graph: OpGraph, template: OpGraph, path: str, count: int) -> None:
    """Make ``graph.at_batch`` re-derive the template at the batch and stamp it again."""

    def rebuild(batch: int) -> OpGraph:
        at_batch = template.at_batch(batch)
        stamped = stamp(at_batch, path, count)
        if stamped is None:
            raise AssertionError(f"stamping {path} held at the example batch but not at {batch}")
        _rebuild_from(stamped, at_batch, path, count)
        return stamped

    graph._rebuild = rebuild


# ------------------------------------------------------------------------------------ stamping


@dataclass(frozen=True)
class _Renamer:
    """Names of one copy of template nodes: counters shifted per base, block index replaced."""

    shift: Mapping[str, int]
    """Base name → counter shift."""
    block_from: str
    block_to: str

    def node(self, name: str) -> str:
        base, counter = _split_name(name)
        shifted = counter + self.shift.get(base, 0)
        return f"{base}_{shifted}" if shifted else base

    def path(self, path: str) -> str:
        if path == self.block_from or path.startswith(self.block_from + "."):
            return self.block_to + path[len(self.block_from) :]
        return path


def _split_name(name: str) -> tuple[str, int]:
    match = _NAME.match(name)
    if match is None:
        return name, 0
    return match.group(1), int(match.group(2) or 0)


def stamp(template: OpGraph, path: str, count: int) -> OpGraph | None:
    """The graph of ``template`` (three blocks ``path.0..2``) with ``count`` blocks, or ``None``
    when the template breaks a rule stamping needs (see module doc)."""
    if count < TEMPLATE_BLOCKS:
        return None
    names = [f"{path}.{i}" for i in range(TEMPLATE_BLOCKS)]
    layers = {layer.name: layer for layer in template.layers}
    if any(name not in layers for name in names):
        return None
    first, body_layer, last = (layers[name] for name in names)
    order = list(template.nodes)
    position = {name: index for index, name in enumerate(order)}
    start = order.index(body_layer.nodes[0])
    end = start + len(body_layer.nodes)
    if order[start:end] != body_layer.nodes or len(first.nodes) != len(body_layer.nodes):
        return None
    body = set(body_layer.nodes)
    previous = dict(zip(first.nodes, body_layer.nodes, strict=True))  # b0 node → b1 position
    per_base = Counter(_split_name(name)[0] for name in body_layer.nodes)

    def renamer(shift_copies: int, block_from: str, block_index: int) -> _Renamer:
        shift = {base: shift_copies * k for base, k in per_base.items()}
        return _Renamer(shift, block_from, f"{path}.{block_index}")

    copies = [renamer(j - 1, names[1], j) for j in range(1, count - 1)]
    tail = renamer(count - 3, names[2], count - 1)

    values = _ValueNames(template, names, copies, tail)
    if values is None or not values.valid:
        return None

    nodes: dict[str, OpNode] = {}
    template_of: dict[str, str] = {}

    def emit(node: OpNode, new: _Renamer | None, read: Callable[[str], str]) -> None:
        """Add the copy of ``node`` that ``new`` names (None: the head, names unchanged)."""
        name = node.name if new is None else new.node(node.name)
        nodes[name] = replace(
            node,
            name=name,
            inputs=tuple(read(v) for v in node.inputs),
            params=node.params if new is None else tuple(new.path(p) for p in node.params),
            module_path=node.module_path if new is None else new.path(node.module_path),
            layer=node.layer if new is None else new.path(node.layer),
            alias_of=None if node.alias_of is None else read(node.alias_of),
        )
        template_of[name] = node.name

    def read_body(j: int) -> Callable[[str], str]:
        def read(value: str) -> str:
            if value in body:
                return copies[j].node(value)
            if value in previous:
                return value if j == 0 else copies[j - 1].node(previous[value])
            return values.rename(value, j)

        return read

    def read_tail(value: str) -> str:
        if value in previous:
            raise _Unstampable(f"the tail reads {value!r} of {names[0]}, two blocks back")
        if value in body:
            return copies[-1].node(value)
        if position.get(value, -1) >= end:
            return tail.node(value)
        return values.rename(value, None)

    try:
        for name in order[:start]:
            emit(template.nodes[name], None, lambda v: v)
        for j, copy in enumerate(copies):
            for name in body_layer.nodes:
                emit(template.nodes[name], copy, read_body(j))
        for name in order[end:]:
            emit(template.nodes[name], tail, read_tail)
    except _Unstampable as exc:
        logger.debug("cannot stamp %s: %s", path, exc)
        return None
    if len(nodes) != len(order) + (count - TEMPLATE_BLOCKS) * len(body):
        return None  # two copies produced one name

    new_layers: list[Layer] = []
    for layer in template.layers:
        if layer is body_layer:
            for copy in copies:
                new_layers.append(
                    Layer(
                        copy.path(layer.name),
                        [copy.node(n) for n in layer.nodes],
                        [copy.path(p) for p in layer.params],
                    )
                )
            continue
        # a layer outside the body may have nodes on both sides of it (GPT-2's `transformer`)
        new_layers.append(
            Layer(
                tail.path(layer.name),
                [tail.node(n) if position[n] >= end else n for n in layer.nodes],
                [tail.path(p) for p in layer.params],
            )
        )

    consumers: dict[str, list[str]] = {}
    for name, node in nodes.items():
        for value in node.inputs:
            consumers.setdefault(value, []).append(name)
    graph = OpGraph(
        exported=template.exported,
        nodes=nodes,
        layers=new_layers,
        param_shapes=values.param_shapes,
        input_values=dict(template.input_values),
        value_to_param=values.value_to_param,
        model_inputs=list(template.model_inputs),
        target_inputs=list(template.target_inputs),
        capture_time_s=template.capture_time_s,
        has_loss=template.has_loss,
        batch_size=template.batch_size,
        _consumers=consumers,
        _fx_nodes={name: template.fx_node(old) for name, old in template_of.items()},
        stamped=True,
    )
    for layer in new_layers:
        layer.structural_hash = structural_hash(graph, layer)
    return graph


class _Unstampable(Exception):
    """The template breaks a rule stamping relies on."""


class _ValueNames:
    """Parameter placeholders of the stamped graph: names, FQNs and their input order.

    A block parameter's placeholder is named ``<prefix><fqn with dots as underscores>`` by
    export (``p_model_blocks_1_attn_q_proj_weight``); copies get the name of their own FQN.
    """

    def __init__(
        self, template: OpGraph, names: list[str], copies: list[_Renamer], tail: _Renamer
    ) -> None:
        self.valid = True
        self._placeholder: dict[tuple[str, int | None], str] = {}
        body_prefix, last_prefix = names[1] + ".", names[2] + "."
        self.value_to_param: dict[str, str] = {}
        self.param_shapes = {}
        emitted_body = False
        for value, fqn in template.value_to_param.items():
            if fqn.startswith(body_prefix):
                if emitted_body:
                    continue
                emitted_body = True
                body_values = [
                    (v, f) for v, f in template.value_to_param.items() if f.startswith(body_prefix)
                ]
                for j, copy in enumerate(copies):
                    for body_value, body_fqn in body_values:
                        self._add(template, body_value, body_fqn, copy, j)
            elif fqn.startswith(last_prefix):
                self._add(template, value, fqn, tail, None)
            else:
                self.value_to_param[value] = fqn
                self.param_shapes.setdefault(fqn, template.param_shapes[fqn])
        block_values = [n for n in template.input_values if _mentions_block(n, names)]
        if block_values:
            self.valid = False  # per-block buffers: not stamped

    def _add(
        self, template: OpGraph, value: str, fqn: str, copy: _Renamer, index: int | None
    ) -> None:
        flat = fqn.replace(".", "_")
        if not value.endswith(flat):
            self.valid = False
            return
        new_fqn = copy.path(fqn)
        new_value = value[: len(value) - len(flat)] + new_fqn.replace(".", "_")
        self._placeholder[(value, index)] = new_value
        self.value_to_param[new_value] = new_fqn
        self.param_shapes[new_fqn] = template.param_shapes[fqn]

    def rename(self, value: str, index: int | None) -> str:
        """The name of graph value ``value`` (not a node) as read by body copy ``index`` (None:
        the tail)."""
        return self._placeholder.get((value, index), value)


def _mentions_block(value: str, names: list[str]) -> bool:
    return any(name.replace(".", "_") + "_" in value for name in names)


# ------------------------------------------------------------------------------------ check


def graph_difference(a: OpGraph, b: OpGraph) -> str:
    """The first difference between two graphs as planning sees them ("" when equal)."""
    if list(a.nodes) != list(b.nodes):
        extra = next((x for x, y in zip(a.nodes, b.nodes, strict=False) if x != y), None)
        return f"node names differ (first: {extra!r}; {len(a.nodes)} vs {len(b.nodes)} nodes)"
    for name, node in a.nodes.items():
        if node != b.nodes[name]:
            return f"node {name!r} differs"
    fields: dict[str, Callable[[OpGraph], Any]] = {
        "layers": lambda g: [(x.name, x.nodes, x.params, x.structural_hash) for x in g.layers],
        "parameters": lambda g: list(g.param_shapes.items()),
        "parameter placeholders": lambda g: list(g.value_to_param.items()),
        "inputs": lambda g: list(g.input_values.items()),
        "model inputs": lambda g: (g.model_inputs, g.target_inputs),
        "batch": lambda g: (g.batch_size, g.has_loss),
        "consumers": lambda g: {v: g.consumers(v) for v in g.nodes},
    }
    for label, get in fields.items():
        if get(a) != get(b):
            return f"{label} differ"
    return ""
