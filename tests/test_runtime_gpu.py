"""``compile_parallel`` on Ray GPU workers over NCCL, checked against one process on a GPU.

Skipped where torch sees no CUDA device (CI has none; ``benchmarks/gpu_check.sh`` runs them
on a GPU machine: README, "On a GPU machine"). One Ray session with every visible GPU serves
the module; the reference trains in this process on ``cuda:0``, which the workers share.

* One GPU: ``Cluster.from_ray`` finds a datasheet GPU and NCCL; the tiny GPT trains 5 steps
  under the planner's own plan with the losses and final parameters of the reference within
  1e-5 (the GPU's fp32 kernels are the same in both processes); bf16 mixed precision within
  the tolerances of ``tests/test_runtime_precision.py``; a checkpoint saved under one plan
  resumes exactly under another (a different micro-batching); a killed worker fails the step
  naming it.
* Two or more GPUs: 2 pipeline stages (activations and gradients sent over NCCL) and 2-way
  Megatron tensor parallelism in one stage, each against the reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import torch

import hierarchical_ap as hap
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import WorkerFailedError
from tests.runtime_cases import (
    adamw,
    bf16_far,
    build_case,
    check_bf16_losses,
    compare,
    compile_case,
    local_ray,
    megatron,
    plan_for,
    reference_run,
    sgd_momentum,
    warmup_then_cosine,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the NCCL path)"
)

STEPS = 5
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
needs_four = pytest.mark.skipif(GPUS < 4, reason="needs four GPUs")


@pytest.fixture(scope="module", autouse=True)
def gpu_ray() -> Iterator[None]:
    with local_ray(max(4, 2 * GPUS), GPUS):
        yield


def _gpus(count: int) -> Cluster:
    """``count`` GPUs of this machine's kind on one host (the preset of the family torch names,
    "NVIDIA H200" → H200-141GB; Ray's own discovery is tested on its own)."""
    family = torch.cuda.get_device_name(0).replace("NVIDIA", "").split()[0]
    return Cluster.from_spec(f"1x{count}x{family}")


def _train(name, cluster, plan, optimizer_fn, *, precision="fp32", steps=STEPS, init_seed=0):
    case = build_case(name, steps)
    options = {"precision": precision, "init_seed": init_seed}
    with compile_case(case, cluster, plan, optimizer_fn, **options) as exe:
        losses = [exe.train_step(x, y) for x, y in case.batches]
        state = exe.state_dict()
    return losses, state


def _reference(name, optimizer_fn, *, precision="fp32", steps=STEPS):
    return reference_run(build_case(name, steps), optimizer_fn, precision=precision, device="cuda")


@pytest.mark.timeout(120)
def test_ray_reports_datasheet_gpus_and_nccl():
    cluster = Cluster.from_ray()
    assert cluster.backend == "nccl"
    assert cluster.num_devices == GPUS
    assert not cluster.device.is_cpu


@pytest.mark.timeout(300)
def test_planned_gpt_on_one_gpu_trains_like_one_process():
    losses, state = _train("gpt", _gpus(1), None, adamw)
    assert compare(losses, state, _reference("gpt", adamw)) == {}


@pytest.mark.timeout(300)
def test_clipping_a_schedule_and_eval_on_one_gpu_match_one_process():
    """The clipping all-reduce over NCCL, a warm-up + cosine schedule, and ``eval_step``
    against ``model.eval()`` of the trained weights, on the GPU."""
    cluster, training = _gpus(1), {"max_grad_norm": 0.2, "lr_scheduler_fn": warmup_then_cosine}
    case = build_case("gpt-dropout", STEPS + 1)
    *batches, held_out = case.batches
    with compile_case(case, cluster, None, adamw, **training) as exe:
        norms = []
        for x, y in batches:
            exe.train_step(x, y)
            norms.append(exe.last_grad_norm)
        evaluated, state = exe.eval_step(*held_out), exe.state_dict()
    assert all(n > 0.2 for n in norms)
    model = build_case("gpt-dropout", 1).model.cuda()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        inputs, targets = held_out
        expected = case.loss_fn(model(*[t.cuda() for t in inputs]), targets.cuda()).item()
    assert evaluated == pytest.approx(expected, rel=1e-5)


