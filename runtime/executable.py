"""``ParallelExecutable``: the driver's handle on a plan running on Ray workers.

``train_step(inputs, targets)`` checks the batch against the example the executable was built
for (``ValueError`` before any worker runs), puts it in Ray's object store once and starts the
step on every worker: the model inputs go to the workers whose stages read them (the first
stage), the targets to those that read them (the last). The workers run their instruction lists
among themselves; the driver only waits. A worker that dies, or fails, makes the step raise
``WorkerFailedError`` naming the worker's rank and stage as soon as Ray reports it; a step that
does not finish within the time limit raises it too. After such an error the executable is
unusable; ``shutdown`` (also on ``with`` exit) kills every actor in any case.

``last_step_trace()`` returns every worker's measured timeline of the last step
(``runtime.step_trace``): per instruction, and the closing gradient sync and optimizer step.

``save_checkpoint(path)`` / ``load_checkpoint(path)`` write and restore the sharded parameters
and optimizer state with ``torch.distributed.checkpoint`` (``runtime.checkpoint``); a checkpoint
loads into an executable of any plan for the same model, and ``steps`` counts on from it.
Checkpoints identify the model by its parameters as stored (``runtime.precision``'s
``master_fingerprint``: fp32 masters under bf16), so they load across precisions too.

The plan's ``precision`` is the training precision (``runtime.precision``); ``start`` refuses
one the runtime cannot train in (fp16) before any actor starts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
import torch
import torch.utils._pytree as pytree
from torch import nn

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import WorkerFailedError
from hierarchical_ap.plan import ParallelPlan
from runtime import checkpoint
from runtime.actors import ensure_ray, start_actors, stop_actors
from runtime.precision import policy_for
from runtime.step_trace import TimedOp
from runtime.worker import LRSchedulerFn, OptimizerFn, TrainingProgram, model_leaves

logger = logging.getLogger(__name__)

FAILURE_GRACE_S = 5.0
INLINE_BATCH_BYTES = 100 * 1024
"""A batch part (inputs or targets) up to this size travels inside each worker's task, as Ray
inlines small arguments (its default ``max_direct_call_object_size``); a larger one is put in
the object store once and read from there by the workers that need it."""
"""After a worker reports an error, how long to wait for a peer's death to be reported (the
death is the cause worth naming)."""


class ParallelExecutable:
    """A model compiled for a plan and running on one Ray actor per device."""

    def __init__(
        self,
        plan: ParallelPlan,
        workers: list[Any],
        roles: list[dict[str, Any]],
        example: tuple[Any, Any],
        state_keys: Mapping[str, str],
        cleanup: Callable[[], None],
        timeout_s: float,
    ) -> None:
        self.plan = plan
        self.workers = workers
        self._roles = roles
        self._example_inputs = model_leaves(example[0])
        self._example_targets = pytree.tree_leaves(example[1])
        self._state_keys = state_keys
        self._cleanup: Callable[[], None] | None = cleanup
        self._timeout_s = timeout_s
        self._broken: str | None = None
        self._tensors: checkpoint.TensorListing = {}
        self._master_fingerprint = plan.model_fingerprint
        """The fingerprint checkpoints carry (the workers' ``master_fingerprint``)."""
        self.steps = 0
        """Optimizer steps taken (counted on from a loaded checkpoint's)."""

    @classmethod
    def start(
        cls,
        plan: ParallelPlan,
        cluster: Cluster,
        model: nn.Module,
        example_inputs: Any,
        targets: Any,
        loss_fn: Callable[..., torch.Tensor] | None,
        optimizer_fn: OptimizerFn,
        *,
        init_seed: int = 0,
        max_grad_norm: float | None = None,
        lr_scheduler_fn: LRSchedulerFn | None = None,
        timeout_s: float = 60.0,
    ) -> ParallelExecutable:
        """Start the actors and build every stage (see ``runtime.worker``): a model with real
        weights is sharded from them; a meta-device model is initialised on the workers, each
        its own shards, with the weights of ``init_module_weights(model, init_seed)``
        (``hierarchical_ap.models.materialize``). ``max_grad_norm`` clips the gradients by
        their global L2 norm before every optimizer step; ``lr_scheduler_fn(optimizer)`` builds
        a learning-rate schedule on every worker, stepped after each optimizer step. Raises
        ``UnsupportedPrecisionError`` for a plan in a precision the runtime cannot train in,
        ``ValueError`` for a ``max_grad_norm`` that is not positive."""
        policy_for(plan.precision)
        check_max_grad_norm(max_grad_norm)
        _check_batch(
            model_leaves(example_inputs), pytree.tree_leaves(targets), plan.num_microbatches
        )
        started_ray = ensure_ray(cluster)
        actors, groups = [], []

        def cleanup() -> None:
            stop_actors(actors, groups)
            if started_ray and ray.is_initialized():
                ray.shutdown()

        try:
            actors, groups = start_actors(cluster, timeout_s)
            program = TrainingProgram(
                plan=plan,
                model=model,
                microbatch_inputs=_first_microbatch(example_inputs, plan.num_microbatches),
                microbatch_targets=_first_microbatch(targets, plan.num_microbatches),
                loss_fn=loss_fn,
                optimizer_fn=optimizer_fn,
                init_seed=init_seed,
                max_grad_norm=max_grad_norm,
                lr_scheduler_fn=lr_scheduler_fn,
            )
            program_ref = ray.put(program)
            executable = cls(
                plan, actors, [], (example_inputs, targets), _state_keys(model), cleanup, timeout_s
            )
            roles = executable._wait([a.build.remote(program_ref) for a in actors], 10 * timeout_s)
            executable._roles = roles
            executable._master_fingerprint = roles[0]["master_fingerprint"]
            executable._tensors = checkpoint.tensor_listing(model.state_dict())
        except BaseException:
            cleanup()
            raise
        logger.info("started %d workers for a %d-stage plan", len(actors), len(plan.stages))
        return executable

    # ------------------------------------------------------------------------ training

    def train_step(self, inputs: Any, targets: Any = None) -> float:
        """One optimizer step on one global batch; returns its mean loss."""
        self._check_usable()
        leaves, target_leaves = model_leaves(inputs), pytree.tree_leaves(targets)
        _check_like("train_step", "input", leaves, self._example_inputs)
        _check_like("train_step", "target", target_leaves, self._example_targets)
        _check_batch(leaves, target_leaves, self.plan.num_microbatches)
        loss = self._mean_loss("train_step", inputs, targets, leaves, target_leaves)
        self.steps += 1
        return loss

    def eval_step(self, inputs: Any, targets: Any = None) -> float:
        """The mean loss of a batch with the model in evaluation mode, as ``model.eval()``
        under ``torch.no_grad()`` computes it in one process: forwards only, dropout off,
        batch norms on their running statistics; no parameter, buffer or optimizer state
        changes (``intra_op.evaluation`` says which ops switch). The batch may hold any
        number of the plan's micro-batches (its tensors shaped like the training batch's but
        in dim 0); each micro-batch's loss weighs the same."""
        self._check_usable()
        leaves, target_leaves = model_leaves(inputs), pytree.tree_leaves(targets)
        rows = self.plan.global_batch // self.plan.num_microbatches
        _check_like("eval_step", "input", leaves, self._example_inputs, rows)
        _check_like("eval_step", "target", target_leaves, self._example_targets, rows)
        sizes = sorted({t.shape[0] for t in [*leaves, *target_leaves]})
        if len(sizes) > 1:
            raise ValueError(
                f"eval_step got inputs and targets with batches of {sizes}; pass one batch size"
            )
        microbatches = sizes[0] // rows if sizes else self.plan.num_microbatches
        return self._mean_loss(
            "eval_step", inputs, targets, leaves, target_leaves, num_microbatches=microbatches
        )

    def _mean_loss(
        self,
        method: str,
        inputs: Any,
        targets: Any,
        leaves: list[Any],
        target_leaves: list[Any],
        **options: Any,
    ) -> float:
        """Run the workers' ``method`` on a checked batch and average the micro-batch losses
        the reporting worker returns."""
        inputs_ref = _for_workers(inputs, leaves)
        targets_ref = _for_workers(targets, target_leaves)
        refs = [
            getattr(worker, method).remote(
                inputs_ref if role["inputs"] else None,
                targets_ref if role["targets"] else None,
                **options,
            )
            for worker, role in zip(self.workers, self._roles, strict=True)
        ]
        results = self._wait(refs, self._timeout_s * 2)
        losses = next(r for r in results if r is not None)
        return float(sum(losses) / len(losses))

    @property
    def last_grad_norm(self) -> float | None:
        """The global L2 norm of the last step's gradients before clipping (what
        ``torch.nn.utils.clip_grad_norm_`` returns); ``None`` when compiled without
        ``max_grad_norm`` or before the first step."""
        self._check_usable()
        return self._wait([self.workers[0].grad_norm.remote()], self._timeout_s)[0]

    def last_step_trace(self) -> list[tuple[TimedOp, ...]]:
        """The measured timeline of the last ``train_step`` on every worker, in rank order
        (``runtime.step_trace``; empty before the first step)."""
        self._check_usable()
        return self._wait([w.step_trace.remote() for w in self.workers], self._timeout_s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded parameters and buffers with the keys of ``model.state_dict()``."""
        self._check_usable()
        merged: dict[str, torch.Tensor] = {}
        for shard in self._wait([w.full_state.remote() for w in self.workers], self._timeout_s):
            merged.update(shard)
        return {key: merged[source] for key, source in self._state_keys.items()}

    # ------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write the sharded parameters, persistent buffers and optimizer state (DCP, each
        worker its own shards), the learning-rate schedule's state and the step count to the
        directory ``path``, replacing an older
        checkpoint there; nothing is left at ``path`` if the save fails. Returns the path."""
        self._check_usable()
        staging = checkpoint.staging_directory(path)
        try:
            self._wait(
                [w.save_checkpoint.remote(str(staging)) for w in self.workers],
                self._timeout_s * 2,
            )
            metadata = checkpoint.CheckpointMetadata(
                steps=self.steps,
                model=self.plan.model,
                model_fingerprint=self._master_fingerprint,
                plan_fingerprint=checkpoint.plan_fingerprint(self.plan),
                tensors=self._tensors,
                optimizer=self._optimizer_class(),
                workers=len(self.workers),
                lr_scheduler=self._roles[0]["lr_scheduler"],
            )
            return checkpoint.publish(staging, path, metadata)
        finally:
            checkpoint.discard(staging)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore parameters, persistent buffers, optimizer state, the learning-rate
        schedule's state (when both it and this executable have one) and ``steps`` from a
        ``save_checkpoint`` directory, saved with any plan and number of workers. Raises
        ``CheckpointError`` (before any worker loads) when ``path`` holds no checkpoint or one
        of another model, optimizer or learning-rate schedule."""
        self._check_usable()
        directory = Path(path).absolute()
        saved = checkpoint.read_metadata(directory)
        checkpoint.check_compatible(
            saved,
            model_fingerprint=self._master_fingerprint,
            tensors=self._tensors,
            optimizer=self._optimizer_class(),
            lr_scheduler=self._roles[0]["lr_scheduler"],
            where=directory,
        )
        self._wait(
            [w.load_checkpoint.remote(str(directory)) for w in self.workers], self._timeout_s * 2
        )
        self.steps = saved.steps

    def _optimizer_class(self) -> str:
        return self._wait([self.workers[0].optimizer_class.remote()], self._timeout_s)[0]

    # ------------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        """Kill every worker (and the Ray instance, if this executable started it)."""
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()
        self._broken = self._broken or "it was shut down"

    def __enter__(self) -> ParallelExecutable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # interpreter teardown: Ray may be gone already
            pass

    # ------------------------------------------------------------------------ helpers

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise WorkerFailedError(
                f"this executable cannot run any more: {self._broken}; build a new one with "
                "compile_parallel"
            )

    def _where(self, rank: int) -> tuple[int, str]:
        p = self.plan.num_ranks
        pipeline_rank = next(r for r in range(p) if rank in self.plan.stages[r].devices)
        stages = list(range(pipeline_rank, len(self.plan.stages), p))
        return stages[0], "stage " + ", ".join(map(str, stages))

    def _wait(self, refs: list[Any], timeout_s: float) -> list[Any]:
        """The results of one call per worker (in rank order), or ``WorkerFailedError``."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        first_error: tuple[int, BaseException] | None = None
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise self._failure(rank, "died", exc) from exc
                except ray.exceptions.RayTaskError as exc:
                    if first_error is None:
                        first_error = (rank, exc)
                        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        if first_error is not None:
            rank, exc = first_error
            raise self._failure(rank, "failed", exc) from exc
        if pending:
            rank = rank_of[pending[0]]
            raise self._failure(rank, f"did not finish within {timeout_s:g} s", None)
        return [results[rank] for rank in range(len(refs))]

    def _failure(self, rank: int, what: str, exc: BaseException | None) -> WorkerFailedError:
        stage, stages = self._where(rank)
        cause = "" if exc is None else f": {_first_line(exc)}"
        self._broken = f"worker {rank} ({stages}) {what}"
        return WorkerFailedError(
            f"runtime worker rank {rank} ({stages} of the plan) {what}{cause}; the step is lost. "
            "Shut this executable down and rebuild it (from the last checkpoint)",
            stage=stage,
            rank=rank,
        )


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _for_workers(value: Any, leaves: list[Any]) -> Any:
    """``value`` as the workers' tasks take it: itself when small (inlined in each task, no
    object-store round trip on the step's critical path), else one object-store reference."""
    size = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
    return value if size <= INLINE_BATCH_BYTES else ray.put(value)


def _first_microbatch(value: Any, num_microbatches: int) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.chunk(num_microbatches)[0].clone(), value)


def _state_keys(model: nn.Module) -> dict[str, str]:
    """``model.state_dict()`` key → the name the workers report it under (a tied
    parameter's first name)."""
    first: dict[int, str] = {}
    names = {
        name: first.setdefault(id(p), name)
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    return {key: names.get(key, key) for key in model.state_dict()}


def check_max_grad_norm(max_grad_norm: float | None) -> None:
    """Raise ``ValueError`` unless ``max_grad_norm`` is ``None`` or a positive number."""
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(
            f"max_grad_norm must be a positive number, got {max_grad_norm!r}; pass None not to clip"
        )


def _check_like(
    method: str, what: str, given: list[Any], example: list[Any], rows: int | None = None
) -> None:
    """Raise ``ValueError`` unless ``given`` are tensors shaped and typed like ``example``;
    with ``rows``, dim 0 may be any positive multiple of ``rows``."""
    if len(given) != len(example):
        raise ValueError(
            f"{method} got {len(given)} {what} tensors but the executable was compiled for "
            f"{len(example)}; pass them like example_inputs/targets"
        )
    for index, (a, b) in enumerate(zip(given, example, strict=True)):
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"{what} {index} is a {type(a).__name__}, not a tensor")
        free = rows is not None and a.ndim == b.ndim and a.ndim > 0
        shape, expected = (a.shape[1:], b.shape[1:]) if free else (a.shape, b.shape)
        if tuple(shape) != tuple(expected) or a.dtype != b.dtype:
            raise ValueError(
                f"{what} {index} has shape {tuple(a.shape)} and dtype {a.dtype} but the "
                f"executable was compiled for {tuple(b.shape)} {b.dtype}; pass batches shaped "
                "like example_inputs (or compile again for this shape)"
            )
        if free and (a.shape[0] == 0 or a.shape[0] % rows):
            raise ValueError(
                f"{what} {index} has a batch of {a.shape[0]}, which is not a whole number "
                f"of the plan's micro-batches of {rows}; pass a multiple of {rows}"
            )


def _check_batch(inputs: list[Any], targets: list[Any], num_microbatches: int) -> None:
    for what, leaves in (("input", inputs), ("target", targets)):
        for index, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] % num_microbatches:
                size = t.shape[0] if isinstance(t, torch.Tensor) and t.ndim else "no batch dim"
                raise ValueError(
                    f"{what} {index} has a batch of {size}, which does not split into the plan's "
                    f"{num_microbatches} equal micro-batches; pass a global batch that is a "
                    f"multiple of {num_microbatches}"
                )
