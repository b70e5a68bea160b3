"""The pipeline schedule as a Gantt chart: one row per pipeline rank, a bar per task.

The bars are the simulator's ``Timeline`` (``hierarchical_ap.schedules``) as it is: task
``(kind, micro-batch, stage)`` of rank ``r`` is a bar over ``[start, end)`` in row ``r``,
forward in blue and backward in orange, darker for later chunks of an interleaved rank
(chunk ``stage // num_ranks``). All devices of a rank run the same tasks, so a row stands for
each of them. After its last backward a rank synchronises its gradients and steps its
optimizer for ``gradient_sync_s[r]`` seconds (purple; ``rank_gradient_sync`` sums both), so
the step ends at

    T = max_r (end of rank r's last task + gradient_sync_s[r])

and the *bubbles* (grey, hatched) are the intervals of ``[0, T)`` in which a rank neither
computes nor synchronises nor updates. Their share of the device time is
``Σ_r idle_r / (num_ranks · T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from hierarchical_ap.schedules import BACKWARD, FORWARD, TimedTask, Timeline
from hierarchical_ap.visualize.style import (
    BACKWARD_COLOR,
    BUBBLE_COLOR,
    FORWARD_COLOR,
    SYNC_COLOR,
    shade,
)
from hierarchical_ap.visualize.units import time_unit

BUBBLE_GID = "bubbles"
SYNC_GID = "gradient-sync"
_BAR_HEIGHT = 0.8
_LABELLED_TASKS = 160  # write the micro-batch into the bars up to this many tasks
_OUTLINED_BARS = 800  # outline bars up to this many per kind; more would turn the chart white

Interval = tuple[float, float]


class _StageTimes(Protocol):
    @property
    def closing_s(self) -> float: ...


class SimulatedRun(Protocol):
    """What the chart needs of a simulation; ``stage_partitioner.simulator.Simulation`` has it."""

    timeline: Timeline
    stages: Sequence[_StageTimes]


def rank_gradient_sync(run: SimulatedRun, num_ranks: int) -> list[float]:
    """Per rank, the gradient synchronisation and optimizer step of its stages
    (``i % num_ranks == r``): the work that closes its step."""
    return [sum(s.closing_s for s in run.stages[r::num_ranks]) for r in range(num_ranks)]


def rank_closings(
    timeline: Timeline, num_ranks: int, gradient_sync_s: Sequence[float]
) -> list[Interval]:
    """Per rank, the interval of its gradient synchronisation: from the end of its last task
    for ``gradient_sync_s[rank]`` seconds."""
    ends = [0.0] * num_ranks
    for timed in timeline.tasks:
        ends[timed.rank] = max(ends[timed.rank], timed.end)
    return [(end, end + sync) for end, sync in zip(ends, gradient_sync_s, strict=True)]


def idle_intervals(
    timeline: Timeline, num_ranks: int, gradient_sync_s: Sequence[float] | None = None
) -> list[list[Interval]]:
    """Per rank, the maximal intervals of ``[0, T)`` in which it runs no task and no gradient
    synchronisation, ``T`` the step end (module docstring); zero-length gaps are left out."""
    sync = list(gradient_sync_s) if gradient_sync_s is not None else [0.0] * num_ranks
    closings = rank_closings(timeline, num_ranks, sync)
    step_end = max((end for _, end in closings), default=0.0)
    busy: list[list[Interval]] = [[] for _ in range(num_ranks)]
    for timed in timeline.tasks:
        busy[timed.rank].append((timed.start, timed.end))
    for rank, closing in enumerate(closings):
        busy[rank].append(closing)
    idle: list[list[Interval]] = []
    for intervals in busy:
        gaps, clock = [], 0.0
        for start, end in sorted(intervals):
            if start > clock:
                gaps.append((clock, start))
            clock = max(clock, end)
        if step_end > clock:
            gaps.append((clock, step_end))
        idle.append(gaps)
    return idle


def draw_gantt(
    ax: Axes,
    timeline: Timeline,
    num_ranks: int,
    *,
    gradient_sync_s: Sequence[float] | None = None,
    rank_labels: Sequence[str] | None = None,
) -> dict[str, PolyCollection]:
    """Draw ``timeline`` on ``ax``; rank 0 is the top row.

    Returns the collections by gid: ``"forward"`` and ``"backward"`` (one path per timed task,
    in timeline order), ``"gradient-sync"`` (one per rank) and ``"bubbles"`` (one per idle
    interval, rank by rank)."""
    sync = list(gradient_sync_s) if gradient_sync_s is not None else [0.0] * num_ranks
    drawn = {
        kind: _task_bars(ax, [t for t in timeline.tasks if t.task.kind == kind], num_ranks, kind)
        for kind in (FORWARD, BACKWARD)
    }
    closings = rank_closings(timeline, num_ranks, sync)
    drawn[SYNC_GID] = _bars(
        ax,
        [(rank, start, end) for rank, (start, end) in enumerate(closings)],
        num_ranks,
        facecolors=[SYNC_COLOR] * num_ranks,
        gid=SYNC_GID,
    )
    idle = idle_intervals(timeline, num_ranks, sync)
    gaps = [(rank, a, b) for rank, intervals in enumerate(idle) for a, b in intervals]
    drawn[BUBBLE_GID] = _bars(
        ax, gaps, num_ranks, facecolors=[BUBBLE_COLOR] * len(gaps), gid=BUBBLE_GID, hatch="////"
    )
    if len(timeline.tasks) <= _LABELLED_TASKS:
        for timed in timeline.tasks:
            ax.text(
                (timed.start + timed.end) / 2,
                _row(timed.rank, num_ranks) + _BAR_HEIGHT / 2,
                str(timed.task.microbatch),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
                clip_on=True,
            )
    step_end = max((end for _, end in closings), default=0.0)
    _axes(ax, num_ranks, step_end, rank_labels)
    idle_share = sum(b - a for _, a, b in gaps) / (num_ranks * step_end) if step_end > 0 else 0.0
    ax.set_title(
        f"pipeline schedule: step {step_end / time_unit(step_end)[1]:.3g} "
        f"{time_unit(step_end)[0]}, bubbles {100 * idle_share:.1f} % of device time",
        fontsize=10,
    )
    return drawn


def _task_bars(ax: Axes, tasks: Sequence[TimedTask], num_ranks: int, kind: str) -> PolyCollection:
    base = FORWARD_COLOR if kind == FORWARD else BACKWARD_COLOR
    chunks = 1 + max((t.task.stage // num_ranks for t in tasks), default=0)
    colors = [shade(base, 0.45 * (t.task.stage // num_ranks) / max(chunks - 1, 1)) for t in tasks]
    return _bars(ax, [(t.rank, t.start, t.end) for t in tasks], num_ranks, colors, kind)


def _bars(
    ax: Axes,
    spans: Sequence[tuple[int, float, float]],
    num_ranks: int,
    facecolors: Sequence,
    gid: str,
    hatch: str | None = None,
) -> PolyCollection:
    """One rectangle per ``(rank, start, end)`` in the rank's row."""
    boxes = []
    for rank, start, end in spans:
        y = _row(rank, num_ranks)
        boxes.append([(start, y), (start, y + _BAR_HEIGHT), (end, y + _BAR_HEIGHT), (end, y)])
    bars = PolyCollection(
        boxes,
        facecolors=list(facecolors),
        edgecolors="white" if hatch is None else "#9a9a9a",
        linewidths=0.3 if len(spans) <= _OUTLINED_BARS else 0.0,
        hatch=hatch,
    )
    bars.set_gid(gid)
    ax.add_collection(bars)
    return bars


def _row(rank: int, num_ranks: int) -> float:
    """Bottom of rank ``rank``'s bars: rank 0 on top."""
    return num_ranks - 1 - rank + (1 - _BAR_HEIGHT) / 2


def _axes(ax: Axes, num_ranks: int, step_end: float, rank_labels: Sequence[str] | None) -> None:
    name, size = time_unit(step_end)
    ax.set_xlim(0, step_end * 1.002 if step_end > 0 else 1.0)
    ax.set_ylim(0, num_ranks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / size:g}"))
    ax.set_xlabel(f"time ({name})", fontsize=8)
    labels = rank_labels or [f"rank {r}" for r in range(num_ranks)]
    ax.set_yticks([num_ranks - 1 - r + 0.5 for r in range(num_ranks)])
    ax.set_yticklabels(labels, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(
        handles=[
            Patch(color=FORWARD_COLOR, label="forward"),
            Patch(color=BACKWARD_COLOR, label="backward"),
            Patch(color=SYNC_COLOR, label="gradient sync + optimizer step"),
            Patch(facecolor=BUBBLE_COLOR, hatch="////", edgecolor="#9a9a9a", label="bubble"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
    )
