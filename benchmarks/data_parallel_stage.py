"""A data-parallel stage on 2 CPU workers: plain local shards against DTensor, and against pp=2.

One model (a 2-layer GPT, hidden 256), one global batch (16 sequences of 64 tokens), AdamW,
2 Ray CPU workers joined by gloo, three plans trained on the same batches, steps alternating:

* **dp, planned**: ``manual_plan(tp=1, pp=1, dp=2)`` priced on the probed cluster file
  (``hap cluster probe --workers 2``), whose DTensor dispatch charge (``dtensor_dispatch_s``)
  makes the stage ILP keep every parameter replicated when that is cheaper: the stage then
  runs as plain data parallelism on each device's rows (``intra_op.local_execution``);
* **dp, sharded**: the same configuration priced without the charge (``Cluster.local_cpu(2)``):
  the ILP's placements as before, some weights split over the two devices, so the stage runs
  node by node on DTensors;
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
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

WORLD = 2
THREADS_PER_WORKER = 1
LEARNING_RATE = 1e-3
SEQUENCES_PER_DEVICE = 2


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LEARNING_RATE)


def batches(count: int, global_batch: int, seq: int, vocab: int) -> list[tuple[Any, Any]]:
    """``count`` seeded (input_ids, next-token targets) global batches."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        tokens = torch.randint(vocab, (global_batch, seq + 1), generator=generator)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def plan_on(model: nn.Module, cluster: Any, batch: tuple[Any, Any], *, pp: int, dp: int) -> Any:
    from hierarchical_ap.api import manual_plan
    from hierarchical_ap.models.bundle import causal_lm_loss

    inputs, targets = batch
    return manual_plan(
        model,
        cluster,
        (inputs,),
        targets=targets,
        loss_fn=causal_lm_loss,
        tp=1,
        pp=pp,
        dp=dp,
        micro_batch_size=SEQUENCES_PER_DEVICE,
        schedule="1f1b",
    )


def simulated_step(model: nn.Module, plan: Any, cluster: Any, batch: tuple[Any, Any]) -> float:
    """The simulator's step time of ``plan`` on ``cluster`` (``hap simulate plan.json``)."""
    from hierarchical_ap.api import capture_for_planning
    from hierarchical_ap.models.bundle import causal_lm_loss
    from stage_partitioner.model_planning import planning_context
    from stage_partitioner.planner import PlannerOptions
    from stage_partitioner.simulator import candidate_from_plan

    inputs, targets = batch
    graph = capture_for_planning(model, (inputs,), targets=targets, loss_fn=causal_lm_loss)
    options = PlannerOptions(global_batch=plan.global_batch, workers=1)
    context = planning_context(graph, cluster, options, plan.precision)
    simulation = context.simulator.simulate(candidate_from_plan(context, plan))
    if simulation is None:
        raise RuntimeError("the simulator found no sharding for a stage of the plan")
    return simulation.step_time_s


def sharded_params(plan: Any) -> dict[str, str]:
    return {
        fqn: "".join(p)
        for stage in plan.stages
        for fqn, p in stage.param_placements.items()
        if any(x != "R" for x in p)
    }


def probe_cluster(path: Path, timeout_s: float) -> None:
    """``hap cluster probe --workers 2 -o path`` in a child process (its own Ray)."""
    command = [sys.executable, "-m", "hierarchical_ap.cli", "cluster", "probe"]
    command += ["--workers", str(WORLD), "-o", str(path), "--quiet"]
    print(f"probing: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> int:
    import ray

    import hierarchical_ap as hap
    from hierarchical_ap.models import from_spec
    from hierarchical_ap.models.bundle import causal_lm_loss

    spec = (
        f"gpt:layers={args.layers},hidden={args.hidden},heads={args.heads},"
        f"vocab={args.vocab},seq={args.seq},tied=0"
    )
    data = batches(args.warmup + args.steps, args.global_batch, args.seq, args.vocab)
    torch.manual_seed(0)
    model = from_spec(spec, batch=args.global_batch, seq=args.seq, device="cpu").model
    with tempfile.TemporaryDirectory() as scratch:
        cluster_file = args.cluster_file
        if cluster_file is None:
            cluster_file = Path(scratch) / "cluster.yaml"
            probe_cluster(cluster_file, args.timeout)
        probed = hap.Cluster.from_file(cluster_file)
    print(
        f"model {spec}; global batch {args.global_batch}, {SEQUENCES_PER_DEVICE} sequences per "
        f"device per micro-batch; probed DTensor dispatch "
        f"{probed.device.dtensor_dispatch_s * 1e6:.1f} µs/op, kernel "
        f"{probed.device.kernel_overhead_s * 1e6:.1f} µs",
        flush=True,
    )
    plans = {
        "dp, planned": plan_on(model, probed, data[0], pp=1, dp=WORLD),
        "dp, sharded": plan_on(model, hap.Cluster.local_cpu(WORLD), data[0], pp=1, dp=WORLD),
        "pp=2": plan_on(model, probed, data[0], pp=WORLD, dp=1),
    }
    # the simulator re-solves each stage's sharding on the probed cluster, so it prices the
    # sharded plan as the planned one: it predicts only the plans made on that cluster
    predicted = {
        name: simulated_step(model, plan, probed, data[0])
        for name, plan in plans.items()
        if name != "dp, sharded"
    }

    ray.init(
        num_cpus=WORLD * len(plans),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(THREADS_PER_WORKER)}},
    )
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
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per plan")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per plan")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument(
        "--cluster-file",
        type=Path,
        default=None,
        help="a cluster file from `hap cluster probe --workers 2` (default: probe now)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before the whole run is stopped"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def raise_timeout(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the benchmark ran past --timeout {args.timeout:g} s")

    signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(max(1, int(args.timeout)))
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_WORKER))
    try:
        return run(args)
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    raise SystemExit(main())
