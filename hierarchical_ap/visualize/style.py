"""Colours shared by the pictures: one per pipeline rank, one per kind of task or memory."""

from __future__ import annotations

from matplotlib import colormaps
from matplotlib.colors import to_rgba

RGBA = tuple[float, float, float, float]

FORWARD_COLOR = "#4c9be8"
BACKWARD_COLOR = "#f28e2b"
SYNC_COLOR = "#9467bd"
BUBBLE_COLOR = "#d9d9d9"
MEMORY_COLORS = {
    "parameters": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer": "#55a868",
    "activations": "#c44e52",
}


def rank_color(rank: int, num_ranks: int) -> RGBA:
    """The colour of pipeline rank ``rank``: ``tab10``/``tab20`` when they suffice, else evenly
    spaced samples of ``turbo`` (distinct for any number of ranks)."""
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank {rank} is not in 0..{num_ranks - 1}")
    if num_ranks <= 10:
        return to_rgba(colormaps["tab10"](rank))
    if num_ranks <= 20:  # dark tones first, so that neighbouring ranks differ in hue
        return to_rgba(colormaps["tab20"](2 * rank if rank < 10 else 2 * (rank - 10) + 1))
    return to_rgba(colormaps["turbo"](0.05 + 0.9 * rank / (num_ranks - 1)))


def shade(color: str | RGBA, factor: float) -> RGBA:
    """``color`` darkened towards black by ``factor`` in [0, 1)."""
    r, g, b, a = to_rgba(color)
    return (r * (1 - factor), g * (1 - factor), b * (1 - factor), a)
