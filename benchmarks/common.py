"""What the runtime benchmarks share: the GPT workload, its batches and optimizer, probing the
cluster, simulating a plan, the command line and the stop-on-timeout guard.

``data_parallel_stage.py`` and ``runtime_vs_torch_pipelining.py`` import it as ``common``
(Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: One intra-op thread per worker on both sides of every comparison.
THREADS_PER_WORKER = 1
LEARNING_RATE = 1e-3

Batch = tuple[torch.Tensor, torch.Tensor]


def gpt_spec(args: argparse.Namespace) -> str:
    """The zoo GPT spec of the command line's ``--layers --hidden --heads --vocab --seq``."""
    return (
        f"gpt:layers={args.layers},hidden={args.hidden},heads={args.heads},"
        f"vocab={args.vocab},seq={args.seq},tied=0"
    )


def token_batches(count: int, global_batch: int, seq: int, vocab: int) -> list[Batch]:
    """``count`` seeded (input_ids, next-token targets) global batches of ``global_batch``
    sequences of ``seq`` tokens."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        tokens = torch.randint(vocab, (global_batch, seq + 1), generator=generator)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer every side of a comparison trains with."""
    return torch.optim.AdamW(params, lr=LEARNING_RATE)


def plan_gpt(
    model: nn.Module,
    cluster: Any,
    batch: Batch,
    *,
    pp: int,
    dp: int,
    micro_batch_size: int,
) -> Any:
    """``manual_plan(tp=1, pp, dp)`` of the GPT with the causal-LM loss, schedule 1F1B."""
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
        micro_batch_size=micro_batch_size,
        schedule="1f1b",
    )


def simulate_plan(model: nn.Module, plan: Any, cluster: Any, batch: Batch) -> Any:
    """The simulator's ``Simulation`` of ``plan`` on ``cluster``, as ``hap simulate plan.json``
    makes it: the plan's candidate re-simulated with the cluster's costs (each stage's sharding
    re-solved on that cluster)."""
    from hierarchical_ap.api import capture_for_planning
    from hierarchical_ap.models.bundle import causal_lm_loss
    from stage_partitioner.model_planning import planning_context
    from stage_partitioner.planner import PlannerOptions
    from stage_partitioner.simulator import candidate_from_plan

    inputs, targets = batch
    graph = capture_for_planning(model, (inputs,), targets=targets, loss_fn=causal_lm_loss)
    plan.check_matches(graph, cluster)
    options = PlannerOptions(global_batch=plan.global_batch, workers=1)
    context = planning_context(graph, cluster, options, plan.precision)
    simulation = context.simulator.simulate(candidate_from_plan(context, plan))
    if simulation is None:
        raise RuntimeError("the simulator found no sharding for a stage of the plan")
    return simulation


def probe_cluster(path: Path, workers: int, timeout_s: float) -> None:
    """``hap cluster probe --workers N -o path`` in a child process (its own Ray)."""
    command = [sys.executable, "-m", "hierarchical_ap.cli", "cluster", "probe"]
    command += ["--workers", str(workers), "-o", str(path), "--quiet"]
    print(f"probing: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL)


def probed_cluster(args: argparse.Namespace, workers: int, scratch: Path) -> Any:
    """The cluster of ``--cluster-file``, or of a probe of ``workers`` workers run now."""
    from hierarchical_ap.cluster import Cluster

    cluster_file = args.cluster_file
    if cluster_file is None:
        cluster_file = scratch / "cluster.yaml"
        probe_cluster(cluster_file, workers, args.timeout)
    return Cluster.from_file(cluster_file)


def start_local_ray(num_cpus: int) -> None:
    """Ray on this machine with ``num_cpus`` logical CPUs, quiet, one thread per worker."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(THREADS_PER_WORKER)}},
    )


def add_workload_arguments(
    parser: argparse.ArgumentParser, *, layers: int, warmup: int, steps: int, workers: int
) -> None:
    """The options every runtime benchmark takes: steps, the GPT's shape, the global batch, a
    probed cluster file and the whole run's timeout."""
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per side")
    parser.add_argument("--layers", type=int, default=layers, help="GPT blocks")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument(
        "--cluster-file",
        type=Path,
        default=None,
        help=f"a cluster file from `hap cluster probe --workers {workers}` (default: probe now)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before the whole run is stopped"
    )


def check_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject a run with no timed step or a negative warm-up."""
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")


def run_with_timeout(run: Callable[[], int], timeout_s: float) -> int:
    """``run()`` with SIGALRM after ``timeout_s`` and SIGTERM raised as exceptions, so that the
    benchmark's ``finally`` blocks stop every worker, Ray and every child process."""

    def raise_timeout(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the benchmark ran past --timeout {timeout_s:g} s; stopping workers")

    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGALRM, raise_timeout)
    signal.signal(signal.SIGTERM, raise_exit)
    signal.alarm(max(1, int(timeout_s)))
    try:
        return run()
    finally:
        signal.alarm(0)
