"""Dimension tracking through view-like ops (``intra_op.view_dims``)."""

from __future__ import annotations

import pytest
import torch

from intra_op.placement import PARTIAL, REPLICATE, Shard
from intra_op.view_dims import (
    broadcast_dim_map,
    drop_dim_map,
    follow,
    insert_dim_map,
    keep_except_dim_map,
    operand_placements,
    permute_dim_map,
    propagate,
    reduce_dim_map,
    reshape_dim_map,
    transpose_dim_map,
)

B, S, A, D = 4, 8, 4, 16
H = A * D


def test_reshape_splits_fused_qkv_dim_into_three_then_heads() -> None:
    dim_map = reshape_dim_map((B, S, 3 * H), (B, S, 3, A, D))
    assert dim_map == (0, 1, 2)
    # A column-parallel (fused qkv) output lands on the "3" dim: only an axis of 3 divides it.
    assert propagate((REPLICATE, Shard(2)), dim_map, (B, S, 3 * H), (B, S, 3, A, D), (1, 3)) == (
        REPLICATE,
        Shard(2),
    )
    assert propagate((REPLICATE, Shard(2)), dim_map, (B, S, 3 * H), (B, S, 3, A, D), (1, 4)) == (
        REPLICATE,
        None,
    )
    assert propagate((REPLICATE, Shard(0)), dim_map, (B, S, 3 * H), (B, S, 3, A, D), (1, 4)) == (
        REPLICATE,
        Shard(0),
    )


def test_qkv_view_permute_unbind_puts_batch_and_heads_where_attention_wants_them() -> None:
    mesh = (2, 2)
    view_out = (B, S, 3, A, D)
    perm = (2, 0, 3, 1, 4)
    permuted = tuple(view_out[p] for p in perm)  # (3, B, A, S, D)
    assert permute_dim_map(perm) == (1, 3, 0, 2, 4)
    # Batch on axis 0, heads on axis 1 (as the view of a head-sharded qkv would give).
    placements = (Shard(0), Shard(3))
    after_permute = propagate(placements, permute_dim_map(perm), view_out, permuted, mesh)
    assert after_permute == (Shard(1), Shard(2))
    q_shape = permuted[1:]
    after_unbind = propagate(after_permute, drop_dim_map(5, 0), permuted, q_shape, mesh)
    assert after_unbind == (Shard(0), Shard(1))


def test_reverse_reshape_merges_heads_into_hidden() -> None:
    dim_map = reshape_dim_map((B, S, A, D), (B, S, H))
    assert dim_map == (0, 1, 2, None)
    mesh = (1, 4)
    assert propagate((REPLICATE, Shard(2)), dim_map, (B, S, A, D), (B, S, H), mesh) == (
        REPLICATE,
        Shard(2),
    )
    # A shard on the head_dim is strided in the merged hidden dim: it cannot pass.
    assert propagate((REPLICATE, Shard(3)), dim_map, (B, S, A, D), (B, S, H), mesh) == (
        REPLICATE,
        None,
    )


def test_flatten_and_unflatten() -> None:
    assert reshape_dim_map((B, S, H), (B * S, H)) == (0, None, 1)
    unflatten = reshape_dim_map((B * S, H), (B, S, H))
    assert unflatten == (0, 2)
    assert propagate((Shard(0), REPLICATE), unflatten, (B * S, H), (B, S, H), (4, 1)) == (
        Shard(0),
        REPLICATE,
    )
    # Unflatten (16, H) -> (2, 8, H): the leading output dim 2 does not divide by 4.
    assert propagate((Shard(0), REPLICATE), unflatten, (2 * 8, H), (2, 8, H), (4, 1)) == (
        None,
        REPLICATE,
    )


def test_unit_dims_are_ignored_by_reshape() -> None:
    assert reshape_dim_map((1, 64, 32), (64, 32)) == (None, 0, 1)
    assert reshape_dim_map((64,), (1, 64)) == (1,)
    assert reshape_dim_map((2, 1, 8), (2, 8, 1)) == (0, None, 1)


