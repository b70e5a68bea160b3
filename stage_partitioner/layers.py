"""Planning layers: the sequence the inter-op DP slices into pipeline stages.

A planning layer is a contiguous range of the captured graph's nodes (topological order), made
of *parts*: the units the intra-op ILP is solved on. Parts with the same *kind* are identical
(same structural hash), so they cost one ILP solve per mesh: the 96 blocks of GPT-3 cost one.
There are two ways to form planning layers.

**Repeated blocks** (the default whenever the graph has a run of at least two consecutive module
layers with the same structural hash). The graph's nodes are first cut into *segments*: maximal
runs of nodes of one module layer. A module layer that forms a single run is a *clean* segment
whose kind is its structural hash; a module layer split into several runs (its nodes interleave
with another layer's, like GPT's token and position embeddings) is not: its runs are
*fragments*, and consecutive fragments merge into one segment whose kind is a hash of its node
names (unique in the graph). The *blocks* are the clean segments inside runs of at least two
consecutive segments of equal kind. Between blocks, a stretch of other segments that holds a
fragment becomes one segment too (GPT's ``embed+pos_embed``). Each segment is one part; a block
split by a straggler node is thus no block, and the graph's nodes are never lost or duplicated.
Planning layers follow the blocks, ``g`` blocks at a time; the segments before the first block
(embeddings) join the first planning layer, and every other non-block segment joins the layer of
the block before it (the final norm, head and loss join the last layer), so each planning layer
holds ``g`` blocks. With ``n`` blocks and at most ``M`` layers, ``g`` is the smallest divisor of
``n`` with ``n / g ≤ M`` (equal groups: 96 blocks, ``M = 32`` → 32 layers of 3; 105 → 21 of
5). When that divisor would leave fewer than half the layers that ``g₀ = ⌈n / M⌉`` gives (a
prime ``n``, or ``n = 106 = 2 · 53``), groups of ``g₀`` are used instead, the last one shorter
(37 blocks, ``M = 32`` → 18 layers of 2 and one of 1).

**Operator clustering** (no repeated blocks): Alpa's layer-clustering DP (Zheng et al., OSDI'22,
§5.2, Eq. 6; alpa ``layer_construction.cluster_jaxpr_by_cost``). With operators ``o_1..o_K`` in
topological order, ``C(i, k)`` the bytes of the distinct values produced by ``o_1..o_{i−1}`` and
read by ``o_i..o_k`` (what a layer receives from the layers before it; graph inputs, i.e.
parameters, model inputs and targets, are left out as in Alpa, since no stage sends them), and
``G(k, r)`` the least "largest input of any layer" over clusterings of ``o_1..o_k`` into ``r``
layers:

    G(k, r) = min_{i ≤ k} max{ G(i − 1, r − 1), C(i, k) }
              subject to FLOP(o_i..o_k) ≤ (1 + ε) · FLOP_total / L,      G(0, 0) = 0.

FLOPs are training FLOPs (forward + backward); *heavy* operators are those with forward FLOPs
(matmuls, convolutions, attention). Every layer must hold a heavy operator when there are at
least ``L`` of them, and a layer holding a single heavy operator may exceed the FLOP bound (an
operator cannot be split; Alpa's ``layer_heavy_op_lower_bound`` rule). Among clusterings with
the optimal ``G(K, L)``, the one with the lowest variance of per-layer FLOPs (least sum of
squares) is taken; it is found exactly by a second DP restricted to layers with
``C(i, k) ≤ G(K, L)``. Without ``num_layers``, ``L`` is chosen by Alpa's search: the largest
``L ≤ min(max_layers, heavy operators)`` whose ``G(K, L)`` is no larger than that of the
2-layer clustering (binary search; more layers are free as long as no layer receives more).
Where 2 layers are infeasible (one operator dominates the FLOPs), the reference is the smallest
feasible ``L``; where none is, ``L = 1``.
Each clustered layer is one part. Graphs of more than ``MAX_OPERATORS`` nodes are clustered on
units that each start at a heavy node (light nodes join the heavy node before them), evenly
merged further if there are still too many, so the ``O(K² L)`` DP stays small.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass

import networkx as nx
import numpy as np

from hierarchical_ap.graph import OpGraph

MAX_OPERATORS = 2000
"""Largest number of units the clustering DP runs on (see the module docstring)."""

DEFAULT_EPS = 0.5
"""Alpa's default FLOP imbalance tolerance ε."""


@dataclass(frozen=True)
class LayerPart:
    """A unit the intra-op ILP is solved on: a contiguous run of nodes, with a kind key."""

    nodes: tuple[str, ...]
    kind: str
    """Identical parts (same structural hash) share a kind, hence one ILP solve."""


