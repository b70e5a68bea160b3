"""`hap plan`: search a parallel plan for a model on a cluster and print or save it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hierarchical_ap.plan import ParallelPlan, index_span


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="search pipeline stages, submeshes and intra-op shardings for a model",
        description=(
            "Capture MODEL, solve the intra-operator ILP for every layer kind on every "
            "candidate mesh, run Alpa's stage DP and the uniform (Megatron-style) slicings, "
            "simulate the best candidates and print the fastest plan that fits memory."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--pp", type=int, default=None, help="fix the number of pipeline stages")
    parser.add_argument(
        "--microbatch-sizes",
        default=None,
        help="comma-separated global micro-batch sizes to try (default: chosen from the batch)",
    )
    parser.add_argument("--workers", type=int, default=None, help="ILP worker processes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-o", "--output", default=None, help="write the plan JSON to this file")
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments `hap plan` and `hap simulate` share."""
    parser.add_argument("--model", help="model spec, e.g. gpt3-175b or llama3-70b")
    parser.add_argument("--cluster", help="cluster spec (e.g. 8x8xA100-80GB) or cluster file")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (model default)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="bf16",
        help="training precision: 16-bit compute with fp32 master weights, or fp32",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="fraction of device memory a plan may use (default 0.9)",
    )


def run(args: argparse.Namespace) -> int:
    from stage_partitioner.model_planning import capture_spec, cluster_from_text, planning_context
    from stage_partitioner.planner import PlannerOptions, plan_in_context

    _require(args, "model", "cluster", "global_batch")
    cluster = cluster_from_text(args.cluster)
    sizes = [int(s) for s in args.microbatch_sizes.split(",")] if args.microbatch_sizes else None
    options = PlannerOptions(
        global_batch=args.global_batch,
        memory_fraction=args.memory_fraction,
        num_stages=args.pp,
        microbatch_sizes=sizes,
        workers=args.workers,
    )
    with _progress() as report:
        graph = capture_spec(args.model, seq=args.seq, precision=args.precision)
        context = planning_context(graph, cluster, options, args.precision)
        plan, _ = plan_in_context(
            context, model_name=args.model, precision=args.precision, progress=report
        )
    if args.output:
        plan.save(args.output)
    if args.json:
        json.dump(plan_summary(plan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(plan, Console())
    return 0


def _require(args: argparse.Namespace, *names: str) -> None:
    from hierarchical_ap.errors import HapError

    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise HapError(f"missing {', '.join(missing)}; see `hap {args.command} --help`")


class _progress:
    """A rich progress bar on stderr fed by the planner's ``progress(phase, done, total)``."""

    def __enter__(self):
        self.bar = Progress(
            TextColumn("{task.description:>14}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.__enter__()
        self.tasks: dict[str, Any] = {}
        return self

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=max(total, 1))
        self.bar.update(self.tasks[phase], completed=done, total=max(total, 1))

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def plan_summary(plan: ParallelPlan) -> dict[str, Any]:
    """The JSON `hap plan --json` and `hap simulate --json` print."""
    return {
        "model": plan.model,
        "planning_time_s": plan.planning_time_s,
        "predicted_step_time_s": plan.predicted_step_time_s,
        "predicted_tflops_per_device": plan.predicted_tflops_per_device,
        "peak_memory_bytes_per_device": plan.predicted_peak_memory_bytes_per_device,
        "global_batch": plan.global_batch,
        "micro_batch_size": plan.micro_batch_size,
        "num_microbatches": plan.num_microbatches,
        "schedule": plan.schedule,
        "virtual_stages": plan.virtual_stages,
        "precision": plan.precision,
        "notes": list(plan.notes),
        "stages": [
            {
                "layers": list(stage.layers),
                "layer_names": [
                    plan.layers[stage.layers[0]].name,
                    plan.layers[stage.layers[1]].name,
                ],
                "hosts": list(stage.hosts),
                "devices": list(stage.devices),
                "submesh": list(stage.submesh),
                "logical_mesh": list(stage.logical_mesh),
                "recompute": stage.recompute,
                "time_per_microbatch_s": stage.time_per_microbatch_s,
                "memory_bytes": stage.memory.total,
                "param_placements": {k: list(v) for k, v in stage.param_placements.items()},
            }
            for stage in plan.stages
        ],
    }


def render(plan: ParallelPlan, console: Console) -> None:
    """A readable table of the plan's stages and its predictions."""
    console.print(
        f"[bold]{plan.model}[/bold]: {len(plan.stages)} stage(s), schedule {plan.schedule}"
        + (f" (v={plan.virtual_stages})" if plan.virtual_stages > 1 else "")
        + f", {plan.num_microbatches} micro-batches of {plan.micro_batch_size}, {plan.precision}"
    )
    table = Table()
    for column in ("stage", "layers", "hosts", "devices", "mesh", "recompute", "ms/µbatch", "GiB"):
        table.add_column(column, justify="right" if column in ("ms/µbatch", "GiB") else "left")
    for index, stage in enumerate(plan.stages):
        table.add_row(
            str(index),
            plan.stage_layer_names(index),
            index_span(stage.hosts),
            f"{len(stage.devices)}",
            "x".join(map(str, stage.logical_mesh)),
            stage.recompute,
            f"{stage.time_per_microbatch_s * 1e3:.1f}",
            f"{stage.memory.total / 2**30:.1f}",
        )
    console.print(table)
    planning = f", planned in {plan.planning_time_s:.1f} s" if plan.planning_time_s else ""
    console.print(
        f"predicted step {plan.predicted_step_time_s:.3f} s, "
        f"{plan.predicted_tflops_per_device:.1f} TFLOP/s per device, peak "
        f"{plan.predicted_peak_memory_bytes_per_device / 2**30:.1f} GiB per device{planning}"
    )
