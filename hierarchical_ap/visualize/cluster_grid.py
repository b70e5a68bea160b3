"""The cluster as a grid of devices, each cell coloured by the pipeline rank that runs it.

Each host is a block of ``devices_per_host`` cells in a row; the host blocks are laid out in
reading order (left to right, then down), as the devices are numbered (device ``d`` is host
``d // devices_per_host``), with as many blocks per row as make the grid about twice as wide as
high. A rank is a stage when the plan has
one stage per rank; under an interleaved schedule rank ``r`` holds stages ``r, r + p, …`` and
its legend entry lists them.
"""

from __future__ import annotations

import math

from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.patches import Patch

from hierarchical_ap.plan import ParallelPlan
from hierarchical_ap.visualize.layout import device_ranks, rank_stages
from hierarchical_ap.visualize.style import rank_color
from hierarchical_ap.visualize.table import compact_ranges

DEVICES_GID = "devices"
_CELL = 0.9  # cell side; the remaining 0.1 is the gap between devices
_HOST_GAP = 0.6  # extra gap between host columns
_LABELLED_DEVICES = 64  # write the stage numbers into the cells up to this many devices
_LEGEND_ENTRIES = 16


def host_columns(num_hosts: int, devices_per_host: int) -> int:
    """Columns of hosts for a grid about twice as wide as high: the divisor ``c`` of
    ``num_hosts`` nearest to ``sqrt(2 · num_hosts / devices_per_host)``."""
    target = math.sqrt(2 * num_hosts / devices_per_host)
    divisors = [c for c in range(1, num_hosts + 1) if num_hosts % c == 0]
    return min(divisors, key=lambda c: (abs(c - target), c))


def device_origin(device: int, num_hosts: int, devices_per_host: int) -> tuple[float, float]:
    """Lower-left corner of ``device``'s cell (hosts in reading order, rows going down)."""
    columns = host_columns(num_hosts, devices_per_host)
    rows = num_hosts // columns
    host, local = divmod(device, devices_per_host)
    row, column = divmod(host, columns)
    x = column * (devices_per_host + _HOST_GAP) + local
    return x, rows - 1 - row


def draw_cluster_grid(ax: Axes, plan: ParallelPlan) -> PolyCollection:
    """Draw one cell per device of ``plan``'s cluster, coloured by pipeline rank.

    Returns the ``PolyCollection`` (gid ``"devices"``) whose path and face colour ``d`` belong to
    device ``d``."""
    num_hosts = plan.cluster["num_hosts"]
    per_host = plan.cluster["devices_per_host"]
    ranks = device_ranks(plan)
    cells, colors = [], []
    for device, rank in enumerate(ranks):
        x, y = device_origin(device, num_hosts, per_host)
        cells.append([(x, y), (x, y + _CELL), (x + _CELL, y + _CELL), (x + _CELL, y)])
        colors.append(rank_color(rank, plan.num_ranks))
    grid = PolyCollection(cells, facecolors=colors, edgecolors="white", linewidths=0.3)
    grid.set_gid(DEVICES_GID)
    ax.add_collection(grid)
    if len(ranks) <= _LABELLED_DEVICES:
        for device, rank in enumerate(ranks):
            x, y = device_origin(device, num_hosts, per_host)
            ax.text(
                x + _CELL / 2,
                y + _CELL / 2,
                ",".join(map(str, rank_stages(plan, rank))),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    _frame(ax, num_hosts, per_host)
    _legend(ax, plan)
    device = plan.cluster["device"]["name"]
    ax.set_title(f"{num_hosts} × {per_host} {device}: devices by pipeline rank", fontsize=10)
    return grid


def _frame(ax: Axes, num_hosts: int, per_host: int) -> None:
    columns = host_columns(num_hosts, per_host)
    rows = num_hosts // columns
    ax.set_xlim(-0.3, columns * (per_host + _HOST_GAP) - _HOST_GAP + 0.2)
    ax.set_ylim(-0.3, rows + 0.2)
    ax.set_xticks([])
    step = max(1, rows // 8)
    ax.set_yticks([rows - 1 - r + _CELL / 2 for r in range(0, rows, step)])
    ax.set_yticklabels([f"host {r * columns}" for r in range(0, rows, step)], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if columns > 1:
        ax.set_xlabel(f"{columns} hosts per row, in device order", fontsize=8)


def _legend(ax: Axes, plan: ParallelPlan) -> None:
    handles = []
    step = max(1, math.ceil(plan.num_ranks / _LEGEND_ENTRIES))
    for rank in range(0, plan.num_ranks, step):
        stage = plan.stages[rank]
        stages = rank_stages(plan, rank)
        named = f"stage {rank}" if len(stages) == 1 else f"stages {_stage_list(stages)}"
        label = (
            f"rank {rank}: {named}, hosts {compact_ranges(stage.hosts)}, mesh "
            f"{'x'.join(map(str, stage.logical_mesh))}"
        )
        handles.append(Patch(color=rank_color(rank, plan.num_ranks), label=label))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
        title=None if step == 1 else f"every {step}th rank",
    )


def _stage_list(stages: list[int]) -> str:
    if len(stages) <= 3:
        return ", ".join(map(str, stages))
    return f"{stages[0]}, {stages[1]}, … {stages[-1]}"
