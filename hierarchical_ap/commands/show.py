"""`hap show`: pictures and a readable summary of a saved plan.

Without ``--png`` / ``--html`` it prints the stage table (layers, devices, mesh, time per
micro-batch, memory per device by kind, parameter placements). With them it re-simulates the
plan (capture, the stage ILPs and the schedule, as ``hap simulate plan.json`` does) to get the
schedule's timeline, and writes the pictures of ``hierarchical_ap.visualize``. This module is
where the visualisation meets the simulator: the drawing itself reads only the plan and a
``Timeline``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hierarchical_ap.errors import HapError, PlanError
from hierarchical_ap.plan import ParallelPlan

log = logging.getLogger(__name__)

_STEP_DRIFT = 0.01


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show",
        help="draw a saved plan: cluster grid, pipeline Gantt chart, memory, stage table",
        description=(
            "Print the stage table of a plan written by `hap plan -o plan.json`, or draw it: "
            "the cluster's devices coloured by pipeline rank, the schedule as a Gantt chart "
            "per rank (re-simulated from the plan), memory per device against capacity and "
            "the stage table, as one PNG or a self-contained HTML page."
        ),
    )
    parser.add_argument("plan", help="a plan JSON written by `hap plan -o`")
    parser.add_argument("--png", default=None, help="write all pictures as one PNG here")
    parser.add_argument("--html", default=None, help="write a self-contained HTML report here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = ParallelPlan.load(args.plan)
    plan.validate()
    console = Console()
    if args.png is None and args.html is None:
        render_summary(plan, console)
        return 0
    outputs = [Path(p) for p in (args.png, args.html) if p is not None]
    for path in outputs:
        if not path.parent.is_dir():
            raise HapError(f"cannot write {path}: directory {path.parent} does not exist")
    from hierarchical_ap import visualize
    from hierarchical_ap.commands.plan import _progress

    simulation, note = None, ""
    try:
        with _progress():
            simulation = simulate_saved_plan(plan)
    except HapError as exc:
        note = f"the schedule is not drawn: the plan could not be simulated again ({exc})"
        Console(stderr=True).print(f"[yellow]warning[/yellow]: {note}", highlight=False)
    if args.png is not None:
        figure = visualize.plan_figure(plan, simulation)
        Path(args.png).write_bytes(visualize.png_bytes(figure))
        console.print(f"wrote {args.png}", highlight=False)
    if args.html is not None:
        Path(args.html).write_text(visualize.html_report(plan, simulation, note), encoding="utf-8")
        console.print(f"wrote {args.html}", highlight=False)
    return 0


def simulate_saved_plan(plan: ParallelPlan):
    """The simulator's ``Simulation`` of a saved plan, from its model spec and cluster.

    Raises a ``HapError`` when the model cannot be built from ``plan.model`` (a plan made by
    ``compile_parallel`` for a model object), the plan does not match it, or a stage cannot run."""
    from hierarchical_ap.cluster import Cluster
    from stage_partitioner.model_planning import capture_spec, planning_context
    from stage_partitioner.planner import PlannerOptions
    from stage_partitioner.simulator import candidate_from_plan

    cluster = Cluster.from_dict(plan.cluster)
    graph = capture_spec(plan.model, seq=plan.seq_len, precision=plan.precision)
    plan.check_matches(graph, cluster)
    options = PlannerOptions(global_batch=plan.global_batch)
    context = planning_context(graph, cluster, options, plan.precision)
    simulation = context.simulator.simulate(candidate_from_plan(context, plan))
    if simulation is None:
        raise PlanError("a stage of the plan has no sharding on its mesh; re-run `hap plan`")
    drift = abs(simulation.step_time_s - plan.predicted_step_time_s)
    if drift > _STEP_DRIFT * plan.predicted_step_time_s:
        log.warning(
            "the plan predicted a %.4g s step, simulating it again gives %.4g s (the cost model "
            "changed since it was planned); drawing the new simulation",
            plan.predicted_step_time_s,
            simulation.step_time_s,
        )
    return simulation


def render_summary(plan: ParallelPlan, console: Console) -> None:
    """The plan's stage table, its memory per device by kind, and its predictions."""
    from hierarchical_ap.visualize.figures import summary_line
    from hierarchical_ap.visualize.layout import rank_stages
    from hierarchical_ap.visualize.memory import rank_memory
    from hierarchical_ap.visualize.table import stage_rows
    from hierarchical_ap.visualize.units import format_bytes, format_seconds

    console.print(summary_line(plan), highlight=False)
    stages = Table(title="stages")
    for column in ("stage", "layers", "devices", "mesh", "recompute", "time/µbatch", "placements"):
        stages.add_column(
            column,
            justify="right" if column == "time/µbatch" else "left",
            overflow="fold",  # long layer names wrap instead of losing their middle
        )
    for row in stage_rows(plan):
        stages.add_row(
            str(row.stage),
            row.layers,
            row.devices,
            row.mesh,
            row.recompute,
            format_seconds(row.time_per_microbatch_s),
            row.placement_counts,
        )
    console.print(stages)
    capacity = plan.cluster["device"]["memory_bytes"]
    memory = Table(title=f"memory per device (capacity {format_bytes(capacity)})")
    numbers = ("params", "grads", "optim", "activ", "total", "% cap")
    for column in ("rank", "stages", *numbers):
        memory.add_column(column, justify="right" if column in numbers else "left")
    for rank, breakdown in enumerate(rank_memory(plan)):
        memory.add_row(
            str(rank),
            ", ".join(map(str, rank_stages(plan, rank))),
            *(
                format_bytes(getattr(breakdown, name))
                for name in ("parameters", "gradients", "optimizer", "activations")
            ),
            format_bytes(breakdown.total),
            f"{100 * breakdown.total / capacity:.1f}",
        )
    console.print(memory)
    console.print(
        "placements: Alpa's notation, one letter per logical mesh axis (R replicated, S<d> "
        "sharded on tensor dim d), × the number of parameters stored so; "
        "`hap show --html` lists them per parameter",
        highlight=False,
    )
