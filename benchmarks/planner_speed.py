"""Planning time and peak memory of ``hap plan`` on the issue's four large cases.

Each case runs in a fresh child process (so its peak RSS is its own): capture with a dynamic
batch, then the whole outer pass (ILP chains in worker processes, stage DP, uniform and
interleaved slicings, simulation). Printed per case: capture time, planning time, their sum
(the wall time a user waits for ``hap plan``), the peak RSS of the planning process and of
its largest ILP worker, and the plan found. Targets on a 2-core machine are the issue's:

    gpt-39b     on 8x8xV100-16GB,    global batch 1024: ≤  30 s
    gpt3-175b   on 192x8xA100-80GB,  global batch 1536: ≤  60 s
    gpt-1t      on 384x8xA100-80GB,  global batch 3072: ≤ 120 s
    llama3-70b  on 8x8xH100-80GB,    global batch 1024: ≤  30 s

each under 8 GiB RSS. Run: ``.venv/bin/python benchmarks/planner_speed.py [--case NAME]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    cluster: str
    global_batch: int
    target_s: float
    precision: str = "fp16"


CASES = (
    Case("gpt-39b", "gpt-39b", "8x8xV100-16GB", 1024, 30.0),
    Case("gpt3-175b", "gpt3-175b", "192x8xA100-80GB", 1536, 60.0),
    Case("gpt-1t", "gpt-1t", "384x8xA100-80GB", 3072, 120.0),
    Case("llama3-70b", "llama3-70b", "8x8xH100-80GB", 1024, 30.0, precision="bf16"),
)
RSS_TARGET_BYTES = 8 * 2**30


def _peak_rss(who: int) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def run_case(case: Case) -> dict:
    """Capture and plan one case in this process; the figures as a dict."""
    from stage_partitioner.model_planning import capture_spec, cluster_from_text, planning_context
    from stage_partitioner.planner import PlannerOptions, plan_in_context

    started = time.perf_counter()
    graph = capture_spec(case.model, seq=None, precision=case.precision)
    captured = time.perf_counter()
    cluster = cluster_from_text(case.cluster)
    context = planning_context(
        graph, cluster, PlannerOptions(global_batch=case.global_batch), case.precision
    )
    plan, _ = plan_in_context(context, model_name=case.model, precision=case.precision)
    done = time.perf_counter()
    return {
        "case": case.name,
        "capture_s": captured - started,
        "planning_s": done - captured,
        "total_s": done - started,
        "rss_bytes": _peak_rss(resource.RUSAGE_SELF),
        "worker_rss_bytes": _peak_rss(resource.RUSAGE_CHILDREN),
        "plan": (
            f"{len(plan.stages)} stages {plan.schedule}"
            + (f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else "")
            + f", {plan.num_microbatches}×{plan.micro_batch_size}, mesh "
            + "x".join(map(str, plan.stages[0].logical_mesh))
            + f", {plan.predicted_step_time_s:.2f} s/step"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[c.name for c in CASES], action="append")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = next(c for c in CASES if c.name == args.child)
        print(json.dumps(run_case(case)))
        return
    names = args.case or [c.name for c in CASES]
    header = f"{'case':<11} {'cluster':<17} {'capture':>8} {'plan':>8} {'total':>8} {'target':>7} {'RSS':>8} {'worker':>8}  plan found"
    print(header)
    for case in (c for c in CASES if c.name in names):
        output = subprocess.run(
            [sys.executable, __file__, "--child", case.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        row = json.loads(output.strip().splitlines()[-1])
        ok = (
            row["total_s"] <= case.target_s
            and max(row["rss_bytes"], row["worker_rss_bytes"]) <= RSS_TARGET_BYTES
        )
        print(
            f"{case.name:<11} {case.cluster:<17} {row['capture_s']:7.1f}s {row['planning_s']:7.1f}s "
            f"{row['total_s']:7.1f}s {case.target_s:6.0f}s {row['rss_bytes'] / 2**30:7.2f}G "
            f"{row['worker_rss_bytes'] / 2**30:7.2f}G  {row['plan']}  {'ok' if ok else 'MISSED'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
