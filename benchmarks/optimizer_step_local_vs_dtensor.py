"""The runtime's optimizer step on a two-device mesh: plain aliases of the local shards against
the DTensor parameters themselves (``runtime.optimizer.ShardOptimizer``, ``local=None`` against
``local=False``), in one run.

Two gloo processes (one intra-op thread each, as the runtime's workers) hold the parameters of
``--layers`` GPT blocks of width ``--hidden`` (QKV, projection and the two MLP matrices with
their biases, two layer norms) as DTensors on a (2,) mesh, laid out

* data-parallel: every parameter replicated (each rank updates the whole tensor);
* ZeRO / tensor-parallel: every parameter sharded along dim 0 (each rank updates half).

For each layout and path AdamW takes ``--warmup`` untimed steps and ``--steps`` timed ones on
fixed gradients; a step's time is the slower rank's (the two alternate paths step by step, so
load from other processes falls on both alike). Printed per layout: the median step of each
path and the ratio local / DTensor (lower is better; the two paths give identical updates,
``tests/test_shard_optimizer.py``).

Run: ``.venv/bin/python benchmarks/optimizer_step_local_vs_dtensor.py [--steps 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor

from runtime.optimizer import ShardOptimizer

WORLD_SIZE = 2
LAYOUTS: dict[str, Placement] = {"data-parallel (R)": Replicate(), "sharded (S(0))": Shard(0)}


def block_shapes(hidden: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of ``layers`` GPT blocks of width ``hidden``."""
    block = [
        (3 * hidden, hidden),
        (3 * hidden,),
        (hidden, hidden),
        (hidden,),
        (4 * hidden, hidden),
        (4 * hidden,),
        (hidden, 4 * hidden),
        (hidden,),
        (hidden,),
        (hidden,),
        (hidden,),
        (hidden,),
    ]
    return block * layers


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def step_seconds(optimizer: ShardOptimizer) -> float:
    """One step's time on the slower rank."""
    dist.barrier()
    started = time.perf_counter()
    optimizer.step()
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=args.timeout),
    )
    try:
        mesh = DeviceMesh("cpu", list(range(WORLD_SIZE)))
        shapes = block_shapes(args.hidden, args.layers)
        generator = torch.Generator().manual_seed(0)
        values = [torch.randn(s, generator=generator) for s in shapes]
        grads = [torch.randn(s, generator=generator) for s in shapes]
        for layout, placement in LAYOUTS.items():
            paths = {}
            for local in (None, False):
                params = [
                    nn.Parameter(distribute_tensor(v.clone(), mesh, [placement])) for v in values
                ]
                for p, g in zip(params, grads, strict=True):
                    p.grad = distribute_tensor(g, mesh, [placement])
                paths[local] = ShardOptimizer(adamw, params, local=local)
            assert paths[None].local and not paths[False].local
            times: dict[bool | None, list[float]] = {None: [], False: []}
            for step in range(args.warmup + args.steps):
                for local, optimizer in paths.items():
                    seconds = step_seconds(optimizer)
                    if step >= args.warmup:
                        times[local].append(seconds)
            if rank == 0:
                results[layout] = (statistics.median(times[None]), statistics.median(times[False]))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.start_processes(
            measure, args=(free_port(), args, results), nprocs=WORLD_SIZE, join=False
        )
        deadline = time.monotonic() + args.timeout
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise SystemExit(f"did not finish within {args.timeout:g} s")
        elements = sum(torch.Size(s).numel() for s in block_shapes(args.hidden, args.layers))
        print(
            f"AdamW on {args.layers} GPT block(s) of width {args.hidden} ({elements:,} elements), "
            f"{WORLD_SIZE} gloo ranks, 1 thread each; median of {args.steps} steps after "
            f"{args.warmup} warm-up, slower rank"
        )
        for layout, (local, dtensor) in results.items():
            print(
                f"{layout:20s} local shards {local * 1e3:7.2f} ms   DTensor {dtensor * 1e3:7.2f} "
                f"ms   ratio local / DTensor {local / dtensor:.3f}"
            )


if __name__ == "__main__":
    main()
