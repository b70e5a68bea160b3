"""Whole figures of a plan: the cluster grid, the schedule, the memory and the stage table.

Figures are made with ``matplotlib.figure.Figure`` (no pyplot, so no global state and no
interactive backend): a notebook displays one returned as a cell's value, and ``png_bytes``
renders one with the Agg canvas.
"""

from __future__ import annotations

import io

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hierarchical_ap.plan import ParallelPlan
from hierarchical_ap.visualize.cluster_grid import draw_cluster_grid, host_columns
from hierarchical_ap.visualize.gantt import SimulatedRun, draw_gantt, rank_gradient_sync
from hierarchical_ap.visualize.memory import draw_memory
from hierarchical_ap.visualize.table import compact_ranges, stage_rows
from hierarchical_ap.visualize.units import format_bytes, format_seconds

TABLE_COLUMNS = (
    "stage",
    "rank",
    "layers",
    "devices",
    "mesh",
    "recompute",
    "time / µbatch",
    "memory",
    "placements",
)
PNG_TABLE_ROWS = 32
"""Stages the PNG's table lists; the HTML report and the terminal list them all."""


def cluster_figure(plan: ParallelPlan) -> Figure:
    figure = Figure(figsize=(11, _grid_height(plan)), layout="constrained")
    draw_cluster_grid(figure.add_subplot(), plan)
    return figure


def schedule_figure(plan: ParallelPlan, run: SimulatedRun) -> Figure:
    figure = Figure(figsize=(14, _gantt_height(plan)), layout="constrained")
    draw_gantt(
        figure.add_subplot(),
        run.timeline,
        plan.num_ranks,
        gradient_sync_s=rank_gradient_sync(run, plan.num_ranks),
        rank_labels=rank_labels(plan),
    )
    return figure


def memory_figure(plan: ParallelPlan) -> Figure:
    figure = Figure(figsize=(11, 4), layout="constrained")
    draw_memory(figure.add_subplot(), plan)
    return figure


def plan_figure(plan: ParallelPlan, run: SimulatedRun | None = None) -> Figure:
    """All pictures in one figure: cluster and memory side by side, the schedule under them
    (when ``run`` is given) and the stage table at the bottom."""
    rows = min(len(plan.stages), PNG_TABLE_ROWS) + 2
    heights = [max(_grid_height(plan), 4.0)]
    if run is not None:
        heights.append(_gantt_height(plan))
    heights.append(0.22 * rows)
    figure = Figure(figsize=(16, sum(heights) + 1), layout="constrained")
    figure.suptitle(summary_line(plan), fontsize=11)
    grid = figure.add_gridspec(len(heights), 2, height_ratios=heights)
    draw_cluster_grid(figure.add_subplot(grid[0, 0]), plan)
    draw_memory(figure.add_subplot(grid[0, 1]), plan)
    if run is not None:
        draw_gantt(
            figure.add_subplot(grid[1, :]),
            run.timeline,
            plan.num_ranks,
            gradient_sync_s=rank_gradient_sync(run, plan.num_ranks),
            rank_labels=rank_labels(plan),
        )
    draw_stage_table(figure.add_subplot(grid[-1, :]), plan)
    return figure


def draw_stage_table(ax: Axes, plan: ParallelPlan) -> None:
    """The first ``PNG_TABLE_ROWS`` rows of the stage table as a matplotlib table."""
    rows = stage_rows(plan)
    cells = [
        [
            str(row.stage),
            str(row.rank),
            row.layers,
            row.devices,
            f"{row.mesh} on {row.submesh}",
            row.recompute,
            format_seconds(row.time_per_microbatch_s),
            format_bytes(row.memory.total),
            row.placement_counts,
        ]
        for row in rows[:PNG_TABLE_ROWS]
    ]
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=TABLE_COLUMNS, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(TABLE_COLUMNS))))
    if len(rows) > PNG_TABLE_ROWS:
        ax.set_title(
            f"stages (first {PNG_TABLE_ROWS} of {len(rows)}; `hap show --html` lists all)",
            fontsize=10,
        )
    else:
        ax.set_title("stages", fontsize=10)


def summary_line(plan: ParallelPlan) -> str:
    """E.g. ``gpt3-175b: 96 stages on 12 ranks, interleaved (v=8), 96 × 16 sequences …``."""
    schedule = plan.schedule + (f" (v={plan.virtual_stages})" if plan.virtual_stages > 1 else "")
    return (
        f"{plan.model}: {len(plan.stages)} stage(s) on {plan.num_ranks} rank(s), {schedule}, "
        f"{plan.num_microbatches} micro-batches of {plan.micro_batch_size}, {plan.precision}; "
        f"predicted step {format_seconds(plan.predicted_step_time_s)}, "
        f"{plan.predicted_tflops_per_device:.1f} TFLOP/s per device, peak "
        f"{format_bytes(plan.predicted_peak_memory_bytes_per_device)} per device"
    )


def rank_labels(plan: ParallelPlan) -> list[str]:
    """``rank r (devices a-b)`` per pipeline rank."""
    return [
        f"rank {r} (dev {compact_ranges(stage.devices)})"
        for r, stage in enumerate(plan.stages[: plan.num_ranks])
    ]


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    """``figure`` rendered as PNG by the Agg canvas."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _grid_height(plan: ParallelPlan) -> float:
    hosts, per_host = plan.cluster["num_hosts"], plan.cluster["devices_per_host"]
    columns = host_columns(hosts, per_host)
    width = columns * (per_host + 0.6)
    return min(max(6.5 * (hosts // columns) / width + 1.2, 2.0), 8.0)


def _gantt_height(plan: ParallelPlan) -> float:
    return min(max(1.2 + 0.35 * plan.num_ranks, 2.5), 10.0)