@dataclass(frozen=True)
class PlanningLayer:
    """A contiguous range of the graph's nodes that the inter-op DP places as a whole."""

    index: int
    name: str
    """E.g. "blocks.4-7", "embed+pos_embed+blocks.0", "ops 0-57"."""
    module_layers: tuple[str, ...]
    """The OpGraph layer names inside (empty for clustered operator ranges)."""
    parts: tuple[LayerPart, ...]
    """In node order; their nodes together are the layer's nodes."""
    train_flops: int
    """Forward + backward FLOPs of its nodes."""
    param_bytes: int
    """Bytes of the parameters its nodes read, each FQN once."""

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(name for part in self.parts for name in part.nodes)

    @property
    def kind(self) -> tuple[str, ...]:
        """Kinds of its parts: layers of equal kind cost the same on any mesh."""
        return tuple(part.kind for part in self.parts)


@dataclass(frozen=True)
class _Segment:
    """A contiguous node range ``[start, stop)`` of one module layer (or of several, merged)."""

    start: int
    stop: int
    module_layers: tuple[str, ...]
    kind: str
    clean: bool


def planning_layers(
    graph: OpGraph,
    *,
    max_layers: int = 32,
    num_layers: int | None = None,
    eps: float = DEFAULT_EPS,
) -> list[PlanningLayer]:
    """The planning layers of ``graph`` (see the module docstring for both rules).

    ``num_layers`` asks for exactly that many layers (``max_layers`` is then not used): with
    repeated blocks it must divide the block count (``ValueError`` naming the valid values
    otherwise); when clustering, it is the ``L`` of the DP. ``eps`` is the clustering's FLOP imbalance tolerance.
    """
    if not graph.nodes:
        raise ValueError("the graph has no nodes to form planning layers from")
    if max_layers < 1:
        raise ValueError(f"max_layers must be at least 1, got {max_layers}")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    order = list(graph.nodes)
    segments = _segments(graph, order)
    blocks = _block_indices(segments)
    if blocks:
        segments = _merge_fragments(order, segments, blocks)
        blocks = _block_indices(segments)
        ranges = _block_layer_ranges(segments, blocks, max_layers, num_layers)
        return [
            _layer_of_segments(graph, order, index, segments[first:last])
            for index, (first, last) in enumerate(ranges)
        ]
    return _clustered_layers(graph, order, max_layers, num_layers, eps)


# ------------------------------------------------------------------------- repeated blocks


def block_layers(graph: OpGraph) -> list[PlanningLayer]:
    """One planning layer per block (no grouping): the fine layering of uniform slicings."""
    return planning_layers(graph, max_layers=max(len(graph.layers), 1))


