"""Plan and train a small GPT on Ray workers with hierarchical-ap.

The planner (Alpa's stage DP over the intra-op ILP) picks pipeline stages, their submeshes and
shardings for the model on the cluster; the plan is printed; then ``compile_parallel`` starts
one Ray actor per device and trains for ``--steps`` AdamW steps (linear warm-up over
``--warmup`` steps, then cosine decay to a tenth of ``--lr``; gradients clipped to
``--max-grad-norm``), with a progress bar that shows the loss and the gradient norm, then
evaluates a held-out batch (``eval_step``). The data is a learnable synthetic task: each sequence counts up from a random
token (``t, t+1, t+2, ...`` modulo the vocabulary), so the loss falls from about
``ln(vocab)`` towards zero as the model learns the successor of every token.

The model is built on the meta device and initialised on the workers, so the same script
serves models too large for the driver.

    python examples/train_gpt.py                       # 4 local Ray CPU workers (gloo)
    python examples/train_gpt.py --cluster local:2 --steps 5
    python examples/train_gpt.py --cluster auto        # an existing Ray cluster (CPU or GPU)
    ray job submit -- python examples/train_gpt.py --cluster auto

It reads no input and ends with exit status 0 once training is done (2 on a bad argument or
a plan that cannot be made, with the reason on stderr).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

DEFAULT_MODEL = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Plan and train a small GPT on Ray workers with hierarchical-ap."
    )
    parser.add_argument(
        "--cluster",
        default="local:4",
        help="local:N for N local Ray CPU workers (default local:4), or auto for the running "
        "Ray cluster (Cluster.from_ray('auto'))",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"a GPT or LLaMA zoo spec (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    parser.add_argument(
        "--warmup", type=int, default=3, help="steps of linear learning-rate warm-up (default 3)"
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="clip gradients to this global L2 norm (default 1.0; 0 does not clip)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default) or bf16: bf16 compute with fp32 master weights and optimizer state",
    )
    parser.add_argument(
        "--plan", default=None, help="a plan JSON (from `hap plan -o`) to use instead of searching"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.global_batch < 1:
        parser.error("--steps and --global-batch must be positive")
    if args.warmup < 0 or args.max_grad_norm < 0:
        parser.error("--warmup and --max-grad-norm must not be negative")
    return args


def warmup_cosine_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) over the peak: ``(step+1)/warmup``
    during the warm-up, then a cosine from 1 down to 0.1 at the last of ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def cluster_of(text: str) -> Any:
    """``local:N`` → ``Cluster.local_cpu(N)``; ``auto`` (or a Ray address) → ``Cluster.from_ray``."""
    from hierarchical_ap import Cluster
    from hierarchical_ap.errors import ClusterSpecError

    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise ClusterSpecError(f"--cluster {text!r}: write local:N with N ≥ 1, e.g. local:4")
        return Cluster.local_cpu(int(count))
    return Cluster.from_ray(text)


def counting_batch(
    batch: int, seq: int, vocab: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``s, s+1, …`` (mod ``vocab``) from random starts ``s``: input ids (batch, seq)
    and their next tokens."""
    starts = torch.randint(vocab, (batch, 1), generator=generator)
    tokens = (starts + torch.arange(seq + 1)) % vocab
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train(args: argparse.Namespace, console: Console) -> tuple[float, float, float]:
    """Plan, print the plan, train; the first and last step's loss and the eval-mode loss of
    a held-out batch."""
    import hierarchical_ap as hap
    from hierarchical_ap.api import search_plan
    from hierarchical_ap.commands.plan import render
    from hierarchical_ap.models import from_spec

    cluster = cluster_of(args.cluster)
    bundle = from_spec(args.model, batch=args.global_batch, device="meta")
    if bundle.config is None:
        raise hap.HapError(f"--model {args.model!r} has no vocabulary to draw tokens from")
    seq, vocab = bundle.config.seq, bundle.config.vocab
    generator = torch.Generator().manual_seed(args.seed)
    batches = [counting_batch(args.global_batch, seq, vocab, generator) for _ in range(args.steps)]
    held_out = counting_batch(args.global_batch, seq, vocab, generator)
    inputs, targets = batches[0]
    console.print(
        f"[bold]{args.model}[/bold] on {cluster.num_devices} {cluster.device.name} worker(s); "
        f"global batch {args.global_batch}, {args.steps} steps, {args.precision}"
    )
    if args.plan is None:
        with console.status("planning"):
            plan = search_plan(
                bundle.model,
                cluster,
                (inputs,),
                targets=targets,
                loss_fn=bundle.loss_fn,
                precision=args.precision,
            )
    else:
        plan = hap.ParallelPlan.load(args.plan)
    render(plan, console)
    with console.status(f"starting {cluster.num_devices} Ray workers"):
        executable = hap.compile_parallel(
            bundle.model,
            cluster,
            example_inputs=(inputs,),
            targets=targets,
            loss_fn=bundle.loss_fn,
            optimizer_fn=functools.partial(torch.optim.AdamW, lr=args.lr),
            plan=plan,
            init_seed=args.seed,
            precision=args.precision,
            max_grad_norm=args.max_grad_norm or None,
            lr_scheduler_fn=functools.partial(
                torch.optim.lr_scheduler.LambdaLR,
                lr_lambda=functools.partial(
                    warmup_cosine_factor, warmup=args.warmup, total=args.steps
                ),
            ),
        )
    losses: list[float] = []
    with executable, _progress(console) as progress:
        task = progress.add_task("training", total=args.steps, loss=math.nan, norm=math.nan)
        for step_inputs, step_targets in batches:
            losses.append(executable.train_step((step_inputs,), step_targets))
            norm = executable.last_grad_norm
            progress.update(
                task, advance=1, loss=losses[-1], norm=math.nan if norm is None else norm
            )
        eval_loss = executable.eval_step((held_out[0],), held_out[1])
    return losses[0], losses[-1], eval_loss


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("grad norm {task.fields[norm]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def main(argv: list[str] | None = None) -> int:
    from hierarchical_ap.errors import HapError

    args = parse_args(argv)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)  # a log (make, a Ray job): room for the plan's table
    try:
        first, last, eval_loss = train(args, console)
    except HapError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    console.print(f"first loss: {first:.6f}", highlight=False)
    console.print(f"last loss: {last:.6f}", highlight=False)
    console.print(f"eval loss (held-out batch): {eval_loss:.6f}", highlight=False)
    if not all(math.isfinite(loss) for loss in (first, last, eval_loss)):
        Console(stderr=True).print("[red]error:[/red] the loss is not finite", highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
