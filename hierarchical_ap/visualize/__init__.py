"""Pictures of a parallel plan: the cluster coloured by pipeline rank, the schedule as a Gantt
chart from the simulator's timeline, memory per device against capacity, and the stage table.

    from hierarchical_ap.visualize import cluster_figure, schedule_figure, memory_figure
    plan, simulation = plan_in_context(...)      # or hap plan -o plan.json + hap show plan.json
    schedule_figure(plan, simulation)            # a matplotlib Figure; a notebook displays it

The drawing reads only the plan and a ``Timeline`` (``hierarchical_ap.schedules``);
``hap show`` re-simulates a saved plan to get one.
"""

from hierarchical_ap.visualize.figures import (
    cluster_figure,
    memory_figure,
    plan_figure,
    png_bytes,
    schedule_figure,
    summary_line,
)
from hierarchical_ap.visualize.gantt import idle_intervals
from hierarchical_ap.visualize.report import html_report, stage_table_html
from hierarchical_ap.visualize.table import stage_rows

__all__ = [
    "cluster_figure",
    "html_report",
    "idle_intervals",
    "memory_figure",
    "plan_figure",
    "png_bytes",
    "schedule_figure",
    "stage_rows",
    "stage_table_html",
    "summary_line",
]
