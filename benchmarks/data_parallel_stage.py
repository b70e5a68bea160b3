"""A data-parallel stage on 2 CPU workers: plain local shards against DTensor, and against pp=2.

One model (a 2-layer GPT, hidden 256), one global batch (16 sequences of 64 tokens), AdamW,
2 Ray CPU workers joined by gloo, three plans trained on the same batches, steps alternating:

* **dp, planned**: ``manual_plan(tp=1, pp=1, dp=2)`` priced on the probed cluster file
  (``hap cluster probe --workers 2``), whose DTensor dispatch charge (``dtensor_dispatch_s``)
  makes the stage ILP keep every parameter replicated when that is cheaper: the stage then
  runs as plain data parallelism on each device's rows (``intra_op.local_execution``);
* **dp, sharded**: the same configuration priced on the probed cluster without the charge
  (``dtensor_dispatch_s = 0``): the ILP's placements as before the charge, some weights split
  over the two devices, so the stage runs node by node on DTensors;
* **pp=2**: two one-device stages, 1F1B.

Each plan's micro-batches hold 2 sequences per device. Printed per plan: its parameter
placements that are not replicated, the median step after warm-up, the simulator's prediction
on the probed cluster for the two plans made on it (the simulator re-solves every stage's
sharding on the cluster it is given, so it cannot price the sharded plan's placements), and
the losses (the three plans train the same model from
the same weights: their losses agree up to summation order). Ratios: dp planned / dp sharded
and dp planned / pp=2, measured in one run on alternating steps.

Every Ray actor and Ray itself are stopped at exit; ``--timeout`` bounds the whole run.

Run: ``.venv/bin/python benchmarks/data_parallel_stage.py [--warmup 2 --steps 8]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    THREADS_PER_WORKER,
    adamw,
    add_workload_arguments,
    check_steps,
    gpt_spec,
    plan_gpt,
    probed_cluster,
    run_with_timeout,
    simulate_plan,
    start_local_ray,
    token_batches,
)

WORLD = 2
SEQUENCES_PER_DEVICE = 2


def without_dispatch_charge(cluster: Any) -> Any:
    """``cluster`` with DTensor's dispatch free (``dtensor_dispatch_s = 0``), as the planner
    priced every stage before it charged it."""
    device = dataclasses.replace(cluster.device, dtensor_dispatch_s=0.0)
    return dataclasses.replace(cluster, device=device)


def sharded_params(plan: Any) -> dict[str, str]:
    return {
        fqn: "".join(p)
        for stage in plan.stages
        for fqn, p in stage.param_placements.items()
        if any(x != "R" for x in p)
    }


def run(args: argparse.Namespace) -> int:
    import ray

    import hierarchical_ap as hap
    from hierarchical_ap.models import from_spec
    from hierarchical_ap.models.bundle import causal_lm_loss

    spec = gpt_spec(args)
    data = token_batches(args.warmup + args.steps, args.global_batch, args.seq, args.vocab)
    torch.manual_seed(0)
    model = from_spec(spec, batch=args.global_batch, seq=args.seq, device="cpu").model
    with tempfile.TemporaryDirectory() as scratch:
        probed = probed_cluster(args, WORLD, Path(scratch))
    print(
        f"model {spec}; global batch {args.global_batch}, {SEQUENCES_PER_DEVICE} sequences per "
        f"device per micro-batch; probed DTensor dispatch "
        f"{probed.device.dtensor_dispatch_s * 1e6:.1f} µs/op, kernel "
        f"{probed.device.kernel_overhead_s * 1e6:.1f} µs, compute scale "
        f"{probed.device.compute_scale:.2f}",
        flush=True,
    )
    m = SEQUENCES_PER_DEVICE
    plans = {
        "dp, planned": plan_gpt(model, probed, data[0], pp=1, dp=WORLD, micro_batch_size=m),
        "dp, sharded": plan_gpt(
            model, without_dispatch_charge(probed), data[0], pp=1, dp=WORLD, micro_batch_size=m
        ),
        "pp=2": plan_gpt(model, probed, data[0], pp=WORLD, dp=1, micro_batch_size=m),
    }
    # the simulator re-solves each stage's sharding on the probed cluster, so it prices the
    # sharded plan as the planned one: it predicts only the plans made on that cluster
    predicted = {
        name: simulate_plan(model, plan, probed, data[0]).step_time_s
        for name, plan in plans.items()
        if name != "dp, sharded"
    }

    start_local_ray(WORLD * len(plans))
    executables: dict[str, Any] = {}
    try:
        for name, plan in plans.items():
            executables[name] = hap.compile_parallel(
                model,
                hap.Cluster.local_cpu(WORLD),
                example_inputs=(data[0][0],),
                targets=data[0][1],
                loss_fn=causal_lm_loss,
                optimizer_fn=adamw,
                plan=plan,
            )
        times: dict[str, list[float]] = {name: [] for name in plans}
        losses: dict[str, list[float]] = {name: [] for name in plans}
        for step, (inputs, targets) in enumerate(data):
            for name, executable in executables.items():
                started = time.perf_counter()
                losses[name].append(executable.train_step((inputs,), targets))
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - started)
    finally:
        for executable in executables.values():
            executable.shutdown()
        ray.shutdown()

    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, plan in plans.items():
        simulated = (
            f"simulated {predicted[name] * 1e3:6.1f} ms, measured "
            f"{medians[name] / predicted[name] - 1:+.0%}"
            if name in predicted
            else "not simulated"
        )
        print(
            f"{name:<12} median step {medians[name] * 1e3:7.1f} ms ({simulated}); "
            f"not replicated: {sharded_params(plan) or 'none'}"
        )
    gap = max(
        abs(a - b) for name in plans for a, b in zip(losses[name], losses["pp=2"], strict=True)
    )
    print(f"largest loss difference from pp=2 over {len(data)} steps: {gap:.2e}")
    for other in ("dp, sharded", "pp=2"):
        paired = statistics.median(
            a / b for a, b in zip(times["dp, planned"], times[other], strict=True)
        )
        print(
            f"ratio dp planned / {other}: {medians['dp, planned'] / medians[other]:.3f} "
            f"(median of paired steps {paired:.3f})"
        )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, layers=2, warmup=2, steps=8, workers=WORLD)
    args = parser.parse_args(argv)
    check_steps(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_WORKER))
    return run_with_timeout(lambda: run(args), args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
