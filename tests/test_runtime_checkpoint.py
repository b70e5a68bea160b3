"""Checkpoints of ``ParallelExecutable`` (DCP) on local Ray CPU workers, against one process.

One Ray session serves the module. The tiny GPT (tied embedding and head, AdamW) trains
``STEPS`` steps in one process as the reference. Round trip: the first steps on 4 workers with
Megatron tensor parallelism in 2 stages, a checkpoint, the rest on 2 workers with another plan
(the shards, Adam's moments included, are resharded on load); losses and final parameters must
equal the reference within 1e-5. Fault recovery: a run that loses a worker gets
``WorkerFailedError``, is rebuilt by a new ``compile_parallel`` from its last checkpoint and
ends with the reference's parameters. A checkpoint of another model, or a path without one, is
refused with ``CheckpointError`` before any worker loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed.checkpoint as dcp

import hierarchical_ap as hap
from hierarchical_ap.errors import CheckpointError, WorkerFailedError
from hierarchical_ap.plan import ParallelPlan, fingerprint
from runtime import checkpoint
from runtime.executable import ParallelExecutable
from tests.runtime_cases import (
    adamw,
    build_case,
    compare,
    local_ray,
    megatron,
    plan_for,
    reference_run,
    warmup_then_cosine,
)

LOGICAL_CPUS = 6  # the 2-worker executable the module shares, and one of 4 beside it
STEPS = 3


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    with local_ray(LOGICAL_CPUS):
        yield


@pytest.fixture(scope="module")
def reference(ray_session: None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference run (requesting it also starts the module's Ray session)."""
    return reference_run(build_case("gpt", STEPS), adamw)


def _compile(plan, workers: int, name: str = "gpt", **training):
    case = build_case(name, STEPS)
    inputs, targets = case.batches[0]
    exe = hap.compile_parallel(
        case.model,
        hap.Cluster.local_cpu(workers),
        example_inputs=inputs,
        targets=targets,
        loss_fn=case.loss_fn,
        optimizer_fn=adamw,
        plan=plan,
        **training,
    )
    return exe, case.batches


@functools.cache
def _two_stages_on_two_workers() -> ParallelPlan:
    return plan_for("gpt", 2, tp=1, pp=2, dp=1, micro_batch_size=4)


@pytest.fixture(scope="module")
def gpt_on_two_workers(ray_session: None) -> Iterator[tuple[ParallelExecutable, list]]:
    """A fresh GPT executable of 2 stages on 2 workers (the round trip loads into it)."""
    exe, batches = _compile(_two_stages_on_two_workers(), 2)
    with exe:
        yield exe, batches


@pytest.mark.timeout(240)
def test_round_trip_from_tensor_parallel_stages_on_4_workers_to_another_plan_on_2(
    tmp_path, reference, gpt_on_two_workers
):
    plan_a = megatron(plan_for("gpt", 4, tp=2, pp=2, dp=1, micro_batch_size=2))
    assert plan_a.stages[0].param_placements["blocks.0.attn.qkv_proj.weight"][1] == "S(0)"
    saved_at = 2
    exe, batches = _compile(plan_a, 4)
    with exe:
        losses = [exe.train_step(x, y) for x, y in batches[:saved_at]]
        path = exe.save_checkpoint(tmp_path / "ckpt")
    metadata = json.loads((path / checkpoint.METADATA_FILE).read_text())
    assert metadata["steps"] == saved_at and metadata["workers"] == 4
    assert metadata["optimizer"] == "AdamW"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind

    exe, _ = gpt_on_two_workers
    assert exe.plan.num_microbatches != plan_a.num_microbatches
    exe.load_checkpoint(path)
    assert exe.steps == saved_at
    losses += [exe.train_step(x, y) for x, y in batches[saved_at:]]
    assert compare(losses, exe.state_dict(), reference) == {}


@pytest.mark.timeout(240)
def test_a_learning_rate_schedule_and_clipping_resume_exactly_under_another_plan(
    tmp_path, ray_session, gpt_on_two_workers
):
    """Saved after the warm-up, where the schedule has switched to cosine annealing (whose
    next rate follows from the current one), and resumed on 2 workers: the same losses and
    parameters as one uninterrupted process. An executable without a schedule refuses it."""
    training = {"max_grad_norm": 0.2, "lr_scheduler_fn": warmup_then_cosine}
    reference = reference_run(build_case("gpt", STEPS), adamw, **training)
    saved_at = 2
    exe, batches = _compile(
        megatron(plan_for("gpt", 4, tp=2, pp=2, dp=1, micro_batch_size=2)), 4, **training
    )
    with exe:
        losses = [exe.train_step(x, y) for x, y in batches[:saved_at]]
        path = exe.save_checkpoint(tmp_path / "ckpt")
    metadata = json.loads((path / checkpoint.METADATA_FILE).read_text())
    assert metadata["lr_scheduler"] == "SequentialLR"

    unscheduled, _ = gpt_on_two_workers
    with pytest.raises(CheckpointError, match="SequentialLR learning-rate schedule .* has none"):
        unscheduled.load_checkpoint(path)

    resumed, _ = _compile(_two_stages_on_two_workers(), 2, **training)
    with resumed:
        resumed.load_checkpoint(path)
        losses += [resumed.train_step(x, y) for x, y in batches[saved_at:]]
        state = resumed.state_dict()
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(300)
def test_a_run_that_loses_a_worker_is_rebuilt_from_its_last_checkpoint(tmp_path, reference):
    plan = _two_stages_on_two_workers()
    exe, batches = _compile(plan, 2)
    last = tmp_path / "last"
    try:
        losses = [exe.train_step(*batches[0])]
        exe.save_checkpoint(last)
        errors: list[BaseException] = []

        def train_on() -> None:
            try:
                for _ in range(50):
                    exe.train_step(*batches[1])
            except BaseException as exc:  # the error under test, checked below
                errors.append(exc)

        runner = threading.Thread(target=train_on)
        runner.start()
        time.sleep(0.5)  # kill while steps are running
        ray.kill(exe.workers[1], no_restart=True)
        runner.join(timeout=90)
        assert not runner.is_alive()
        assert errors and isinstance(errors[0], WorkerFailedError), errors
        assert errors[0].rank == 1
    finally:
        exe.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    rebuilt, batches = _compile(plan, 2)
    with rebuilt:
        rebuilt.load_checkpoint(last)
        assert rebuilt.steps == 1
        losses += [rebuilt.train_step(x, y) for x, y in batches[rebuilt.steps :]]
        state = rebuilt.state_dict()
    assert compare(losses, state, reference) == {}


