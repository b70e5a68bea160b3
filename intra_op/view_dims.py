"""Dimension tracking: where a tensor dim sharded before a view-like op lands after it.

A ``DimMap`` has one entry per *input* dim: the output dim that carries the input dim's
sharding, or ``None`` when a shard on that input dim cannot pass through the op (the dim is
merged as a non-leading member of a reshape group, split, sliced, selected away…).

Reshape (``view``, ``reshape``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``) groups
the non-unit input and output dims into minimal runs of equal products. In a group
``(i_0, …, i_p) → (o_0, …, o_q)`` the flattened group is contiguous, so device ``r`` of ``f``
holding the ``r``-th contiguous chunk of ``i_0`` holds exactly the ``r``-th contiguous chunk of
``o_0`` iff ``size(o_0)`` is divisible by ``f``; a shard on ``i_1…i_p`` is strided in the flat
group and cannot be expressed as a ``Shard`` of the output. ``i_0 → o_0`` is the only mapping.

``propagate`` applies a map to a placement per mesh axis (``None`` where it cannot pass,
including when the output dim does not divide by the shard factor); ``follow`` turns that into
the closest valid pair (input placement the op accepts, output placement), replacing the axes
that cannot pass by ``Replicate`` on both sides, so the ILP pays the reshard on the input edge.
"""

from __future__ import annotations

from collections.abc import Sequence

from intra_op.placement import REPLICATE, Partial, Placement, Placements, Shard

DimMap = tuple[int | None, ...]


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def identity_dim_map(ndim: int) -> DimMap:
    """Every dim maps to itself (``alias``, ``clone``, elementwise ops on equal shapes)."""
    return tuple(range(ndim))


def reshape_dim_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> DimMap:
    """Reshape from ``in_shape`` to ``out_shape`` (see the module docstring); unit dims carry
    no sharding and map to ``None``."""
    dim_map: list[int | None] = [None] * len(in_shape)
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    if 0 in in_shape or 0 in out_shape:
        return tuple(dim_map)
    i = j = 0
    while i < len(ins) and j < len(outs):
        first_in, first_out = ins[i], outs[j]
        in_prod, out_prod = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while in_prod != out_prod:
            if in_prod < out_prod:
                if i == len(ins):
                    return tuple([None] * len(in_shape))
                in_prod *= in_shape[ins[i]]
                i += 1
            else:
                if j == len(outs):
                    return tuple([None] * len(in_shape))
                out_prod *= out_shape[outs[j]]
                j += 1
        dim_map[first_in] = first_out
    return tuple(dim_map)


def permute_dim_map(perm: Sequence[int]) -> DimMap:
    """``permute(x, perm)``: output dim ``i`` is input dim ``perm[i]``."""
    ndim = len(perm)
    dim_map: list[int | None] = [None] * ndim
    for out_dim, in_dim in enumerate(perm):
        dim_map[_norm(in_dim, ndim)] = out_dim
    return tuple(dim_map)


def transpose_dim_map(ndim: int, dim0: int, dim1: int) -> DimMap:
    """``transpose(x, dim0, dim1)`` (and ``t`` with dims 0, 1)."""
    perm = list(range(ndim))
    a, b = _norm(dim0, ndim), _norm(dim1, ndim)
    perm[a], perm[b] = perm[b], perm[a]
    return permute_dim_map(perm)


def broadcast_dim_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> DimMap:
    """Broadcasting / ``expand``: dims align from the right; a dim of equal size maps to its
    output dim, a broadcast (unit) dim maps to ``None``."""
    offset = len(out_shape) - len(in_shape)
    return tuple(
        d + offset if 0 <= d + offset < len(out_shape) and s == out_shape[d + offset] else None
        for d, s in enumerate(in_shape)
    )


def drop_dim_map(ndim: int, dim: int) -> DimMap:
    """``select(x, dim, i)`` / ``unbind(x, dim)``: ``dim`` disappears, later dims shift down."""
    dim = _norm(dim, ndim)
    return tuple(None if d == dim else (d if d < dim else d - 1) for d in range(ndim))


