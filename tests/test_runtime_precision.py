"""Mixed precision (``precision="bf16"``) checked against mixed precision done by hand in one
process (``tests.runtime_cases.reference_run(..., precision="bf16")``).

Tolerances. bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ≈ 3.9e-3). Two bf16 runs
that split the batch differently (micro-batches, data-parallel shards) round differently, so
losses are compared with ``BF16_LOSS_RTOL = 1e-2`` (about 2.5 bf16 units; they agree to ~1e-5 in
practice, the losses being fp32 means) and the fp32 master parameters, after 5 steps of SGD
with momentum whose updates total ~5e-2, within ``BF16_PARAM_ATOL + BF16_PARAM_RTOL·|reference|``
(2e-3, 1e-2: a lost micro-batch or a gradient scaled wrongly moves them by ~1e-2). That bf16 is
really what runs is shown by the first step's loss, which the parameters alone decide: it
equals the bf16 reference's and differs from the fp32 reference's by over ten times as much,
and by the dtypes of the values the workers exchange.

* Ray (4 workers): the tiny GPT in 2 stages, each a data-parallel (2, 1) mesh (gradients
  all-reduced and reduce-scattered inside stages, the tied embedding summed across stages),
  1F1B over 4 micro-batches; losses and masters against the reference; fp32 masters, fp32
  gradients, bf16 boundary values; a checkpoint round trip resumes exactly (masters and
  momentum saved in fp32).
* One gloo process: the whole GPT as one one-device stage (plain-tensor path, plain-tensor
  optimizer) trains like the reference (the optimizer's two paths against each other:
  ``tests/test_shard_optimizer.py``).
* No processes: the policy helpers and the errors for fp16 and for a plan of another
  precision.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import hierarchical_ap as hap
from hierarchical_ap.errors import PlanError
from hierarchical_ap.graph import capture
from hierarchical_ap.plan import model_fingerprint
from runtime.precision import UnsupportedPrecisionError, master_fingerprint, policy_for
from runtime.worker import meta_copy, to_meta
from tests.distributed import DistributedWorkers
from tests.runtime_cases import (
    adamw,
    bf16_far,
    build_case,
    built_worker,
    canonical_names,
    check_bf16_losses,
    local_ray,
    plan_for,
    reference_run,
    sgd_momentum,
)

STEPS = 5
BF16, FP32 = "torch.bfloat16", "torch.float32"


@pytest.fixture(scope="module")
def references() -> tuple[tuple[list[float], dict], tuple[list[float], dict]]:
    """The bf16 and fp32 single-process runs of the tiny GPT with SGD and momentum."""
    return (
        reference_run(build_case("gpt", STEPS), sgd_momentum, precision="bf16"),
        reference_run(build_case("gpt", STEPS), sgd_momentum),
    )


# ---------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def bf16_executable() -> Iterator[tuple]:
    """A bf16 executable of 2 data-parallel stages on 4 Ray workers after ``STEPS`` steps:
    the executable, its losses, its state dict then and the batches."""
    plan = plan_for("gpt", 4, tp=1, pp=2, dp=2, micro_batch_size=1, precision="bf16")
    assert plan.precision == "bf16" and [s.logical_mesh for s in plan.stages] == [(2, 1)] * 2
    case = build_case("gpt", STEPS)
    inputs, targets = case.batches[0]
    with local_ray(4):
        with hap.compile_parallel(
            case.model,
            hap.Cluster.local_cpu(4),
            example_inputs=inputs,
            targets=targets,
            loss_fn=case.loss_fn,
            optimizer_fn=sgd_momentum,
            plan=plan,
            precision="bf16",
        ) as exe:
            losses = [exe.train_step(x, y) for x, y in case.batches]
            yield exe, losses, exe.state_dict(), case.batches


@pytest.mark.timeout(300)
def test_bf16_pipeline_trains_like_one_bf16_process_with_fp32_masters(bf16_executable, references):
    exe, losses, state, _ = bf16_executable
    (bf16_losses, bf16_state), (fp32_losses, _) = references
    check_bf16_losses(losses, bf16_losses, fp32_losses)
    assert {str(v.dtype) for v in state.values()} == {FP32}
    assert bf16_far(state, bf16_state) == {}
    stages = {}
    for report in ray.get([w.stage_dtypes.remote() for w in exe.workers], timeout=60):
        stages.update(report)
    assert stages[0]["sent"] == [BF16] and stages[1]["received"] == [BF16]
    for report in stages.values():
        assert report["parameters"] == [FP32] and report["gradients"] == [FP32]


@pytest.mark.timeout(300)
def test_bf16_checkpoint_keeps_fp32_masters_and_resumes_exactly(bf16_executable, tmp_path):
    exe, _, _, batches = bf16_executable
    path = exe.save_checkpoint(tmp_path / "ckpt")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: m.properties.dtype for k, m in saved.items() if hasattr(m, "properties")}
    assert tensors["blocks.0.attn.qkv_proj.weight"] == torch.float32
    moments = [d for k, d in tensors.items() if k.endswith("/momentum_buffer")]
    assert len(moments) == len(list(build_case("gpt", 1).model.parameters()))
    assert set(moments) == {torch.float32}
    resumed_at = exe.steps
    continued = [exe.train_step(x, y) for x, y in batches[:2]]
    after = exe.state_dict()
    exe.load_checkpoint(path)
    assert exe.steps == resumed_at
    assert [exe.train_step(x, y) for x, y in batches[:2]] == continued
    again = exe.state_dict()
    assert all(torch.equal(again[k], after[k]) for k in after)


# --------------------------------------------------------------------- one gloo process


@pytest.fixture(scope="module")
def one_process() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(1) as group:
        yield group


def train_one_device_bf16(plan, steps: int):
    """On one rank: the whole model as one bf16 stage; losses, state, dtypes, paths run."""
    case = build_case("gpt", steps)
    worker = built_worker(plan, case, sgd_momentum)
    losses = [worker.train_step(x, y) for x, y in case.batches]
    plain = [p.program.runs_plain for p in worker.programs.values()] + [worker.optimizer.local]
    return losses, worker.full_state(), worker.stage_dtypes(), plain


@pytest.mark.timeout(240)
def test_one_device_bf16_stage_trains_like_one_bf16_process(one_process, references):
    plan = plan_for("gpt", 1, tp=1, pp=1, dp=1, micro_batch_size=4, precision="bf16")
    assert plan.num_microbatches == 2
    [(losses, state, dtypes, plain)] = one_process.run(
        train_one_device_bf16, plan, STEPS, timeout_s=200
    )
    (bf16_losses, bf16_state), (fp32_losses, _) = references
    assert all(plain)
    check_bf16_losses([sum(mb) / len(mb) for mb in losses], bf16_losses, fp32_losses)
    canonical = canonical_names(build_case("gpt", 1).model)
    full = {k: state[canonical.get(k, k)] for k in bf16_state}
    assert {str(v.dtype) for v in full.values()} == {FP32}
    assert bf16_far(full, bf16_state) == {}
    assert dtypes[0]["parameters"] == [FP32] and dtypes[0]["gradients"] == [FP32]


# ----------------------------------------------------------------------- no processes


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_policies():
    fp32, bf16 = policy_for("fp32"), policy_for("bf16")
    assert (fp32.compute_dtype, fp32.master_dtype) == (None, None)
    assert (bf16.compute_dtype, bf16.master_dtype) == (torch.bfloat16, torch.float32)
    batch = {"x": torch.randn(2, 3), "ids": torch.arange(4), "pair": (torch.ones(1),)}
    cast = bf16.compute_inputs(batch)
    assert cast["x"].dtype == torch.bfloat16 and cast["pair"][0].dtype == torch.bfloat16
    assert cast["ids"].dtype == torch.int64 and torch.equal(
        cast["x"].float(), batch["x"].bfloat16().float()
    )
    assert fp32.compute_inputs(batch) is batch
    with pytest.raises(UnsupportedPrecisionError, match="loss scaling"):
        policy_for("fp16")
    with pytest.raises(UnsupportedPrecisionError, match="one of"):
        policy_for("int8")


def test_bf16_copy_keeps_ties_and_integer_buffers():
    copy = meta_copy(_Tied(), torch.bfloat16)
    assert copy.head.weight is copy.embed.weight and copy.embed.weight.is_meta
    assert copy.embed.weight.dtype == torch.bfloat16 and copy.scale.dtype == torch.bfloat16
    assert copy.count.dtype == torch.int64


def test_checkpoints_name_the_fp32_masters_whatever_the_precision():
    case = build_case("mlp", 1, meta=True)
    inputs, targets = to_meta(case.batches[0])
    policy = policy_for("bf16")
    fp32 = capture(case.model, inputs, loss_fn=case.loss_fn, targets=targets)
    bf16 = capture(
        meta_copy(case.model, torch.bfloat16),
        policy.compute_inputs(inputs),
        loss_fn=case.loss_fn,
        targets=targets,
    )
    assert {m.dtype for m in bf16.param_shapes.values()} == {torch.bfloat16}
    assert master_fingerprint(bf16, policy) == model_fingerprint(fp32)
    assert master_fingerprint(fp32, policy_for("fp32")) == model_fingerprint(fp32)
    assert model_fingerprint(bf16) != model_fingerprint(fp32)


def test_compile_parallel_refuses_fp16_and_plans_of_another_precision():
    case = build_case("mlp", 1)
    inputs, targets = case.batches[0]
    common = dict(example_inputs=inputs, targets=targets, loss_fn=case.loss_fn, optimizer_fn=adamw)
    cluster = hap.Cluster.local_cpu(2)
    with pytest.raises(UnsupportedPrecisionError, match="loss scaling"):
        hap.compile_parallel(case.model, cluster, precision="fp16", **common)
    plan = plan_for("mlp", 2, tp=1, pp=2, dp=1)
    assert plan.precision == "fp32"
    with pytest.raises(PlanError, match="the plan is for fp32 training"):
        hap.compile_parallel(case.model, cluster, plan=plan, precision="bf16", **common)