def _single_process_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """What ``save_checkpoint`` writes, for ``model`` trained in this process (no optimizer
    state): its state dict with DCP and the metadata."""
    state = model.state_dict()
    staging = checkpoint.staging_directory(path)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(staging)), no_dist=True)
    tensors = checkpoint.tensor_listing(state)
    metadata = checkpoint.CheckpointMetadata(
        steps=0,
        model=type(model).__name__,
        model_fingerprint=fingerprint(tensors),
        plan_fingerprint="none",
        tensors=tensors,
        optimizer="AdamW",
        workers=1,
    )
    checkpoint.publish(staging, path, metadata)


@pytest.mark.timeout(120)
def test_a_checkpoint_of_another_model_or_a_missing_one_is_refused(tmp_path, gpt_on_two_workers):
    exe, _ = gpt_on_two_workers
    _single_process_checkpoint(build_case("mlp", 1).model, tmp_path / "mlp")
    before, steps = exe.state_dict(), exe.steps
    with pytest.raises(CheckpointError, match="another model.*'blocks.0.0.bias'"):
        exe.load_checkpoint(tmp_path / "mlp")
    with pytest.raises(CheckpointError, match="no checkpoint at .*does not exist"):
        exe.load_checkpoint(tmp_path / "nowhere")
    after = exe.state_dict()
    assert exe.steps == steps
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ pure helpers, no Ray


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint.staging_directory(tmp_path / "data")


def test_publish_replaces_an_older_checkpoint_whole(tmp_path):
    def metadata(steps: int) -> checkpoint.CheckpointMetadata:
        return checkpoint.CheckpointMetadata(
            steps=steps,
            model="m",
            model_fingerprint="f",
            plan_fingerprint="p",
            tensors={"w": ((2, 3), "float32")},
            optimizer="AdamW",
            workers=2,
        )

    for steps in (1, 2):
        staging = checkpoint.staging_directory(tmp_path / "ckpt")
        staging.mkdir()
        (staging / f"shard-{steps}").write_text("x")
        checkpoint.publish(staging, tmp_path / "ckpt", metadata(steps))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        checkpoint.METADATA_FILE,
        "shard-2",
    ]
    assert checkpoint.read_metadata(tmp_path / "ckpt") == metadata(2)


def test_compatibility_names_what_differs():
    saved = checkpoint.CheckpointMetadata(
        steps=3,
        model="gpt",
        model_fingerprint="aaa",
        plan_fingerprint="p",
        tensors={"a": ((4,), "float32"), "b": ((2, 2), "float32")},
        optimizer="AdamW",
        workers=4,
    )
    same = {"a": ((4,), "float32"), "b": ((2, 2), "float32")}
    compatible = {"model_fingerprint": "aaa", "tensors": same, "where": Path("x")}
    checkpoint.check_compatible(saved, optimizer="AdamW", lr_scheduler=None, **compatible)
    # a schedule may start on a checkpoint saved without one
    checkpoint.check_compatible(saved, optimizer="AdamW", lr_scheduler="LambdaLR", **compatible)
    scheduled = dataclasses.replace(saved, lr_scheduler="CosineAnnealingLR")
    checkpoint.check_compatible(
        scheduled, optimizer="AdamW", lr_scheduler="CosineAnnealingLR", **compatible
    )
    for other, have in ((None, "has none"), ("LambdaLR", "has a LambdaLR")):
        with pytest.raises(CheckpointError, match=f"CosineAnnealingLR learning-rate .* {have}"):
            checkpoint.check_compatible(
                scheduled, optimizer="AdamW", lr_scheduler=other, **compatible
            )
    with pytest.raises(CheckpointError, match=r"'b' is \[2, 2\] float32 there, \[2, 3\]"):
        checkpoint.check_compatible(
            saved,
            model_fingerprint="bbb",
            tensors={"a": ((4,), "float32"), "b": ((2, 3), "float32")},
            optimizer="AdamW",
            lr_scheduler=None,
            where=Path("x"),
        )
    with pytest.raises(CheckpointError, match="holds AdamW state but .* SGD"):
        checkpoint.check_compatible(saved, optimizer="SGD", lr_scheduler=None, **compatible)
