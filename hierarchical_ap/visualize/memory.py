"""Predicted memory per device as stacked bars against the device's capacity.

One bar per pipeline rank (for one stage per rank, per stage): parameters, gradients,
optimizer states and activations of the plan's ``PlanStage.memory``, the simulator's peak per
device. Under an interleaved schedule the stages of a rank share its devices and the simulator
records the rank's peak for each of them, so the bar of rank ``r`` is the memory of stage
``r`` (and of ``r + p``, ``r + 2p``, …). The dashed line is the device capacity; when it is
more than ``4 ×`` the largest bar it is named in the title instead, so that small bars stay
visible.
"""

from __future__ import annotations

from dataclasses import fields

from matplotlib.axes import Axes
from matplotlib.container import BarContainer

from hierarchical_ap.plan import MemoryBreakdown, ParallelPlan
from hierarchical_ap.visualize.style import MEMORY_COLORS
from hierarchical_ap.visualize.units import byte_unit, format_bytes

CAPACITY_GID = "capacity"
COMPONENTS = tuple(f.name for f in fields(MemoryBreakdown))
_CAPACITY_IN_VIEW = 4.0


def rank_memory(plan: ParallelPlan) -> list[MemoryBreakdown]:
    """The predicted memory per device of each pipeline rank (that of its first stage)."""
    return [stage.memory for stage in plan.stages[: plan.num_ranks]]


def memory_unit(plan: ParallelPlan) -> tuple[str, float]:
    """The unit the bars are drawn in: that of the largest bar."""
    return byte_unit(max(m.total for m in rank_memory(plan)))


def draw_memory(ax: Axes, plan: ParallelPlan) -> dict[str, BarContainer]:
    """Stacked bars of ``plan``'s memory per rank, in ``memory_unit(plan)``; returns the bar
    containers by component (``parameters``, ``gradients``, ``optimizer``, ``activations``)."""
    memory = rank_memory(plan)
    name, size = memory_unit(plan)
    positions = list(range(len(memory)))
    bottoms = [0.0] * len(memory)
    bars: dict[str, BarContainer] = {}
    for component in COMPONENTS:
        heights = [getattr(m, component) / size for m in memory]
        bars[component] = ax.bar(
            positions,
            heights,
            bottom=bottoms,
            color=MEMORY_COLORS[component],
            label=component,
            width=0.8,
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    capacity = plan.cluster["device"]["memory_bytes"]
    title = "predicted memory per device"
    if capacity <= _CAPACITY_IN_VIEW * max(bottoms) * size:
        line = ax.axhline(capacity / size, color="black", linestyle="--", linewidth=1)
        line.set_gid(CAPACITY_GID)
        line.set_label(f"device capacity {format_bytes(capacity)}")
    else:
        title += f" (device capacity {format_bytes(capacity)}, off the scale)"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(name, fontsize=8)
    ax.set_xlabel("pipeline rank", fontsize=8)
    step = max(1, len(memory) // 16)
    ax.set_xticks(positions[::step])
    ax.tick_params(labelsize=7)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return bars
