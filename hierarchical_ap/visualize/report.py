"""A self-contained HTML report of a plan: the pictures as inline base64 PNG and the stage
table with every parameter placement. It loads nothing from the network (no CDN, no fonts),
so it opens offline."""

from __future__ import annotations

import base64
import html

from matplotlib.figure import Figure

from hierarchical_ap.plan import ParallelPlan
from hierarchical_ap.visualize.figures import (
    TABLE_COLUMNS,
    cluster_figure,
    memory_figure,
    png_bytes,
    schedule_figure,
    summary_line,
)
from hierarchical_ap.visualize.gantt import SimulatedRun
from hierarchical_ap.visualize.table import StageRow, stage_rows
from hierarchical_ap.visualize.units import format_bytes, format_seconds

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.number { text-align: right; }
.note { color: #a05a00; }
details summary { cursor: pointer; }
"""


def html_report(plan: ParallelPlan, run: SimulatedRun | None = None, note: str = "") -> str:
    """The report as one HTML document. Without ``run`` the schedule is left out and ``note``
    (e.g. why the plan could not be simulated again) is shown in its place."""
    sections = [
        f"<h1>{html.escape(plan.model)}</h1>",
        f"<p>{html.escape(summary_line(plan))}</p>",
        "<h2>Cluster</h2>",
        _image(cluster_figure(plan), "devices coloured by pipeline rank"),
        "<h2>Pipeline schedule</h2>",
        _image(schedule_figure(plan, run), "Gantt chart of the pipeline schedule")
        if run is not None
        else f'<p class="note">{html.escape(note or "no simulation given")}</p>',
        "<h2>Memory per device</h2>",
        _image(memory_figure(plan), "predicted memory per device"),
        "<h2>Stages</h2>",
        stage_table_html(plan),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(plan.model)}: parallel plan</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def stage_table_html(plan: ParallelPlan) -> str:
    """The stage table as an HTML ``<table>``; each stage's placements open in a
    ``<details>`` list of parameter patterns."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "\n".join(_row_html(row) for row in stage_rows(plan))
    return f'<table class="stages">\n<tr>{head}</tr>\n{body}\n</table>'


def _row_html(row: StageRow) -> str:
    memory = row.memory
    breakdown = ", ".join(
        f"{name} {format_bytes(getattr(memory, name))}"
        for name in ("parameters", "gradients", "optimizer", "activations")
    )
    items = "".join(
        f"<li><code>{html.escape(g.pattern)}</code> {html.escape(g.placement)}"
        + (f" ×{g.count}" if g.count > 1 else "")
        + "</li>"
        for g in row.placements
    )
    placements = (
        f"<details><summary>{html.escape(row.placement_counts)}</summary><ul>{items}</ul></details>"
        if items
        else "—"
    )
    cells = [
        (str(row.stage), "number"),
        (str(row.rank), "number"),
        (html.escape(row.layers), ""),
        (html.escape(row.devices), ""),
        (f"{row.mesh} on submesh {row.submesh}", ""),
        (row.recompute, ""),
        (format_seconds(row.time_per_microbatch_s), "number"),
        (f'<span title="{html.escape(breakdown)}">{format_bytes(memory.total)}</span>', "number"),
        (placements, ""),
    ]
    return (
        "<tr>"
        + "".join(
            f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>" for text, cls in cells
        )
        + "</tr>"
    )


def _image(figure: Figure, alt: str) -> str:
    data = base64.b64encode(png_bytes(figure)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
