"""The front door: ``compile_parallel`` turns a model and a cluster into a running executable.

``compile_parallel`` captures the model once (meta device, dynamic batch), takes the plan it is
given (a ``ParallelPlan`` or a path to plan JSON, checked against the captured model and the
cluster) or searches one with ``stage_partitioner``, and starts the Ray runtime on it.
``manual_plan`` builds the plan of a Megatron-style configuration ``(tp, pp, dp, micro-batch,
schedule, v)`` priced by the planner's own costs, for runs that fix the parallelism by hand.

``precision`` (``"fp32"``, the default, or ``"bf16"``; see ``runtime.precision``) is the
training precision: planning captures the model converted to it (so memory accounting and the
plan's fingerprint are those of the program the workers run) with the planner's training
memory of that precision (fp32 masters and Adam state under bf16), and ``compile_parallel``
refuses a plan made for another precision.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import PlanError
from hierarchical_ap.graph import OpGraph, capture
from hierarchical_ap.plan import ParallelPlan
from runtime.executable import ParallelExecutable, check_max_grad_norm
from runtime.precision import cast_floating, compute_dtype, policy_for
from runtime.worker import (
    LRSchedulerFn,
    OptimizerFn,
    is_on_meta,
    meta_copy,
    model_leaves,
    to_meta,
)

__all__ = ["ParallelExecutable", "compile_parallel", "manual_plan", "search_plan"]

PlanSource = ParallelPlan | str | os.PathLike[str] | None


def capture_for_planning(
    model: nn.Module,
    example_inputs: Any,
    *,
    targets: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    precision: str = "fp32",
) -> OpGraph:
    """The model (a meta-device copy when it has weights) captured with a dynamic batch, in
    ``precision``'s compute dtype (floating parameters, buffers and inputs converted, as the
    workers capture it)."""
    dtype = compute_dtype(precision)
    if not is_on_meta(model) or dtype is not None:
        model = meta_copy(model, dtype)
    return capture(
        model,
        cast_floating(to_meta(example_inputs), dtype),
        loss_fn=loss_fn,
        targets=to_meta(targets),
        dynamic_batch=True,
    )


def global_batch_of(example_inputs: Any) -> int:
    leaves = model_leaves(example_inputs)
    if not leaves or not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in leaves):
        raise ValueError(
            "example_inputs must hold tensors whose dim 0 is the batch; got "
            f"{[type(t).__name__ for t in leaves]}"
        )
    return int(leaves[0].shape[0])


def search_plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs: Any,
    *,
    targets: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    graph: OpGraph | None = None,
    precision: str = "fp32",
) -> ParallelPlan:
    """The planner's best plan for training ``model`` on ``cluster`` in ``precision`` (Adam
    memory; fp32 masters under bf16); ``graph`` is the model's ``capture_for_planning`` in
    that precision when the caller has it already."""
    from stage_partitioner.model_planning import training_memory_for
    from stage_partitioner.planner import PlannerOptions, plan_parallel

    if graph is None:
        graph = capture_for_planning(
            model, example_inputs, targets=targets, loss_fn=loss_fn, precision=precision
        )
    plan, _ = plan_parallel(
        graph,
        cluster,
        PlannerOptions(global_batch=global_batch_of(example_inputs)),
        training_memory=training_memory_for(precision),
        model_name=type(model).__name__,
        precision=precision,
    )
    return plan


def manual_plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs: Any,
    *,
    tp: int,
    pp: int,
    dp: int,
    micro_batch_size: int,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    targets: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    precision: str = "fp32",
) -> ParallelPlan:
    """The plan of a Megatron-style configuration: ``pp·v`` equal chunks of the model's blocks,
    each rank a ``(dp, tp)`` mesh, ``dp·micro_batch_size`` sequences per micro-batch, and per
    stage the intra-op ILP's parameter placements on that mesh, priced for training in
    ``precision``."""
    from stage_partitioner.manual import ManualConfig, simulate_manual
    from stage_partitioner.model_planning import planning_context
    from stage_partitioner.planner import PlannerOptions, to_parallel_plan

    graph = capture_for_planning(
        model, example_inputs, targets=targets, loss_fn=loss_fn, precision=precision
    )
    options = PlannerOptions(global_batch=global_batch_of(example_inputs), workers=1)
    context = planning_context(graph, cluster, options, precision)
    config = ManualConfig(
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=micro_batch_size,
        schedule=schedule,
        virtual_stages=virtual_stages,
    )
    result = simulate_manual(context, config)
    if result is None:
        raise PlanError(f"{config.describe()} has no sharding on this cluster's meshes")
    candidate, simulation = result
    return to_parallel_plan(
        candidate,
        simulation,
        graph,
        cluster,
        context.solver,
        model_name=type(model).__name__,
        precision=precision,
        notes=(config.describe(),),
    )


def compile_parallel(
    model: nn.Module,
    cluster: Cluster,
    *,
    example_inputs: Any,
    targets: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    optimizer_fn: OptimizerFn,
    plan: PlanSource = None,
    precision: str = "fp32",
    init_seed: int = 0,
    max_grad_norm: float | None = None,
    lr_scheduler_fn: LRSchedulerFn | None = None,
    timeout_s: float = 60.0,
) -> ParallelExecutable:
    """Plan (unless ``plan`` is given) and start training ``model`` on ``cluster``.

    ``example_inputs`` is one global batch (tuple or dict of tensors, dim 0 the batch),
    ``targets`` what ``loss_fn(model(*inputs), targets)`` takes (omit ``loss_fn`` when the
    model returns a scalar loss), ``optimizer_fn(params)`` builds the optimizer on each
    worker's parameter shards.

    Each ``train_step`` is one process's ``zero_grad``, forward and backward, then, with
    ``max_grad_norm``, ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)``
    over the whole model (``ParallelExecutable.last_grad_norm`` is the norm it returned), then
    ``optimizer.step()`` and, with ``lr_scheduler_fn``, ``scheduler.step()`` of the schedule
    ``lr_scheduler_fn(optimizer)`` built on every worker (any ``torch.optim.lr_scheduler``
    stepped once per optimizer step; checkpoints carry its state).

    Initial weights. A model with real weights is sharded from those weights. A model on the
    meta device is initialised on the workers, shard by shard: each worker allocates only the
    shards of its stages' parameters and buffers and runs the model's own initialisation
    (``reset_parameters`` / ``init_weights``) for them, with every random draw keyed by
    ``(init_seed, FQN, index)`` instead of the global RNG (the contract, and what is
    materialised when an initialisation cannot be replayed on a shard, are in
    ``hierarchical_ap.models.materialize``). The weights are exactly those of
    ``hierarchical_ap.models.init_module_weights(model, init_seed)``, the whole model in one
    process: start a single-process reference from it to reproduce a parallel run.
    ``init_seed`` also seeds the workers' random ops (dropout): every device of pipeline rank
    r draws from one stream, ``init_seed + 2²⁰·r``, so the same seed and plan repeat a run.
    ``timeout_s`` bounds collectives and the start-up. ``precision`` is ``"fp32"`` or
    ``"bf16"`` (bf16 compute and activations, fp32 master weights, optimizer state and gradient
    reduction; see ``runtime.precision``). Raises ``UnsupportedPrecisionError`` for
    ``"fp16"`` (it needs loss scaling) and ``PlanError`` when the plan does not match the
    model, the cluster or the precision.
    """
    policy_for(precision)
    check_max_grad_norm(max_grad_norm)
    if plan is not None and not isinstance(plan, ParallelPlan):
        plan = ParallelPlan.load(Path(plan))
    if plan is not None and plan.precision != precision:
        raise PlanError(
            f"the plan is for {plan.precision} training but compile_parallel was asked for "
            f"precision={precision!r}; pass precision={plan.precision!r} or re-plan for "
            f"{precision} (manual_plan / search_plan with precision={precision!r}, or "
            f"`hap plan --precision {precision}`)"
        )
    graph = capture_for_planning(
        model, example_inputs, targets=targets, loss_fn=loss_fn, precision=precision
    )
    if plan is None:
        plan = search_plan(
            model,
            cluster,
            example_inputs,
            targets=targets,
            loss_fn=loss_fn,
            graph=graph,
            precision=precision,
        )
    plan.check_matches(graph, cluster)
    batch = global_batch_of(example_inputs)
    if batch != plan.global_batch:
        raise PlanError(
            f"the plan is for a global batch of {plan.global_batch} but example_inputs hold "
            f"{batch}; pass a batch of {plan.global_batch} or re-plan for {batch}"
        )
    return ParallelExecutable.start(
        plan,
        cluster,
        model,
        example_inputs,
        targets,
        loss_fn,
        optimizer_fn,
        init_seed=init_seed,
        max_grad_norm=max_grad_norm,
        lr_scheduler_fn=lr_scheduler_fn,
        timeout_s=timeout_s,
    )