@pytest.mark.timeout(300)
def test_bf16_on_one_gpu_trains_like_one_bf16_process():
    cluster = _gpus(1)
    plan = plan_for(
        "gpt", 1, tp=1, pp=1, dp=1, micro_batch_size=2, precision="bf16", cluster=cluster
    )
    losses, state = _train("gpt", cluster, plan, sgd_momentum, precision="bf16")
    bf16 = _reference("gpt", sgd_momentum, precision="bf16")
    fp32 = _reference("gpt", sgd_momentum)
    check_bf16_losses(losses, bf16[0], fp32[0])
    assert bf16_far(state, bf16[1]) == {}


@pytest.mark.timeout(300)
def test_a_checkpoint_resumes_exactly_under_another_micro_batching(tmp_path):
    cluster = _gpus(1)
    case = build_case("gpt", 3)
    inputs, targets = case.batches[0]
    common = dict(example_inputs=inputs, targets=targets, loss_fn=case.loss_fn, optimizer_fn=adamw)
    first = plan_for("gpt", 1, tp=1, pp=1, dp=1, micro_batch_size=4, cluster=cluster)
    second = plan_for("gpt", 1, tp=1, pp=1, dp=1, micro_batch_size=2, cluster=cluster)
    with hap.compile_parallel(case.model, cluster, plan=first, **common) as exe:
        losses = [exe.train_step(x, y) for x, y in case.batches[:2]]
        exe.save_checkpoint(tmp_path / "ckpt")
    with hap.compile_parallel(build_case("gpt", 3).model, cluster, plan=second, **common) as exe:
        exe.load_checkpoint(tmp_path / "ckpt")
        losses.append(exe.train_step(*case.batches[2]))
        state = exe.state_dict()
    assert compare(losses, state, _reference("gpt", adamw, steps=3)) == {}


@pytest.mark.timeout(180)
def test_a_killed_gpu_worker_fails_the_step_naming_it():
    case = build_case("gpt", 1)
    inputs, targets = case.batches[0]
    with hap.compile_parallel(
        case.model,
        _gpus(1),
        example_inputs=inputs,
        targets=targets,
        loss_fn=case.loss_fn,
        optimizer_fn=adamw,
    ) as exe:
        exe.train_step(inputs, targets)
        ray.kill(exe.workers[0])
        with pytest.raises(WorkerFailedError, match="rank 0"):
            exe.train_step(inputs, targets)


@needs_two
@pytest.mark.timeout(300)
def test_two_pipeline_stages_over_nccl_train_like_one_process():
    cluster = _gpus(2)
    plan = plan_for("gpt", 2, tp=1, pp=2, dp=1, micro_batch_size=2, cluster=cluster)
    losses, state = _train("gpt", cluster, plan, adamw)
    assert compare(losses, state, _reference("gpt", adamw)) == {}


@needs_two
@pytest.mark.timeout(300)
def test_megatron_tensor_parallel_stage_over_nccl_trains_like_one_process():
    cluster = _gpus(2)
    plan = megatron(plan_for("gpt", 2, tp=2, pp=1, dp=1, micro_batch_size=4, cluster=cluster))
    losses, state = _train("gpt", cluster, plan, adamw)
    assert compare(losses, state, _reference("gpt", adamw)) == {}


@needs_four
@pytest.mark.timeout(300)
def test_dropout_on_tensor_parallel_stages_is_set_by_the_seed_over_nccl():
    """DTensor's GPU random-number tracker is made on every worker at build: dropout on two
    2-way tensor-parallel stages neither hangs on a lazily made tracker's broadcast nor
    differs between two runs of one seed."""
    cluster = _gpus(4)
    plan = megatron(
        plan_for("gpt-dropout", 4, tp=2, pp=2, dp=1, micro_batch_size=2, cluster=cluster)
    )
    first, _ = _train("gpt-dropout", cluster, plan, adamw, steps=2)
    again, _ = _train("gpt-dropout", cluster, plan, adamw, steps=2)
    other, _ = _train("gpt-dropout", cluster, plan, adamw, steps=2, init_seed=1)
    assert again == pytest.approx(first, rel=1e-6)
    assert min(abs(a - b) for a, b in zip(first, other, strict=True)) > 1e-4
