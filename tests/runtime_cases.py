"""Models, batches, plans and the single-process reference shared by the runtime tests."""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from hierarchical_ap.api import compile_parallel, manual_plan
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.models import from_spec, init_module_weights, materialize
from hierarchical_ap.plan import ParallelPlan
from runtime.worker import PipelineWorker, TrainingProgram

TOLERANCE = 1e-5
#: bf16 against the bf16 reference (why these: ``tests/test_runtime_precision.py``).
BF16_LOSS_RTOL = 1e-2
BF16_PARAM_ATOL, BF16_PARAM_RTOL = 2e-3, 1e-2
LEARNING_RATE = 0.1
BATCH, SEQ = 8, 8


class BlockMLP(nn.Module):
    """An MLP of identical blocks (so the planner's block layers split it evenly)."""

    def __init__(self, width: int = 16, depth: int = 5, classes: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)
        )
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class BlockCNN(nn.Module):
    """A convolutional net of identical conv → batch norm → ReLU blocks (training-mode batch
    norms: running statistics updated in place on every forward), pooled into a classifier."""

    def __init__(self, channels: int = 8, depth: int = 5, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x.mean((2, 3)))


ROOT = Path(__file__).resolve().parent.parent


def worker_pythonpath() -> str:
    """This checkout first, then whatever this process was given (packages installed beside
    the interpreter's own)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


@contextmanager
def local_ray(num_cpus: int, num_gpus: int = 0) -> Iterator[None]:
    """A local Ray session with ``num_cpus`` logical CPUs (and ``num_gpus`` GPUs) whose
    workers import this checkout, one thread each; shut down on exit."""
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath(), "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LEARNING_RATE)


def sgd_momentum(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum: optimizer state (one buffer per parameter) whose steps stay
    proportional to the gradients, so rounding noise stays rounding noise (Adam's first steps
    are ``lr · sign(grad)`` and turn noise in near-zero gradients into full-size steps)."""
    return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=0.9)


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with ``eps`` well above rounding noise: attention's key bias has a gradient that is
    zero in exact arithmetic, and Adam would scale its ~1e-10 rounding noise (which differs
    between any two summation orders) up to full-size steps."""
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-6)


def warmup_then_cosine(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Two steps of linear warm-up from a quarter of the rate, then cosine annealing: a
    schedule whose rates follow from the current one (``CosineAnnealingLR``'s recursive form)
    and that switches schedules on a milestone."""
    schedules = torch.optim.lr_scheduler
    warmup = schedules.LinearLR(optimizer, start_factor=0.25, total_iters=2)
    cosine = schedules.CosineAnnealingLR(optimizer, T_max=4)
    return schedules.SequentialLR(optimizer, [warmup, cosine], milestones=[2])


@dataclass
class Case:
    """A model (real weights, or meta: ``compile_parallel`` initialises it on the workers with
    ``init_seed=0``, ``reference_run`` with ``init_module_weights(model, 0)``), batches for
    several steps, and its loss."""

    model: nn.Module
    batches: list[tuple[Any, torch.Tensor]]
    """(inputs, targets) per step; inputs a tuple of positional or a dict of keyword tensors."""
    loss_fn: Callable[..., torch.Tensor]


ZOO = {
    "gpt": "gpt:layers=4,hidden=32,heads=4,vocab=64,seq=8",
    "gpt-dropout": "gpt:layers=4,hidden=32,heads=4,vocab=64,seq=8,dropout=0.1",
    "llama": "llama:layers=4,hidden=32,heads=4,kv_heads=2,ffn=64,vocab=64,seq=8",
    "hf-gpt2": "hf:gpt2:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=16",
    "hf-llama": (
        "hf:llama:num_hidden_layers=2,hidden_size=32,intermediate_size=64,"
        "num_attention_heads=4,num_key_value_heads=2,vocab_size=64"
    ),
}


MASKED = {"hf-gpt2-masked"}
"""Cases whose batches are keyword inputs: ``input_ids`` and a left-padding
``attention_mask``."""


