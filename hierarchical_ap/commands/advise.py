"""`hap advise`: rank the classic tp / pp / dp / ZeRO / recompute / schedule configurations of a
model on a cluster, recommend the simplest near the best, and compare what-if hardware."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from hierarchical_ap.commands.plan import _progress, _require, add_model_arguments
from hierarchical_ap.errors import PlannerOptionError

GIB = 2**30
CSV_COLUMNS = (
    "scenario",
    "rank",
    "kind",
    "recommended",
    "tp",
    "pp",
    "dp",
    "micro_batch_size",
    "zero",
    "recompute",
    "schedule",
    "virtual_stages",
    "step_time_s",
    "tokens_per_s",
    "mfu",
    "parameters_bytes",
    "gradients_bytes",
    "optimizer_bytes",
    "activations_bytes",
    "total_bytes",
    "name",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "advise",
        help="rank classic parallel configurations (tp, pp, dp, ZeRO, recompute, schedule)",
        description=(
            "Enumerate the Megatron-style configurations of MODEL on CLUSTER (tensor, pipeline "
            "and data parallel degrees, micro-batch size, ZeRO stage 0-3, recomputation, "
            "schedule), price each with the planner's cost model and simulator, show them "
            "ranked next to the two-level planner's own plan, and recommend the simplest "
            "configuration within 3%% of the fastest. --what-if re-runs the advice on changed "
            "hardware and prints the change side by side."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    parser.add_argument(
        "--what-if",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help=(
            "a scenario to compare (repeatable): cluster=SPEC, device=NAME, hosts=N, "
            "inter-host-gbps=G, intra-host-gbps=G"
        ),
    )
    parser.add_argument(
        "--micro-batch-sizes",
        default="1,2,4,8",
        help="sequences per micro-batch and replica to try (default 1,2,4,8)",
    )
    parser.add_argument(
        "--no-planner", action="store_true", help="leave out the two-level planner's plan"
    )
    parser.add_argument("--workers", type=int, default=None, help="ILP worker processes")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--csv", action="store_true", help="print the ranked rows as CSV")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stage_partitioner.model_planning import capture_spec, cluster_from_text
    from stage_partitioner.what_if import apply_what_if, parse_what_if

    _require(args, "model", "cluster", "global_batch")
    if args.top < 1:
        raise PlannerOptionError(f"--top must be at least 1, got {args.top}")
    sizes = _sizes(args.micro_batch_sizes)
    cluster = cluster_from_text(args.cluster)
    scenarios = [(w, apply_what_if(cluster, w)) for w in map(parse_what_if, args.what_if)]
    with _progress() as report:
        graph = capture_spec(args.model, seq=args.seq, precision=args.precision)
        baseline = _advise(args, graph, cluster, sizes, report)
        what_ifs = [(w.text, _advise(args, graph, c, sizes, report)) for w, c in scenarios]
    if args.json:
        data = advice_dict(baseline, args.top)
        data["what_if"] = [
            {"change": text, "advice": advice_dict(a, args.top)} for text, a in what_ifs
        ]
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.csv:
        write_csv(sys.stdout, [("baseline", baseline), *what_ifs], args.top)
    else:
        console = Console()
        render(baseline, args.top, console)
        for text, advice in what_ifs:
            render_what_if(baseline, text, advice, console)
    return 0


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(s) for s in text.split(",")}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 1:
        raise PlannerOptionError(
            f"--micro-batch-sizes must be positive integers separated by commas, got {text!r}"
        )
    return sizes


def _advise(args, graph, cluster, sizes, report):
    from stage_partitioner.advisor import SearchSpace, model_shape
    from stage_partitioner.advisor_search import AdvisorOptions, advise
    from stage_partitioner.model_planning import PRECISION_DTYPES, planning_context
    from stage_partitioner.planner import PlannerOptions

    options = PlannerOptions(
        global_batch=args.global_batch, memory_fraction=args.memory_fraction, workers=args.workers
    )
    context = planning_context(graph, cluster, options, args.precision)
    return advise(
        context,
        model_shape(args.model, args.seq, graph),
        AdvisorOptions(
            top=args.top,
            space=SearchSpace(micro_batch_sizes=sizes),
            include_planner=not args.no_planner,
        ),
        model_name=args.model,
        precision=args.precision,
        peak_flops=cluster.device.peak_flops(PRECISION_DTYPES[args.precision]),
        progress=report,
    )


# ---------------------------------------------------------------------------------- data


def shown_rows(advice, top: int) -> list:
    """The ``top`` fastest rows, with the planner's plan kept even when it ranks lower."""
    rows = advice.rows[:top]
    planner = advice.planner
    if planner is not None and planner not in rows:
        rows.append(planner)
    return rows


