"""hierarchical-ap's 1F1B runtime against ``torch.distributed.pipelining`` on 4 CPU workers.

One run, one model, one stage split, one set of micro-batches:

* **ours**: ``hierarchical_ap.compile_parallel`` with the manual plan ``tp=1, pp=4, dp=1``
  (4 stages of one device each, schedule 1F1B) on ``Cluster.local_cpu(4)``: 4 Ray actors
  joined by gloo;
* **torch**: the same GPT cut into the same 4 stages (the blocks each stage of the plan holds;
  the embeddings with the first, the final norm and head with the last), one
  ``PipelineStage`` per process and ``Schedule1F1B``, on 4 gloo processes started with
  ``torch.multiprocessing.spawn`` (rendezvous on 127.0.0.1).

Fairness: both sides start from the same weights (one model object pickled to both), train on
the same batches with the same loss (``causal_lm_loss``, mean over the global batch: torch's
schedule scales gradients by 1/micro-batches as our last stage does), the same optimizer
(AdamW, same hyper-parameters), one intra-op thread per worker (the runtime's actors set
``torch.set_num_threads(1)``; the torch processes do the same) and normal CPU priority on both
sides (the runtime's actors ask Ray for niceness 0, what the torch processes have). Steps alternate between the
two sides (ours, torch, ours, ...), so load from other processes on a shared machine falls on
both alike. A step is timed on the driver from handing the batch over to having every
worker's result back, on both sides. The losses of the two sides are printed side by side: they
must agree (same computation), which shows that the comparison is like for like.

Printed: median step time of each side after warm-up, the ratio ours / torch (target ≤ 1.00,
never above 1.10), and our measured step time against the simulator's prediction of the same
plan (``candidate_from_plan`` + ``Simulator``, as ``hap simulate plan.json`` does) for a
cluster file measured by ``hap cluster probe --workers 4`` (run here unless ``--cluster-file``
is given; target within 30 %).

Every Ray actor, Ray itself and every torch process is stopped at exit, also on error or
Ctrl-C; ``--timeout`` bounds the whole run.

On a 2-core machine shared with other work, absolute times move by tens of percent between
runs; the ratio, measured in one run on alternating steps (and printed also as the median of
the per-step pairs), is the figure to compare.

Run: ``.venv/bin/python benchmarks/runtime_vs_torch_pipelining.py [--warmup 3 --steps 10]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
from torch import nn

WORLD = 4
TARGET_RATIO = 1.00
CEILING_RATIO = 1.10
SIMULATOR_TOLERANCE = 0.30


@dataclass(frozen=True)
class Workload:
    """The model spec, the global batch and its micro-batching, and the batches trained on."""

    spec: str
    global_batch: int
    microbatches: int
    seq: int
    vocab: int

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch // self.microbatches

    def batches(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` seeded (input_ids, next-token targets) global batches."""
        return token_batches(count, self.global_batch, self.seq, self.vocab)


# --------------------------------------------------------------------------- stage split


def stage_blocks(plan: Any) -> list[list[int]]:
    """The GPT block indices each stage of ``plan`` holds (from its layers' module names)."""
    stages = []
    for stage in plan.stages:
        first, last = stage.layers
        names = [m for layer in plan.layers[first : last + 1] for m in layer.module_layers]
        stages.append([int(m.split(".")[1]) for m in names if m.startswith("blocks.")])
    if not plan.layers[0].module_layers or "embed" not in plan.layers[0].module_layers:
        raise RuntimeError(f"the plan's first layer is not the embedding: {plan.layers[0]}")
    if "head" not in plan.layers[-1].module_layers:
        raise RuntimeError(f"the plan's last layer is not the head: {plan.layers[-1]}")
    return stages


