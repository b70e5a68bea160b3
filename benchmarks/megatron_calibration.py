"""Calibration of the cost model and simulator against the published Megatron-LM runs.

One row per run of Narayanan et al. (SC21), tables 1 and 2
(``hierarchical_ap/data/megatron_sc21_table{1,2}.csv``, A100-80GB DGX hosts, fp16, full
recomputation, interleaved 1F1B):

* ``published s``: the iteration time the paper's throughput implies;
* ``simulated s``: ``hap simulate`` of the published configuration (``manual.best_manual``
  over ``PublishedRun.configs``: table 1 does not give the micro-batch size, so the best one
  that fits is used, and neither table gives the interleaved chunks per rank, so the best
  count that fits is used; both are printed); the ZeRO-3 runs as DeepSpeed ran them in 2021
  (``hap simulate --zero 3 --zero-list-collectives``: ``intra_op.zero``, weights that no dim
  splits evenly over the ranks partitioned flat and padded, gathers through list-based
  collectives with per-rank views and copies);
* ``error``: simulated / published − 1;
* ``plan / pub``: the step time of the plan ``hap plan`` finds for the same model, cluster and
  global batch, over the published configuration's simulated time (target ≤ 1.00).

Targets (issue 4): median |error| ≤ 15 %, none over 25 %, planner ratio ≤ 1.00 on every row.
The cost model's efficiencies are ``CostModel``'s defaults, the same for every row.

Run: ``.venv/bin/python benchmarks/megatron_calibration.py [--rows T1,PTD] [--no-planner]``.
All 21 rows with the planner take about 20 minutes on a 2-core machine (up to two minutes a
row at 1,000+ GPUs); ``--no-planner`` about 5. A run that cannot be simulated prints why (the
memory its smallest simulation needs).
"""

from __future__ import annotations

import argparse
import statistics
import time

from hierarchical_ap.errors import HapError
from stage_partitioner.manual import (
    PublishedRun,
    best_manual,
    megatron_sc21_runs,
    simulate_manual,
)
from stage_partitioner.model_planning import capture_spec, cluster_from_text, planning_context
from stage_partitioner.planner import PlannerOptions, plan_in_context


def selected(runs: list[PublishedRun], patterns: str | None) -> list[PublishedRun]:
    """Runs whose name contains one of the comma-separated ``patterns`` (all if ``None``)."""
    if not patterns:
        return runs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [run for run in runs if any(p in run.name for p in wanted)]


def why_nothing_fits(context, run: PublishedRun) -> str:
    """The memory the smallest simulation of the run's first configuration needs."""
    result = simulate_manual(context, run.configs[0])
    if result is None:
        return "a stage has no sharding on its mesh"
    needed = result[1].peak_memory_bytes / 2**30
    return f"needs {needed:.0f} GiB per device, budget {context.budget / 2**30:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", help="comma-separated name fragments, e.g. 'T1,PTD 174.6B'")
    parser.add_argument("--no-planner", action="store_true", help="skip the planner column")
    args = parser.parse_args()

    runs = selected(megatron_sc21_runs(), args.rows)
    header = (
        f"{'run':24} {'published s':>11} {'simulated s':>11} {'error':>7} {'plan / pub':>10} "
        f"{'plan s':>7} {'mem GiB':>7}  configuration"
    )
    print(header)
    errors = []
    ratios = []
    graphs: dict[str, object] = {}
    for run in runs:
        started = time.perf_counter()
        if run.model not in graphs:
            graphs.clear()
            graphs[run.model] = capture_spec(run.model, seq=None, precision="fp16")
        graph = graphs[run.model]
        cluster = cluster_from_text(run.cluster)
        context = planning_context(
            graph, cluster, PlannerOptions(global_batch=run.global_batch), "fp16"
        )
        published = context
        if run.zero_stage is not None:
            published = planning_context(graph, cluster, run.planner_options(), "fp16")
        best = best_manual(published, run.configs)
        if best is None:
            print(
                f"{run.name:24} {run.iteration_time_s:11.2f} {'no fit':>11}  {run.note}; ", end=""
            )
            print(why_nothing_fits(published, run), flush=True)
            continue
        config, _, simulation = best
        simulated = simulation.step_time_s
        error = simulated / run.iteration_time_s - 1
        errors.append(abs(error))
        ratio_text, plan_text = "-", "-"
        if not args.no_planner:
            try:
                _, planned = plan_in_context(context, model_name=run.model, precision="fp16")
            except HapError as exc:
                ratio_text = f"error: {exc}"
            else:
                ratio = planned.step_time_s / simulated
                ratios.append(ratio)
                ratio_text, plan_text = f"{ratio:.3f}", f"{planned.step_time_s:.2f}"
        chosen = f"m={config.micro_batch_size}" + (
            f" v={config.virtual_stages}" if config.schedule == "interleaved" else ""
        )
        print(
            f"{run.name:24} {run.iteration_time_s:11.2f} {simulated:11.2f} {error:+7.1%} "
            f"{ratio_text:>10} {plan_text:>7} {simulation.peak_memory_bytes / 2**30:7.1f}  "
            f"{run.note}; {chosen} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if errors:
        print(
            f"\n|error| over {len(errors)} runs: median {statistics.median(errors):.1%}, "
            f"max {max(errors):.1%} (targets 15 %, 25 %)"
        )
    if ratios:
        print(f"planner / published configuration: max {max(ratios):.3f} (target ≤ 1.00)")


if __name__ == "__main__":
    main()