def test_group_mixing_split_and_merge_maps_only_its_first_dim() -> None:
    dim_map = reshape_dim_map((4, 6), (8, 3))
    assert dim_map == (0, None)
    assert propagate((Shard(0), Shard(0)), dim_map, (4, 6), (8, 3), (2, 2)) == (
        Shard(0),
        Shard(0),
    )
    # (4, 6) -> (2, 12): axis 0 still divides the leading dim 2, axis 1 no longer does.
    dim_map = reshape_dim_map((4, 6), (2, 12))
    assert propagate((Shard(0), Shard(0)), dim_map, (4, 6), (2, 12), (2, 2)) == (Shard(0), None)


def test_reshape_rule_matches_real_tensors() -> None:
    """A contiguous chunk of the input along the mapped dim is the same chunk of the output."""
    x = torch.arange(4 * 6).reshape(4, 6)
    y = x.reshape(8, 3)
    for x_chunk, y_chunk in zip(x.chunk(2, 0), y.chunk(2, 0), strict=True):
        assert torch.equal(x_chunk.reshape(-1, 3), y_chunk)
    # The non-leading dim of a merge is strided in the output: its chunk is not an output chunk.
    z = x.reshape(24)
    assert not torch.equal(x.chunk(2, 1)[0].reshape(-1), z.chunk(2, 0)[0])


def test_incompatible_reshape_maps_nothing() -> None:
    assert reshape_dim_map((4, 6), (5, 5)) == (None, None)


def test_transpose_permute_and_broadcast() -> None:
    assert transpose_dim_map(4, 1, 2) == (0, 2, 1, 3)
    assert transpose_dim_map(2, 0, -1) == (1, 0)
    assert broadcast_dim_map((S, D), (B, A, S, D)) == (2, 3)
    assert broadcast_dim_map((1, S), (B, S)) == (None, 1)


def test_dim_removing_and_inserting_maps() -> None:
    assert drop_dim_map(5, 0) == (None, 0, 1, 2, 3)
    assert drop_dim_map(3, -1) == (0, 1, None)
    assert keep_except_dim_map(3, [-1]) == (0, 1, None)
    assert insert_dim_map(2, 1) == (0, 2)
    assert insert_dim_map(2, -1) == (0, 1)
    assert reduce_dim_map(3, [-1], keepdim=False) == (0, 1, None)
    assert reduce_dim_map(3, [0, 2], keepdim=True) == (None, 1, None)
    assert reduce_dim_map(3, [1], keepdim=False) == (0, None, 1)


@pytest.mark.parametrize(("passes", "expected"), [(True, PARTIAL), (False, None)])
def test_partial_passes_only_linear_ops(passes: bool, expected: object) -> None:
    dim_map = (0, 1)
    out = propagate((PARTIAL, REPLICATE), dim_map, (4, 4), (4, 4), (2, 2), partial_passes=passes)
    assert out == (expected, REPLICATE)


def test_follow_replaces_blocked_axes_with_replicate() -> None:
    dim_map = keep_except_dim_map(3, [2])  # e.g. a split along the last dim
    accepted, output = follow((Shard(0), Shard(2)), dim_map, (B, S, H), (B, S, H), (2, 2))
    assert accepted == (Shard(0), REPLICATE)
    assert output == (Shard(0), REPLICATE)
    accepted, output = follow((PARTIAL, Shard(1)), dim_map, (B, S, H), (B, S, H), (2, 2))
    assert accepted == (PARTIAL, Shard(1))
    assert output == (PARTIAL, Shard(1))


def test_operand_placements_broadcast_the_output() -> None:
    out = (B, A, S, D)
    assert operand_placements((Shard(2), Shard(0)), (S, D), out) == (Shard(0), REPLICATE)
    assert operand_placements((Shard(1), PARTIAL), (B, 1, S, D), out) == (REPLICATE, PARTIAL)
