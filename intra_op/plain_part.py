"""A part of a captured graph as a compiled ``fx.GraphModule`` on plain tensors.

On a mesh of one device every DTensor holds its whole value, whatever its placements: a
``Shard(d)`` over one device is the full tensor, a ``Partial`` over one device is already its
own sum. Running the part's aten ops on the local tensors therefore computes exactly what the
DTensor program computes, without DTensor's dispatch and without the per-node interpreter
(as Megatron runs plain modules when tensor parallelism is 1).

``plain_part_module`` copies the part's nodes, in graph order, into a new ``fx.Graph``:

* every value the part reads from outside (``sources``, by name: graph placeholders and outside
  nodes' outputs) becomes a placeholder, in the order given;
* placeholders holding Python constants fixed at capture (``targets=None``) are inlined;
* ``call_args`` gives each node's arguments with device arguments already rewritten to the
  mesh's device, ``targets`` the op of a node that runs another than its own (evaluation:
  ``intra_op.evaluation``); ``skipped`` ops (metadata checks against capture time) are
  dropped;
* the output is the tuple of the ``outputs`` values.

``fx.GraphModule`` generates Python for the graph that frees each value after its last use.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import fx, nn


def plain_part_module(
    graph: fx.Graph,
    part: Collection[str] | None,
    sources: Sequence[str],
    constants: Mapping[str, Any],
    call_args: Mapping[fx.Node, tuple[Any, Any]],
    skipped: Collection[Any],
    outputs: Sequence[str],
    targets: Mapping[fx.Node, Any] | None = None,
) -> fx.GraphModule:
    """The part's nodes as a module taking ``sources`` positionally and returning the tuple of
    ``outputs``; ``part`` ``None`` means every node. Raises ``ValueError`` naming an output the
    part neither computes nor reads."""
    new = fx.Graph()
    env: dict[fx.Node, Any] = {}
    nodes = {node.name: node for node in graph.nodes}
    unknown = sorted(set(sources) - set(nodes))
    if unknown:
        raise ValueError(f"the graph has no values named {unknown}")
    for name in sources:
        env[nodes[name]] = new.placeholder(name)
    for node in graph.nodes:
        if node in env:
            continue
        if node.op == "placeholder" and node.name in constants:
            env[node] = constants[node.name]
        elif (
            node in call_args and (part is None or node.name in part) and node.target not in skipped
        ):
            args, kwargs = fx.node.map_arg(
                call_args[node], lambda v, reader=node: _read(env, reader, v)
            )
            target = node.target if targets is None else targets.get(node, node.target)
            env[node] = new.call_function(target, tuple(args), dict(kwargs))
    by_name = {node.name: value for node, value in env.items()}
    missing = sorted(name for name in outputs if name not in by_name)
    if missing:
        raise ValueError(f"the part neither computes nor receives {missing}")
    new.output(tuple(by_name[name] for name in outputs))
    return fx.GraphModule(nn.Module(), new)


def _read(env: Mapping[fx.Node, Any], reader: fx.Node, value: fx.Node) -> Any:
    if value not in env:
        raise ValueError(
            f"node '{reader.name}' of the part reads '{value.name}', which the part neither "
            "computes nor receives; pass it as a source"
        )
    return env[value]
