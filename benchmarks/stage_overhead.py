"""What the runtime's stage execution costs over eager PyTorch, on one CPU worker.

One ``runtime.worker.PipelineWorker`` in this process (a one-rank gloo group, no Ray) runs
the whole model as one stage (``tp = pp = dp = 1``): its captured graph slice, its gradient
accumulation over the micro-batches and its optimizer step. The same model, batches,
micro-batching, loss and optimizer then run eagerly (``loss / m`` backward per micro-batch,
one AdamW step). Steps alternate between the two; the median step of each after warm-up and
the ratio runtime / eager are printed, with the largest loss difference (the two compute the
same thing). A ratio near 1 says the pipeline benchmark's comparison is of the schedules and
transfers, not of how a stage runs.

Run: ``.venv/bin/python benchmarks/stage_overhead.py [--steps 10]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from hierarchical_ap.api import manual_plan
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.models import from_spec
from hierarchical_ap.models.bundle import causal_lm_loss
from runtime.worker import PipelineWorker, TrainingProgram

SPEC = "gpt:layers=4,hidden=256,heads=4,vocab=1024,seq=64,tied=0"
"""The model of ``runtime_vs_torch_pipelining.py``."""


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch, m = args.global_batch, args.microbatches
    model = from_spec(SPEC, batch=batch, seq=64, device="cpu").model
    inputs = torch.randint(0, 1024, (batch, 64))
    targets = torch.randint(0, 1024, (batch, 64))
    plan = manual_plan(
        model,
        Cluster.local_cpu(1),
        (inputs,),
        targets=targets,
        loss_fn=causal_lm_loss,
        tp=1,
        pp=1,
        dp=1,
        micro_batch_size=batch // m,
        schedule="1f1b",
    )
    worker = PipelineWorker(0, 1, "gloo", 60.0)
    rendezvous = tempfile.TemporaryDirectory()
    worker.join(f"file://{rendezvous.name}/store")
    try:
        worker.build(
            TrainingProgram(
                plan=plan,
                model=copy.deepcopy(model),
                microbatch_inputs=(inputs[: batch // m],),
                microbatch_targets=targets[: batch // m],
                loss_fn=causal_lm_loss,
                optimizer_fn=adamw,
            )
        )
        eager = copy.deepcopy(model)
        optimizer = adamw(list(eager.parameters()))

        def eager_step() -> float:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for x, y in zip(inputs.chunk(m), targets.chunk(m), strict=True):
                loss = causal_lm_loss(eager(x), y)
                (loss / m).backward()
                total += float(loss) / m
            optimizer.step()
            return total

        ours, theirs, gaps = [], [], []
        for step in range(args.warmup + args.steps):
            started = time.perf_counter()
            losses = worker.train_step((inputs,), targets)
            middle = time.perf_counter()
            eager_loss = eager_step()
            ended = time.perf_counter()
            gaps.append(abs(sum(losses) / m - eager_loss))
            if step >= args.warmup:
                ours.append(middle - started)
                theirs.append(ended - middle)
    finally:
        dist.destroy_process_group()
        rendezvous.cleanup()
    ours_s, eager_s = statistics.median(ours), statistics.median(theirs)
    print(f"model {SPEC}; global batch {batch} = {m} micro-batches; 1 thread")
    print(f"runtime stage (PipelineWorker)  median step {ours_s * 1e3:7.1f} ms")
    print(f"eager PyTorch                   median step {eager_s * 1e3:7.1f} ms")
    print(f"ratio runtime / eager: {ours_s / eager_s:.3f}; largest loss difference {max(gaps):.2e}")


if __name__ == "__main__":
    main()