def group_sizes(num_blocks: int, max_layers: int, num_layers: int | None = None) -> list[int]:
    """Blocks per planning layer, in order (the grouping rule of the module docstring)."""
    if num_layers is not None:
        if num_blocks % num_layers:
            valid = [d for d in range(1, num_blocks + 1) if num_blocks % d == 0]
            raise ValueError(
                f"num_layers={num_layers} does not divide the {num_blocks} repeated blocks; "
                f"valid values are {', '.join(map(str, valid))}"
            )
        return [num_blocks // num_layers] * num_layers
    least = math.ceil(num_blocks / max_layers)
    equal = next(g for g in range(least, num_blocks + 1) if num_blocks % g == 0)
    if num_blocks // equal >= math.ceil(num_blocks / least) / 2:
        return [equal] * (num_blocks // equal)
    full, rest = divmod(num_blocks, least)
    return [least] * full + ([rest] if rest else [])


def _segments(graph: OpGraph, order: list[str]) -> list[_Segment]:
    """Maximal runs of nodes of one module layer; consecutive unclean runs merged."""
    sizes = {layer.name: len(layer.nodes) for layer in graph.layers}
    hashes = {layer.name: layer.structural_hash for layer in graph.layers}
    runs: list[_Segment] = []
    for index, name in enumerate(order):
        layer = graph.nodes[name].layer
        if runs and runs[-1].module_layers == (layer,):
            runs[-1] = _Segment(runs[-1].start, index + 1, (layer,), "", clean=False)
        else:
            runs.append(_Segment(index, index + 1, (layer,), "", clean=False))
    runs = [
        _Segment(r.start, r.stop, r.module_layers, hashes[r.module_layers[0]], clean=True)
        if r.stop - r.start == sizes.get(r.module_layers[0])
        else r
        for r in runs
    ]
    segments: list[_Segment] = []
    for clean, group in itertools.groupby(runs, key=lambda r: r.clean):
        stretch = list(group)
        segments.extend(stretch if clean else [_merged(order, stretch)])
    return segments


def _merge_fragments(
    order: list[str], segments: list[_Segment], blocks: list[int]
) -> list[_Segment]:
    """Consecutive non-block segments that hold a fragment of a split module layer (GPT's
    token embedding around its position embedding) become one segment, hence one part."""
    is_block = set(blocks)
    merged: list[_Segment] = []
    for block, group in itertools.groupby(
        enumerate(segments), key=lambda item: item[0] in is_block
    ):
        stretch = [segment for _, segment in group]
        if block or all(segment.clean for segment in stretch):
            merged.extend(stretch)
        else:
            merged.append(_merged(order, stretch))
    return merged


def _merged(order: list[str], segments: list[_Segment]) -> _Segment:
    """One unclean segment spanning consecutive ``segments``; its kind is unique."""
    start, stop = segments[0].start, segments[-1].stop
    layers = tuple(dict.fromkeys(m for segment in segments for m in segment.module_layers))
    return _Segment(start, stop, layers, _ops_kind(order[start:stop]), clean=False)


def _block_indices(segments: list[_Segment]) -> list[int]:
    """Indices of the clean segments in runs of ≥ 2 consecutive segments of one kind."""
    blocks: list[int] = []
    index = 0
    for (clean, _), run in itertools.groupby(segments, key=lambda s: (s.clean, s.kind)):
        length = len(list(run))
        if clean and length >= 2:
            blocks.extend(range(index, index + length))
        index += length
    return blocks


def _block_layer_ranges(
    segments: list[_Segment], blocks: list[int], max_layers: int, num_layers: int | None
) -> list[tuple[int, int]]:
    """Segment ranges ``[first, last)`` of the planning layers."""
    sizes = group_sizes(len(blocks), max_layers, num_layers)
    starts = np.cumsum([0, *sizes[:-1]])
    bounds = [0] + [blocks[s] for s in starts[1:]] + [len(segments)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _layer_of_segments(
    graph: OpGraph, order: list[str], index: int, segments: list[_Segment]
) -> PlanningLayer:
    parts = tuple(LayerPart(tuple(order[s.start : s.stop]), s.kind) for s in segments)
    module_layers = tuple(dict.fromkeys(m for s in segments for m in s.module_layers))
    nodes = order[segments[0].start : segments[-1].stop]
    return _planning_layer(graph, index, _compact_name(module_layers), module_layers, parts, nodes)


def _compact_name(module_layers: tuple[str, ...]) -> str:
    """``embed+blocks.0+blocks.1+head`` → ``embed+blocks.0-1+head``."""
    pieces: list[str] = []
    run: tuple[str, int, int] | None = None  # prefix, first index, last index
    for name in module_layers:
        match = re.fullmatch(r"(.*)\.(\d+)", name)
        if match and run and run[0] == match[1] and run[2] + 1 == int(match[2]):
            run = (run[0], run[1], int(match[2]))
            continue
        if run:
            pieces.append(_run_name(run))
            run = None
        if match:
            run = (match[1], int(match[2]), int(match[2]))
        else:
            pieces.append(name)
    if run:
        pieces.append(_run_name(run))
    return "+".join(pieces)


def _run_name(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"


# --------------------------------------------------------------------- operator clustering


def cluster_operators(
    flops: np.ndarray,
    cut_bytes: np.ndarray,
    num_layers: int,
    *,
    eps: float = DEFAULT_EPS,
    heavy: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """Alpa's layer-clustering DP (Eq. 6) on ``K`` operators: ``num_layers`` ranges.

    ``flops[o]`` is operator ``o``'s cost, ``cut_bytes[i, k]`` the ``C(i, k)`` of the segment
    ``o_i..o_k`` (0-based, inclusive; entries with ``k < i`` are ignored), ``heavy[o]`` how many
    heavy operators ``o`` stands for (default: ``flops > 0``). Returns half-open ranges
    ``(start, stop)`` covering ``0..K`` in order: the least largest ``C`` subject to the FLOP
    bound, ties broken by the least sum of squared layer FLOPs. Raises ``ValueError`` when
    ``num_layers`` is not in ``1..K`` or no clustering satisfies the constraints.
    """
    flops = np.asarray(flops, dtype=np.float64)
    cut = np.asarray(cut_bytes, dtype=np.float64)
    counts = (flops > 0).astype(np.int64) if heavy is None else np.asarray(heavy, np.int64)
    size = flops.shape[0]
    if not 1 <= num_layers <= size:
        raise ValueError(f"num_layers must be in 1..{size} (the operators), got {num_layers}")
    feasible = _feasible_segments(flops, counts, num_layers, eps)
    best = _min_max_cut(cut, feasible, num_layers)
    if not np.isfinite(best):
        raise ValueError(
            f"no clustering of {size} operators into {num_layers} layers keeps every layer "
            f"within (1 + {eps}) × the mean FLOPs with a heavy operator in each"
        )
    return _least_squares_clustering(flops, feasible & (cut <= best), num_layers)


def _feasible_segments(
    flops: np.ndarray, heavy: np.ndarray, num_layers: int, eps: float
) -> np.ndarray:
    """``[K, K]`` bool: may ``o_i..o_k`` form a layer (FLOP bound, heavy-operator rule)."""
    size = flops.shape[0]
    flop_prefix = np.concatenate([[0.0], np.cumsum(flops)])
    heavy_prefix = np.concatenate([[0], np.cumsum(heavy)])
    segment_flops = flop_prefix[None, 1:] - flop_prefix[:-1, None]
    segment_heavy = heavy_prefix[None, 1:] - heavy_prefix[:-1, None]
    bound = (1 + eps) * flop_prefix[-1] / num_layers
    min_heavy = 1 if heavy_prefix[-1] >= num_layers else 0
    ordered = np.triu(np.ones((size, size), dtype=bool))
    balanced = (segment_flops <= bound) | (segment_heavy <= 1)
    return ordered & balanced & (segment_heavy >= min_heavy)


def _min_max_cut(cut: np.ndarray, feasible: np.ndarray, num_layers: int) -> float:
    """``G(K, L)`` of Eq. 6 (``inf`` when infeasible); ``best[i]`` is ``G(i, r)``."""
    size = cut.shape[0]
    best = np.full(size + 1, np.inf)
    best[0] = 0.0
    for _ in range(num_layers):
        candidate = np.where(feasible, np.maximum(best[:size, None], cut), np.inf)
        best = np.concatenate([[np.inf], candidate.min(axis=0)])
    return float(best[size])


def _least_squares_clustering(
    flops: np.ndarray, allowed: np.ndarray, num_layers: int
) -> list[tuple[int, int]]:
    """The clustering into allowed segments with the least sum of squared layer FLOPs."""
    size = flops.shape[0]
    total = flops.sum()
    prefix = np.concatenate([[0.0], np.cumsum(flops / total if total > 0 else flops)])
    squares = (prefix[None, 1:] - prefix[:-1, None]) ** 2
    cost = np.full(size + 1, np.inf)
    cost[0] = 0.0
    choice = np.zeros((num_layers, size + 1), dtype=np.int64)
    for r in range(num_layers):
        candidate = np.where(allowed, cost[:size, None] + squares, np.inf)
        choice[r, 1:] = candidate.argmin(axis=0)
        cost = np.concatenate([[np.inf], candidate.min(axis=0)])
    ranges = []
    stop = size
    for r in range(num_layers - 1, -1, -1):
        start = int(choice[r, stop])
        ranges.append((start, stop))
        stop = start
    return ranges[::-1]


def default_num_layers(
    flops: np.ndarray,
    cut_bytes: np.ndarray,
    max_layers: int,
    *,
    eps: float = DEFAULT_EPS,
    heavy: np.ndarray | None = None,
) -> int:
    """Alpa's layer-count search: the largest ``L ≤ min(max_layers, heavy operators)`` whose
    optimal largest cut ``G(K, L)`` is no larger than that of 2 layers (binary search).

    The reference is the smallest feasible ``L ≥ 2`` when 2 layers are infeasible; 1 when no
    ``L ≥ 2`` is.
    """
    flops = np.asarray(flops, dtype=np.float64)
    cut = np.asarray(cut_bytes, dtype=np.float64)
    counts = (flops > 0).astype(np.int64) if heavy is None else np.asarray(heavy, np.int64)
    top = max(1, min(max_layers, int(counts.sum()), flops.shape[0]))

    def value(layers: int) -> float:
        return _min_max_cut(cut, _feasible_segments(flops, counts, layers, eps), layers)

    low = min(2, top)
    reference = value(low)
    while not np.isfinite(reference) and low < top:
        low += 1
        reference = value(low)
    if not np.isfinite(reference):
        return 1
    high = top + 1
    while high - low > 1:
        middle = (low + high) // 2
        if value(middle) <= reference:
            low = middle
        else:
            high = middle
    return low


def dataflow_graph(graph: OpGraph) -> nx.DiGraph:
    """Op → op dataflow: an edge ``p → c`` when op ``c`` reads the value op ``p`` produces.

    Every op carries ``bytes``, the size of its output: what crosses a cut between it and a
    consumer. Graph inputs (parameters, model inputs, targets) are not nodes.
    """
    flow = nx.DiGraph()
    for name, node in graph.nodes.items():
        flow.add_node(name, bytes=node.output_bytes)
        flow.add_edges_from((value, name) for value in node.inputs if value in graph.nodes)
    return flow


def cut_bytes_table(flow: nx.DiGraph, unit_of: dict[str, int], num_units: int) -> np.ndarray:
    """``C[i, k]``: bytes of the distinct values produced before unit ``i`` and read by units
    ``i..k``.

    A value produced in unit ``p`` and read in units ``c_1 < … < c_m`` (those after ``p``)
    counts for ``(i, k)`` exactly when ``c_{j−1} < i ≤ c_j ≤ k`` for some ``j`` (``c_0 = p``):
    one rectangle per reader, summed with a 2-D difference array.
    """
    rows, cols, weights = [], [], []
    for producer, size in flow.nodes(data="bytes"):
        previous = unit_of[producer]
        readers = sorted({unit_of[c] for c in flow.successors(producer)} - {previous})
        for reader in readers:
            rows += [previous + 1, reader + 1]
            cols += [reader, reader]
            weights += [size, -size]
            previous = reader
    difference = np.zeros((num_units + 1, num_units), dtype=np.float64)
    np.add.at(difference, (np.asarray(rows, np.int64), np.asarray(cols, np.int64)), weights)
    return difference.cumsum(axis=0).cumsum(axis=1)[:num_units]


def _operator_units(graph: OpGraph, order: list[str]) -> list[tuple[int, int]]:
    """Node ranges the DP runs on: single nodes, or for large graphs runs from a heavy node."""
    if len(order) <= MAX_OPERATORS:
        return [(i, i + 1) for i in range(len(order))]
    starts = [0] + [
        i for i, name in enumerate(order) if i and graph.nodes[name].profile.forward_flops > 0
    ]
    if len(starts) > MAX_OPERATORS:
        starts = [int(chunk[0]) for chunk in np.array_split(np.asarray(starts), MAX_OPERATORS)]
    return list(zip(starts, [*starts[1:], len(order)], strict=True))


def _clustered_layers(
    graph: OpGraph, order: list[str], max_layers: int, num_layers: int | None, eps: float
) -> list[PlanningLayer]:
    units = _operator_units(graph, order)
    unit_of = {order[n]: u for u, (start, stop) in enumerate(units) for n in range(start, stop)}
    profiles = [graph.nodes[name].profile for name in order]
    flops = np.array(
        [sum(p.forward_flops + p.backward_flops for p in profiles[a:b]) for a, b in units],
        dtype=np.float64,
    )
    heavy = np.array([sum(p.forward_flops > 0 for p in profiles[a:b]) for a, b in units])
    cut = cut_bytes_table(dataflow_graph(graph), unit_of, len(units))
    if num_layers is None:
        num_layers = default_num_layers(flops, cut, max_layers, eps=eps, heavy=heavy)
    layers = []
    for index, (first, last) in enumerate(
        cluster_operators(flops, cut, num_layers, eps=eps, heavy=heavy)
    ):
        start, stop = units[first][0], units[last - 1][1]
        nodes = order[start:stop]
        part = LayerPart(tuple(nodes), _ops_kind(nodes))
        name = f"ops {start}" if stop - start == 1 else f"ops {start}-{stop - 1}"
        layers.append(_planning_layer(graph, index, name, (), (part,), nodes))
    return layers


# ------------------------------------------------------------------------------- helpers


def _ops_kind(nodes: list[str]) -> str:
    """Kind of a part that is no module layer: unique to its nodes."""
    return "ops:" + hashlib.sha1("\0".join(nodes).encode()).hexdigest()[:16]


def _planning_layer(
    graph: OpGraph,
    index: int,
    name: str,
    module_layers: tuple[str, ...],
    parts: tuple[LayerPart, ...],
    nodes: list[str],
) -> PlanningLayer:
    ops = [graph.nodes[n] for n in nodes]
    params = dict.fromkeys(p for op in ops for p in op.params)
    return PlanningLayer(
        index=index,
        name=name,
        module_layers=module_layers,
        parts=parts,
        train_flops=sum(op.profile.forward_flops + op.profile.backward_flops for op in ops),
        param_bytes=sum(graph.param_shapes[p].nbytes for p in params),
    )