def keep_except_dim_map(ndim: int, dims: Sequence[int]) -> DimMap:
    """Ops that keep the shape but must see whole ``dims`` (``split``, ``chunk``, ``slice``,
    ``cat`` along them, ``softmax`` / ``cumsum`` over them, normalised dims)."""
    blocked = {_norm(d, ndim) for d in dims}
    return tuple(None if d in blocked else d for d in range(ndim))


def insert_dim_map(ndim: int, dim: int) -> DimMap:
    """``stack(xs, dim)``: a new output dim at ``dim``; input dims from ``dim`` on shift up."""
    dim = _norm(dim, ndim + 1)
    return tuple(d if d < dim else d + 1 for d in range(ndim))


def reduce_dim_map(ndim: int, dims: Sequence[int], keepdim: bool) -> DimMap:
    """Reductions over ``dims``: reduced dims map to ``None`` (their sharding turns the output
    ``Partial``, which the reduction rule decides); kept dims shift down unless ``keepdim``."""
    reduced = {_norm(d, ndim) for d in dims}
    dim_map: list[int | None] = []
    removed = 0
    for d in range(ndim):
        if d in reduced:
            dim_map.append(None)
            removed += 1
        else:
            dim_map.append(d if keepdim else d - removed)
    return tuple(dim_map)


def propagate(
    placements: Placements,
    dim_map: DimMap,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    mesh_shape: Sequence[int],
    *,
    partial_passes: bool = True,
) -> tuple[Placement | None, ...]:
    """Output placement per mesh axis for an input with ``placements``; ``None`` on an axis
    whose input placement cannot pass the op.

    ``Shard(d)`` passes as ``Shard(dim_map[d])`` while both dims stay divisible by the product
    of the mesh axes (taken in axis order) that keep sharding them; ``Partial`` passes iff
    ``partial_passes`` (the op is linear); ``Replicate`` always passes.
    """
    out_factor: dict[int, int] = {}
    in_factor: dict[int, int] = {}
    result: list[Placement | None] = []
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            d = _norm(p.dim, len(in_shape))
            o = dim_map[d] if d < len(dim_map) else None
            size = mesh_shape[axis]
            if (
                o is None
                or in_shape[d] % (in_factor.get(d, 1) * size)
                or out_shape[o] % (out_factor.get(o, 1) * size)
            ):
                result.append(None)
                continue
            in_factor[d] = in_factor.get(d, 1) * size
            out_factor[o] = out_factor.get(o, 1) * size
            result.append(Shard(o))
        elif isinstance(p, Partial):
            result.append(p if partial_passes else None)
        else:
            result.append(REPLICATE)
    return tuple(result)


def follow(
    placements: Placements,
    dim_map: DimMap,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    mesh_shape: Sequence[int],
    *,
    partial_passes: bool = True,
) -> tuple[Placements, Placements]:
    """``(input placement, output placement)`` closest to ``placements``: axes that cannot
    pass (see ``propagate``) become ``Replicate`` on the input and the output."""
    out = propagate(
        placements, dim_map, in_shape, out_shape, mesh_shape, partial_passes=partial_passes
    )
    accepted = tuple(
        p if o is not None else REPLICATE for p, o in zip(placements, out, strict=True)
    )
    return accepted, tuple(o if o is not None else REPLICATE for o in out)


def operand_placements(
    output: Placements, operand_shape: Sequence[int], out_shape: Sequence[int]
) -> Placements:
    """Placement of a broadcast operand matching an elementwise op's ``output`` placement:
    ``Shard(d)`` lands on the operand dim aligned (from the right) with output dim ``d`` when
    it has the same size, else ``Replicate``; ``Partial`` is left to the caller (returned as
    is)."""
    offset = len(out_shape) - len(operand_shape)
    result: list[Placement] = []
    for p in output:
        if isinstance(p, Shard):
            d = p.dim - offset
            ok = 0 <= d < len(operand_shape) and operand_shape[d] == out_shape[p.dim]
            result.append(Shard(d) if ok else REPLICATE)
        else:
            result.append(p)
    return tuple(result)