def row_dict(row, rank: int, recommended: bool) -> dict[str, Any]:
    config = row.config
    memory = row.memory
    return {
        "rank": rank,
        "kind": "planner" if config is None else "configuration",
        "recommended": recommended,
        "name": row.name,
        "tp": None if config is None else config.tp,
        "pp": None if config is None else config.pp,
        "dp": None if config is None else config.dp,
        "micro_batch_size": None if config is None else config.micro_batch_size,
        "zero": None if config is None else config.zero,
        "recompute": None if config is None else config.recompute,
        "schedule": None if config is None else config.schedule,
        "virtual_stages": None if config is None else config.virtual_stages,
        "step_time_s": row.step_time_s,
        "tokens_per_s": row.tokens_per_s,
        "mfu": row.mfu,
        "memory_bytes": {
            "parameters": memory.parameters,
            "gradients": memory.gradients,
            "optimizer": memory.optimizer,
            "activations": memory.activations,
            "total": memory.total,
        },
    }


def advice_dict(advice, top: int) -> dict[str, Any]:
    """The JSON `hap advise --json` prints for one scenario (``what_if`` added by ``run``)."""
    from stage_partitioner.what_if import describe

    ranks = {id(r): i for i, r in enumerate(advice.rows, 1)}
    return {
        "model": advice.model,
        "cluster": describe(advice.cluster),
        "inter_host_gbps": advice.cluster.inter_host_link.bandwidth * 8 / 1e9,
        "global_batch": advice.global_batch,
        "seq": advice.seq,
        "precision": advice.precision,
        "budget_bytes": advice.budget_bytes,
        "search_time_s": advice.search_time_s,
        "num_configurations": advice.num_configurations,
        "recommended": None
        if advice.recommended is None
        else {
            **row_dict(advice.recommended, ranks[id(advice.recommended)], True),
            "reason": advice.reason,
        },
        "reason": advice.reason,
        "planner_note": advice.planner_note,
        "rows": [
            row_dict(r, ranks[id(r)], r is advice.recommended) for r in shown_rows(advice, top)
        ],
        "rejected": [
            {
                "configuration": r.what,
                "category": r.category,
                "rule": r.rule,
                "reason": r.reason,
                "lower_bound_s": r.bound_s,
            }
            for r in advice.rejected
        ],
    }


def write_csv(stream, scenarios, top: int) -> None:
    """One line per shown row of every scenario (``CSV_COLUMNS``)."""
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for scenario, advice in scenarios:
        ranks = {id(r): i for i, r in enumerate(advice.rows, 1)}
        for row in shown_rows(advice, top):
            data = row_dict(row, ranks[id(row)], row is advice.recommended)
            memory = data.pop("memory_bytes")
            data.update({f"{k}_bytes": v for k, v in memory.items()})
            writer.writerow({"scenario": scenario, **data})


# ---------------------------------------------------------------------------------- terminal


