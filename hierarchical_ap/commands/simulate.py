"""`hap simulate`: predicted step time and memory of a manual configuration or a saved plan."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from hierarchical_ap.commands.plan import (
    _progress,
    _require,
    add_model_arguments,
    plan_summary,
    render,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="predict step time and memory of a Megatron-style configuration or a plan file",
        description=(
            "Evaluate a manual configuration (--tp --pp --dp --micro-batch-size ...) with the "
            "planner's cost model: layers split evenly, each stage on a tp x dp submesh with "
            "the best intra-op sharding of that mesh. Or re-simulate a saved plan: "
            "`hap simulate plan.json`."
        ),
    )
    parser.add_argument("plan", nargs="?", default=None, help="a plan JSON written by hap plan")
    add_model_arguments(parser)
    parser.add_argument("--tp", type=int, help="tensor-parallel degree (inside a host)")
    parser.add_argument("--pp", type=int, help="pipeline stages")
    parser.add_argument("--dp", type=int, help="data-parallel degree")
    parser.add_argument(
        "--micro-batch-size", type=int, help="sequences per micro-batch per replica"
    )
    parser.add_argument(
        "--recompute", choices=("none", "selective", "full"), default="none", help="recomputation"
    )
    parser.add_argument(
        "--schedule", choices=("1f1b", "gpipe", "interleaved"), default="1f1b", help="schedule"
    )
    parser.add_argument(
        "--virtual-stages", type=int, default=1, help="chunks per rank (interleaved)"
    )
    parser.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help=(
            "hold parameters to a ZeRO stage over the data-parallel axis, as DeepSpeed runs it "
            "(default: the ILP chooses each parameter's sharding)"
        ),
    )
    parser.add_argument(
        "--zero-list-collectives",
        action="store_true",
        help=(
            "with --zero 3: cost its gathers as DeepSpeed's 2021 list-based collectives "
            "(per-rank copies), as the published ZeRO-3 runs ran"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hierarchical_ap.plan import ParallelPlan
    from stage_partitioner.manual import ManualConfig, simulate_manual
    from stage_partitioner.model_planning import capture_spec, cluster_from_text, planning_context
    from stage_partitioner.planner import PlannerOptions, to_parallel_plan
    from stage_partitioner.simulator import candidate_from_plan

    if args.zero_list_collectives and args.zero != 3:
        from hierarchical_ap.errors import HapError

        raise HapError("--zero-list-collectives models ZeRO-3's gathers; add --zero 3")
    if args.plan is not None:
        if args.zero is not None:
            from hierarchical_ap.errors import HapError

            raise HapError(
                "--zero applies to a manual configuration; a plan file already fixes every "
                "parameter's sharding (drop --zero, or give --tp --pp --dp instead of the plan)"
            )
        saved = ParallelPlan.load(args.plan)
        from hierarchical_ap.cluster import Cluster

        cluster = Cluster.from_dict(saved.cluster)
        options = PlannerOptions(
            global_batch=saved.global_batch, memory_fraction=args.memory_fraction
        )
        with _progress():
            graph = capture_spec(saved.model, seq=saved.seq_len, precision=saved.precision)
            saved.check_matches(graph, cluster)
            context = planning_context(graph, cluster, options, saved.precision)
            candidate = candidate_from_plan(context, saved)
            simulation = context.simulator.simulate(candidate)
        model, precision, notes = saved.model, saved.precision, saved.notes
    else:
        _require(args, "model", "cluster", "global_batch", "tp", "pp", "dp", "micro_batch_size")
        config = ManualConfig(
            args.tp,
            args.pp,
            args.dp,
            args.micro_batch_size,
            args.recompute,
            args.schedule,
            args.virtual_stages,
        )
        cluster = cluster_from_text(args.cluster)
        options = PlannerOptions(
            global_batch=args.global_batch,
            memory_fraction=args.memory_fraction,
            zero_stage=args.zero,
            zero_list_collectives=args.zero_list_collectives,
        )
        with _progress():
            graph = capture_spec(args.model, seq=args.seq, precision=args.precision)
            context = planning_context(graph, cluster, options, args.precision)
            result = simulate_manual(context, config)
        if result is None:
            from hierarchical_ap.errors import NoFeasiblePlanError

            raise NoFeasiblePlanError(
                f"{config.describe()} has a stage with no sharding on its mesh; change tp or dp"
            )
        candidate, simulation = result
        zero = () if args.zero is None else (f"ZeRO-{args.zero} over the data-parallel axis",)
        if args.zero_list_collectives:
            zero = (*zero, "gathers as DeepSpeed's 2021 list-based collectives")
        model, precision, notes = args.model, args.precision, (config.describe(), *zero)
    plan = to_parallel_plan(
        candidate,
        simulation,
        graph,
        cluster,
        context.solver,
        model_name=model,
        precision=precision,
        notes=notes,
    )
    summary = plan_summary(plan)
    summary["fits_memory"] = simulation.peak_memory_bytes <= context.budget
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(plan, Console())
        if not summary["fits_memory"]:
            Console().print(
                f"[red]does not fit[/red]: needs {simulation.peak_memory_bytes / 2**30:.1f} GiB "
                f"per device, the budget is {context.budget / 2**30:.1f} GiB"
            )
    return 0