class GPTStage(nn.Module):
    """A contiguous slice of the zoo GPT: optional embeddings, some blocks, optional head.

    Its forward is the GPT's own forward restricted to the slice (token + position embedding,
    the blocks in order, final LayerNorm and LM head)."""

    def __init__(self, gpt: nn.Module, blocks: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.embed, self.pos_embed, self.dropout = gpt.embed, gpt.pos_embed, gpt.dropout
        self.blocks = nn.ModuleList(gpt.blocks[i] for i in blocks)
        if last:
            self.norm, self.head = gpt.norm, gpt.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.dropout(self.embed(x) + self.pos_embed(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) if self.last else x


def torch_worker(
    rank: int,
    port: int,
    model: nn.Module,
    blocks: list[list[int]],
    microbatches: int,
    timeout_s: float,
    commands: list[Any],
    results: Any,
) -> None:
    """One ``torch.distributed.pipelining`` rank: build its stage, then run steps on command
    (``(inputs, targets)`` per step, ``None`` to stop), reporting ``(rank, loss or None)``."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from hierarchical_ap.models.bundle import causal_lm_loss

    torch.set_num_threads(THREADS_PER_WORKER)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=timeout_s),
        )
        last = rank == WORLD - 1
        module = GPTStage(model, blocks[rank], first=rank == 0, last=last)
        stage = PipelineStage(module, rank, WORLD, torch.device("cpu"))
        schedule = Schedule1F1B(stage, microbatches, loss_fn=causal_lm_loss)
        optimizer = adamw(list(module.parameters()))
        results.put((rank, "ready"))
        while (command := commands[rank].get()) is not None:
            inputs, targets = command
            optimizer.zero_grad(set_to_none=True)
            losses: list[torch.Tensor] = []
            if rank == 0:
                schedule.step(inputs)
            elif last:
                schedule.step(target=targets, losses=losses)
            else:
                schedule.step()
            optimizer.step()
            loss = float(torch.stack(losses).detach().mean()) if last else None
            results.put((rank, loss))
    except BaseException:
        results.put((rank, "error:\n" + traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class TorchPipeline:
    """The 4 torch processes, driven step by step from here."""

    def __init__(
        self, model: nn.Module, blocks: list[list[int]], microbatches: int, timeout_s: float
    ) -> None:
        self.timeout_s = timeout_s
        context = mp.get_context("spawn")
        self.commands = [context.Queue() for _ in range(WORLD)]
        self.results = context.Queue()
        self.processes = mp.spawn(
            torch_worker,
            args=(
                _free_port(),
                model,
                blocks,
                microbatches,
                timeout_s,
                self.commands,
                self.results,
            ),
            nprocs=WORLD,
            join=False,
        )

    def wait_ready(self) -> None:
        """Wait until every rank has joined the group and built its stage."""
        self._collect("start")

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on one global batch; its mean micro-batch loss."""
        for rank, queue in enumerate(self.commands):
            queue.put((inputs if rank == 0 else None, targets if rank == WORLD - 1 else None))
        return self._collect("step")[WORLD - 1]

    def _collect(self, what: str) -> dict[int, Any]:
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(replies) < WORLD:
            try:
                rank, value = self.results.get(timeout=1.0)
            except Exception:  # queue.Empty: check that every process still lives
                dead = [p.pid for p in self.processes.processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"torch pipeline {what}: processes {dead} died"
                        if dead
                        else f"torch pipeline {what} took over {self.timeout_s:g} s"
                    ) from None
                continue
            if isinstance(value, str) and value.startswith("error"):
                raise RuntimeError(f"torch pipeline rank {rank} failed during {what}: {value}")
            replies[rank] = value
        return replies

    def close(self) -> None:
        """Stop every process (politely, then by force)."""
        for queue in self.commands:
            try:
                queue.put(None)
            except Exception:  # queue already closed: the process is gone
                pass
        deadline = time.monotonic() + 10
        for process in self.processes.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


# --------------------------------------------------------------------------- ours


# --------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timed(run: Any, *args: Any) -> tuple[float, float]:
    started = time.perf_counter()
    loss = run(*args)
    return time.perf_counter() - started, loss


def run(args: argparse.Namespace) -> int:
    import ray

    import hierarchical_ap as hap
    from hierarchical_ap.models import from_spec
    from hierarchical_ap.models.bundle import causal_lm_loss
    from runtime.step_trace import stage_compute_means

    workload = Workload(
        spec=gpt_spec(args),
        global_batch=args.global_batch,
        microbatches=args.microbatches,
        seq=args.seq,
        vocab=args.vocab,
    )
    if args.layers < WORLD:
        raise SystemExit(f"--layers {args.layers}: {WORLD} stages need at least {WORLD} blocks")
    if args.global_batch % args.microbatches or args.microbatches < WORLD:
        raise SystemExit(
            f"--global-batch {args.global_batch} must split into --microbatches "
            f"{args.microbatches} equal parts, and 1F1B needs at least {WORLD} micro-batches"
        )
    total = args.warmup + args.steps
    batches = workload.batches(total)
    torch.manual_seed(0)
    model = from_spec(workload.spec, batch=args.global_batch, seq=args.seq, device="cpu").model
    plan = plan_gpt(
        model,
        hap.Cluster.local_cpu(WORLD),
        batches[0],
        pp=WORLD,
        dp=1,
        micro_batch_size=workload.micro_batch_size,
    )
    blocks = stage_blocks(plan)
    print(
        f"model {workload.spec}; global batch {workload.global_batch} = {workload.microbatches} "
        f"micro-batches of {workload.micro_batch_size}; blocks per stage {blocks}; "
        f"{THREADS_PER_WORKER} thread per worker; {args.warmup} warm-up + {args.steps} timed "
        "steps per side, alternating",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as scratch:
        probed = probed_cluster(args, WORLD, Path(scratch))
    simulation = simulate_plan(model, plan, probed, batches[0])

    start_local_ray(WORLD)
    executable = None
    pipeline = None
    try:
        executable = hap.compile_parallel(
            model,
            hap.Cluster.local_cpu(WORLD),
            example_inputs=(batches[0][0],),
            targets=batches[0][1],
            loss_fn=causal_lm_loss,
            optimizer_fn=adamw,
            plan=plan,
        )
        pipeline = TorchPipeline(model, blocks, workload.microbatches, args.step_timeout)
        pipeline.wait_ready()
        ours_times, torch_times, ours_losses, torch_losses = [], [], [], []
        for step, (inputs, targets) in enumerate(batches):
            t_ours, loss_ours = _timed(executable.train_step, (inputs,), targets)
            t_torch, loss_torch = _timed(pipeline.step, inputs, targets)
            ours_losses.append(loss_ours)
            torch_losses.append(loss_torch)
            if step >= args.warmup:
                ours_times.append(t_ours)
                torch_times.append(t_torch)
        measured_stages = stage_compute_means(executable.last_step_trace())
    finally:
        if pipeline is not None:
            pipeline.close()
        if executable is not None:
            executable.shutdown()
        ray.shutdown()

    report(ours_times, torch_times, ours_losses, torch_losses, simulation.step_time_s)
    report_stages(measured_stages, simulation)
    return 0


def report(
    ours: list[float],
    theirs: list[float],
    ours_losses: list[float],
    torch_losses: list[float],
    predicted: float,
) -> None:
    """Print the figures (times in ms)."""
    ours_s, torch_s = statistics.median(ours), statistics.median(theirs)
    ratio = ours_s / torch_s
    paired = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    loss_gap = max(abs(a - b) for a, b in zip(ours_losses, torch_losses, strict=True))
    if ratio <= TARGET_RATIO:
        verdict = "target met"
    elif ratio <= CEILING_RATIO:
        verdict = "above target, under ceiling"
    else:
        verdict = "NOT met"
    print(f"losses (ours):  first {ours_losses[0]:.6f} last {ours_losses[-1]:.6f}")
    print(f"losses (torch): first {torch_losses[0]:.6f} last {torch_losses[-1]:.6f}")
    print(f"largest loss difference over {len(ours_losses)} steps: {loss_gap:.2e}")
    for name, times in (("hierarchical-ap 1F1B", ours), ("torch.distributed.pipelining", theirs)):
        print(
            f"{name:<30} median step {statistics.median(times) * 1e3:8.1f} ms "
            f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, {len(times)} steps)"
        )
    print(
        f"ratio ours / torch: {ratio:.3f} (median of paired steps {paired:.3f}); target <= "
        f"{TARGET_RATIO:.2f}, ceiling {CEILING_RATIO:.2f}: {verdict}"
    )
    for name, measured in (("ours", ours_s), ("torch", torch_s)):
        error = measured / predicted - 1
        within = "within" if abs(error) <= SIMULATOR_TOLERANCE else "outside"
        print(
            f"simulator on the probed cluster: predicted {predicted * 1e3:.1f} ms, measured "
            f"({name}) {measured * 1e3:.1f} ms, error {error:+.1%} ({within} "
            f"{SIMULATOR_TOLERANCE:.0%})"
        )


def report_stages(measured: dict[int, Any], simulation: Any) -> None:
    """Per stage, the last step's measured mean forward / backward of one micro-batch and
    optimizer step (``ParallelExecutable.last_step_trace``) against the simulator's."""
    print("per stage (ms), measured in our last step / simulated:")
    for stage, times in measured.items():
        estimate = simulation.stages[stage]
        print(
            f"  stage {stage}: forward {times.forward_s * 1e3:6.2f} / "
            f"{estimate.forward_s * 1e3:6.2f}   backward {times.backward_s * 1e3:6.2f} / "
            f"{estimate.backward_s * 1e3:6.2f}   optimizer step {times.optimizer_s * 1e3:6.2f} / "
            f"{estimate.optimizer_s * 1e3:6.2f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, layers=4, warmup=3, steps=10, workers=WORLD)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument(
        "--step-timeout", type=float, default=120.0, help="seconds one torch step may take"
    )
    args = parser.parse_args(argv)
    check_steps(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_WORKER))
    return run_with_timeout(lambda: run(args), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