def render(advice, top: int, console: Console) -> None:
    """The ranked table, the recommendation and a summary of what was left out."""
    from stage_partitioner.what_if import describe

    console.print(
        f"[bold]{advice.model}[/bold] on {describe(advice.cluster)}: global batch "
        f"{advice.global_batch} × {advice.seq} tokens, {advice.precision}, "
        f"{advice.budget_bytes / GIB:.1f} GiB per device"
    )
    counts = Counter(r.category for r in advice.rejected)
    priced = sum(1 for r in advice.rows if r.config is not None)
    console.print(
        f"{advice.num_configurations} configurations: {priced} simulated, "
        f"{counts['outranked']} outranked by a lower bound, "
        f"{counts['does not fit memory']} do not fit memory; searched in "
        f"{advice.search_time_s:.1f} s"
    )
    rows = shown_rows(advice, top)
    unit, scale = ("GiB", GIB) if max(r.memory.total for r in rows) >= GIB else ("MiB", 2**20)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("#", "tp·pp·dp·m", "ZeRO", "recompute", "schedule"):
        table.add_column(column, no_wrap=True)
    for column in ("step", "tokens/s", "MFU", "param", "grad", "optim", "activ", unit):
        table.add_column(column, justify="right", no_wrap=True)
    ranks = {id(r): i for i, r in enumerate(advice.rows, 1)}
    for row in rows:
        config, memory = row.config, row.memory
        if config is None:
            degrees = ["planner", "", "", ""]
        else:
            degrees = [
                f"{config.tp}·{config.pp}·{config.dp}·{config.micro_batch_size}",
                str(config.zero),
                config.recompute,
                config.schedule_label,
            ]
        parts = (memory.parameters, memory.gradients, memory.optimizer, memory.activations)
        table.add_row(
            ("★" if row is advice.recommended else "") + str(ranks[id(row)]),
            *degrees,
            seconds(row.step_time_s),
            _count(row.tokens_per_s),
            f"{row.mfu:.1%}",
            *(f"{b / scale:.1f}" for b in (*parts, memory.total)),
        )
    console.print(table)
    if advice.planner is not None:
        console.print(advice.planner.name)
    elif advice.planner_note:
        console.print(advice.planner_note)
    if advice.recommended is not None:
        console.print(f"[bold]recommended[/bold] ★ {advice.recommended.name}: {advice.reason}")
    else:
        console.print(f"[red]{advice.reason}[/red]")
    for category, rules in _left_out(advice).items():
        console.print(f"left out, {category}: " + "; ".join(rules))


def seconds(value: float) -> str:
    """``14.34 s``, ``255 ms``, ``16.4 µs``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= scale or unit == "µs":
            return f"{value / scale:.4g} {unit}"
    raise AssertionError("unreachable")


def _count(value: float) -> str:
    """``219.4k``, ``31.15M``."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def _left_out(advice) -> dict[str, list[str]]:
    """Per category of rejection, how often each rule ruled configurations out."""
    by_category: dict[str, Counter] = {}
    for rejected in advice.rejected:
        by_category.setdefault(rejected.category, Counter())[rejected.rule] += 1
    return {
        category: [f"{rule} ({n})" for rule, n in counter.most_common()]
        for category, counter in by_category.items()
    }


def render_what_if(baseline, text: str, advice, console: Console) -> None:
    """The scenario's recommendation and best rows next to the baseline's."""
    from stage_partitioner.what_if import describe

    table = Table(title=f"what if {text}")
    for column in ("", "baseline", "what-if", "change"):
        table.add_column(
            column, justify="left" if column in ("", "baseline", "what-if") else "right"
        )
    table.add_row("cluster", describe(baseline.cluster), describe(advice.cluster), "")
    table.add_row(
        "network Gbit/s per device",
        f"{baseline.cluster.inter_host_link.bandwidth * 8e-9:g}",
        f"{advice.cluster.inter_host_link.bandwidth * 8e-9:g}",
        "",
    )
    for label, pick in (
        ("recommended", lambda a: a.recommended),
        ("fastest", lambda a: a.rows[0] if a.rows else None),
        ("planner", lambda a: a.planner),
    ):
        before, after = pick(baseline), pick(advice)
        table.add_row(label, _name(before), _name(after), "")
        for metric, value, fmt in (
            ("  step time s", lambda r: r.step_time_s, "{:.3f}"),
            ("  tokens/s", lambda r: r.tokens_per_s, "{:,.0f}"),
            ("  MFU", lambda r: r.mfu, "{:.1%}"),
            ("  GiB per device", lambda r: r.memory.total / GIB, "{:.1f}"),
        ):
            table.add_row(
                metric,
                "-" if before is None else fmt.format(value(before)),
                "-" if after is None else fmt.format(value(after)),
                _change(before, after, value),
            )
    console.print(table)
    if advice.recommended is not None:
        console.print(f"what if {text}: recommended {advice.recommended.name}: {advice.reason}")


def _name(row) -> str:
    if row is None:
        return "-"
    return "planner's plan" if row.config is None else row.config.compact


def _change(before, after, value) -> str:
    if before is None or after is None or value(before) == 0:
        return ""
    return f"{value(after) / value(before) - 1:+.1%}"