def user_gpt2() -> nn.Module:
    """transformers' GPT-2 as a user builds it: the library's defaults (a key/value cache,
    its default attention), only dropout off so that runs can be compared."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def logits_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a transformers ``CausalLMOutput``'s logits."""
    return F.cross_entropy(output.logits.flatten(0, 1), labels.flatten())


def build_case(name: str, steps: int, *, meta: bool = False) -> Case:
    """The model ``name`` ("mlp", "cnn" or a ``ZOO`` key) with ``steps`` seeded batches of
    ``BATCH``."""
    generator = torch.Generator().manual_seed(1)
    classifiers = {"mlp": (BlockMLP, (16,), 8), "cnn": (BlockCNN, (3, 8, 8), 10)}
    if name in classifiers:
        build, sample_shape, classes = classifiers[name]
        torch.manual_seed(0)
        with torch.device("meta" if meta else "cpu"):
            model: nn.Module = build()
        batches = [
            (
                (torch.randn(BATCH, *sample_shape, generator=generator),),
                torch.randint(classes, (BATCH,), generator=generator),
            )
            for _ in range(steps)
        ]
        return Case(model, batches, class_loss)
    if name in MASKED:
        torch.manual_seed(0)
        with torch.device("meta" if meta else "cpu"):
            model = user_gpt2()
        loss_fn = logits_loss
    else:
        bundle = from_spec(ZOO[name], batch=BATCH, seq=SEQ, device="meta")
        model, loss_fn = bundle.model, bundle.loss_fn
        if not meta:
            torch.manual_seed(0)
            materialize(model)
    vocab = 64
    batches = []
    for _ in range(steps):
        tokens = torch.randint(vocab, (BATCH, SEQ + 1), generator=generator)
        ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if name in MASKED:
            padding = torch.randint(SEQ // 2, (BATCH, 1), generator=generator)
            mask = (torch.arange(SEQ) >= padding).long()  # up to SEQ/2 - 1 left-padding tokens
            batches.append(({"input_ids": ids, "attention_mask": mask}, labels))
        else:
            batches.append(((ids,), labels))
    return Case(model, batches, loss_fn)


def compile_case(
    case: Case, cluster: Cluster, plan: Any, optimizer_fn: Callable, **options: Any
) -> Any:
    """``compile_parallel`` of ``case``'s model on ``cluster`` under ``plan`` (a
    ``ParallelPlan``, a plan file or ``None`` to search), its first batch as the example;
    ``options`` are further ``compile_parallel`` arguments."""
    inputs, targets = case.batches[0]
    return compile_parallel(
        case.model,
        cluster,
        example_inputs=inputs,
        targets=targets,
        loss_fn=case.loss_fn,
        optimizer_fn=optimizer_fn,
        plan=plan,
        **options,
    )


def built_worker(plan: ParallelPlan, case: Case, optimizer_fn: Callable) -> PipelineWorker:
    """This torch.distributed rank's ``PipelineWorker`` (gloo), built for ``case`` under ``plan``
    with one micro-batch of the case's first batch as the example."""
    worker = PipelineWorker(dist.get_rank(), dist.get_world_size(), "gloo", 60.0)
    inputs, targets = case.batches[0]
    b = plan.global_batch // plan.num_microbatches
    worker.build(
        TrainingProgram(
            plan=plan,
            model=case.model,
            microbatch_inputs=tuple(t[:b] for t in inputs),
            microbatch_targets=targets[:b],
            loss_fn=case.loss_fn,
            optimizer_fn=optimizer_fn,
        )
    )
    return worker


def reference_run(
    case: Case,
    optimizer_fn: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    *,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    microbatches: int = 1,
    max_grad_norm: float | None = None,
    lr_scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None,
    grad_norms: list[float] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of each step and the final state dict (on the CPU), trained in this process on
    ``device`` (the model and the batches are moved there).

    ``microbatches`` > 1 accumulates gradients over that many equal chunks of each batch,
    each chunk's loss divided by their number (the step's loss is the sum of those), the way
    a training loop with gradient accumulation does; a model whose forward depends on the
    whole batch (batch norm) needs it to match a pipelined run.

    ``max_grad_norm`` clips with ``torch.nn.utils.clip_grad_norm_(model.parameters(), ·)``
    before each step (the norms it returns are appended to ``grad_norms``), and
    ``lr_scheduler_fn(optimizer)``'s schedule steps after each optimizer step.

    ``precision="bf16"`` is mixed precision done by hand, the way torch's own recipes do it
    (independent of the runtime's code): the model is the fp32 master the optimizer steps;
    each step runs forward and backward on a bf16 copy of it (``copy.deepcopy(model).to(
    torch.bfloat16)``, floating inputs cast to bf16, ``loss_fn`` as given), then each master
    parameter's gradient is the copy's gradient converted to fp32.

    A meta-device model starts from ``init_module_weights(model, seed=0)``, the public
    contract of ``compile_parallel``'s meta initialisation (``init_seed=0``)."""
    if microbatches > 1 and precision != "fp32":
        raise ValueError("the gradient-accumulation reference is fp32 only")
    model = case.model
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        init_module_weights(model, seed=0)
    model.to(device)
    optimizer = optimizer_fn(list(model.parameters()))
    scheduler = None if lr_scheduler_fn is None else lr_scheduler_fn(optimizer)
    losses = []
    for inputs, targets in case.batches:
        inputs, targets = pytree.tree_map(lambda x: x.to(device), (inputs, targets))
        optimizer.zero_grad()
        if precision == "fp32" and microbatches > 1:
            loss = torch.zeros(())
            for i in range(microbatches):
                chunk_inputs, chunk_targets = pytree.tree_map(
                    lambda x, i=i: x.chunk(microbatches)[i], (inputs, targets)
                )
                chunk_loss = case.loss_fn(_call(model, chunk_inputs), chunk_targets) / microbatches
                chunk_loss.backward()
                loss += chunk_loss.detach()
        elif precision == "fp32":
            loss = case.loss_fn(_call(model, inputs), targets)
            loss.backward()
        elif precision == "bf16":
            low = copy.deepcopy(model).to(torch.bfloat16)
            low_inputs = pytree.tree_map(
                lambda x: x.bfloat16() if x.is_floating_point() else x, inputs
            )
            loss = case.loss_fn(_call(low, low_inputs), targets)
            loss.backward()
            for master, copied in zip(model.parameters(), low.parameters(), strict=True):
                master.grad = None if copied.grad is None else copied.grad.float()
        else:
            raise ValueError(f"no reference for precision {precision!r}")
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if grad_norms is not None:
                grad_norms.append(norm.item())
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on a tuple of positional inputs or a dict of keyword inputs."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def plan_for(
    name: str,
    workers: int,
    *,
    tp: int,
    pp: int,
    dp: int,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    micro_batch_size: int = 1,
    precision: str = "fp32",
    cluster: Cluster | None = None,
) -> ParallelPlan:
    """The manual (Megatron-style) plan of model ``name`` on ``workers`` local CPU workers (or
    on ``cluster``), for training in ``precision``."""
    case = build_case(name, 1, meta=True)
    inputs, targets = case.batches[0]
    return manual_plan(
        case.model,
        Cluster.local_cpu(workers) if cluster is None else cluster,
        inputs,
        targets=targets,
        loss_fn=case.loss_fn,
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=micro_batch_size,
        schedule=schedule,
        virtual_stages=virtual_stages,
        precision=precision,
    )


COLUMN_PARALLEL = re.compile(
    r"((qkv_proj|q_proj|k_proj|v_proj|up_proj|gate_proj)|blocks\.[02468]\.0)\.(weight|bias)$"
)
"""Zoo projections, and the even blocks of ``BlockMLP``."""
ROW_PARALLEL = re.compile(r"(o_proj|down_proj|blocks\.[13579]\.0)\.weight$")


def megatron(plan: ParallelPlan) -> ParallelPlan:
    """``plan`` with Megatron-LM tensor parallelism on mesh axis 1 of every stage: column-
    parallel projections split their output features (weight and bias, dim 0), row-parallel
    ones their input features (weight dim 1); other parameters keep the plan's placement."""
    stages = []
    for stage in plan.stages:
        placements = dict(stage.param_placements)
        for fqn, (first, _) in stage.param_placements.items():
            if COLUMN_PARALLEL.search(fqn):
                placements[fqn] = (first, "S(0)")
            elif ROW_PARALLEL.search(fqn):
                placements[fqn] = (first, "S(1)")
        stages.append(replace(stage, param_placements=placements))
    return replace(plan, stages=tuple(stages))


def mismatch(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest excess of |actual - expected| over TOLERANCE·(1 + |expected|) (≤ 0: close)."""
    excess = (actual.double() - expected.double()).abs() - TOLERANCE * (1 + expected.double().abs())
    return excess.max().item()


def compare(
    losses: list[float],
    state: dict[str, torch.Tensor],
    reference: tuple[list[float], dict[str, Any]],
) -> dict[str, float]:
    """What differs from the reference beyond the tolerance (empty: equal)."""
    ref_losses, ref_state = reference
    bad = {}
    for step, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
        if abs(a - b) > TOLERANCE * (1 + abs(b)):
            bad[f"loss {step}"] = a - b
    assert set(state) == set(ref_state), set(state) ^ set(ref_state)
    for key, value in ref_state.items():
        err = mismatch(state[key], value)
        if err > 0:
            bad[key] = err
    return bad


def bf16_far(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Keys whose values differ from the bf16 reference beyond the bf16 parameter tolerance."""
    assert set(state) == set(reference), set(state) ^ set(reference)
    bad = {}
    for key, expected in reference.items():
        excess = (state[key].double() - expected.double()).abs() - (
            BF16_PARAM_ATOL + BF16_PARAM_RTOL * expected.double().abs()
        )
        if excess.max() > 0:
            bad[key] = float(excess.max())
    return bad


def check_bf16_losses(losses: list[float], bf16: list[float], fp32: list[float]) -> None:
    """Losses within ``BF16_LOSS_RTOL`` of the bf16 reference's, and the first step's nearer
    the bf16 reference than the fp32 one by ten times."""
    close = (math.isclose(a, b, rel_tol=BF16_LOSS_RTOL) for a, b in zip(losses, bf16, strict=True))
    assert all(close), (losses, bf16)
    # the first step's loss depends on the parameters only: bf16's, not fp32's
    assert abs(losses[0] - bf16[0]) * 10 < abs(losses[0] - fp32[0]), (losses, bf16, fp32)


def canonical_names(model: nn.Module) -> dict[str, str]:
    """State key → the key the runtime reports it under (the first name of a tied group)."""
    first: dict[int, str] = {}
    return {
        name: first.setdefault(id(p), name)
        for name, p in model.named_parameters(remove_duplicate=False)
    }


def microbatch_values(graph, stage_slice, case: Case, mb: int, rows: int) -> dict[str, Any]:
    """The values stage ``stage_slice`` reads from outside in micro-batch ``mb`` of ``rows``
    sequences: the rows of the case's first batch (inputs and targets), and seeded random
    received activations that need a gradient (the same on every rank)."""
    inputs, targets = case.batches[0]
    window = slice(mb * rows, (mb + 1) * rows)
    user = dict(zip(graph.model_inputs, [t[window] for t in inputs], strict=True))
    user.update(zip(graph.target_inputs, [targets[window]], strict=True))
    generator = torch.Generator().manual_seed(10 + mb)
    values: dict[str, Any] = {}
    for name in stage_slice.received:
        meta = graph.value_meta(name)
        values[name] = torch.randn(meta.shape, generator=generator).requires_grad_()
    values.update({n: user[n] for n in stage_slice.user_inputs})
    return values


def largest_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest elementwise |a_i − b_i| over two equally long lists of tensors (0 when empty)."""
    return max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True)), default=0.0)
