"""``compile_parallel`` on local Ray CPU workers (gloo), checked against one process.

One Ray session (8 logical CPUs on the 2-core machine) serves the module. Every executable
trains a few steps of a tiny model; its losses and its final ``state_dict`` must equal the same
steps in one process within 1e-5. Plans come from the manual (Megatron-style) configuration
code, one from the planner's own search. Bad batches raise ``ValueError`` before any worker
runs; a killed worker makes ``train_step`` raise ``WorkerFailedError`` naming it within 60 s,
and ``shutdown`` frees every actor.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Iterator

import pytest
import ray
import torch

import hierarchical_ap as hap
from hierarchical_ap.errors import PlanError, WorkerFailedError
from hierarchical_ap.plan import ParallelPlan
from runtime.step_trace import CLOSING_PHASES, stage_compute_means
from tests.runtime_cases import (
    adamw,
    build_case,
    compare,
    compile_case,
    local_ray,
    megatron,
    plan_for,
    reference_run,
    sgd,
    warmup_then_cosine,
)

LOGICAL_CPUS = 8
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    with local_ray(LOGICAL_CPUS):
        yield


def _train(
    name,
    plan,
    workers,
    optimizer_fn,
    *,
    meta=False,
    steps=STEPS,
    plan_arg=None,
    accumulate=False,
    grad_norms=None,
    **training,
):
    """Train ``name`` under ``plan`` and in one process; ``training`` (``max_grad_norm``,
    ``lr_scheduler_fn``) goes to both, and ``grad_norms``, when given, receives a pair
    (parallel, reference) of per-step gradient norms."""
    case = build_case(name, steps, meta=meta)
    norms = []
    cluster = hap.Cluster.local_cpu(workers)
    chosen = plan if plan_arg is None else plan_arg
    with compile_case(case, cluster, chosen, optimizer_fn, **training) as exe:
        assert len(exe.workers) == workers
        losses = []
        for x, y in case.batches:
            losses.append(exe.train_step(x, y))
            norms.append(exe.last_grad_norm)
        state = exe.state_dict()
        used_plan = exe.plan
    microbatches = used_plan.num_microbatches if accumulate else 1
    reference_norms: list[float] = []
    reference = reference_run(
        build_case(name, steps, meta=meta),
        optimizer_fn,
        microbatches=microbatches,
        grad_norms=reference_norms,
        **training,
    )
    if grad_norms is not None:
        grad_norms.extend([norms, reference_norms])
    return losses, state, reference, used_plan


def _free_cpus() -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        free = ray.available_resources().get("CPU", 0.0)
        if free == LOGICAL_CPUS:
            return free
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0.0)


@pytest.mark.timeout(300)
def test_gpt_two_megatron_tensor_parallel_stages_1f1b_from_a_plan_file(tmp_path):
    plan = megatron(plan_for("gpt", 4, tp=2, pp=2, dp=1, micro_batch_size=2))
    plan.validate()
    path = plan.save(tmp_path / "plan.json")
    losses, state, reference, used = _train("gpt", None, 4, adamw, plan_arg=str(path))
    assert used == plan
    assert list(state) == list(reference[1])
    assert compare(losses, state, reference) == {}
    assert _free_cpus() == LOGICAL_CPUS


@pytest.mark.timeout(300)
def test_meta_llama_interleaved_with_data_parallel_stages():
    plan = plan_for("llama", 4, tp=1, pp=2, dp=2, schedule="interleaved", virtual_stages=2)
    assert plan.schedule == "interleaved" and len(plan.stages) == 4
    losses, state, reference, _ = _train("llama", plan, 4, sgd, meta=True)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(300)
def test_mlp_stages_on_2x2_meshes_data_and_tensor_parallel_gpipe_on_eight_workers():
    plan = megatron(plan_for("mlp", 8, tp=2, pp=2, dp=2, schedule="gpipe"))
    assert [s.logical_mesh for s in plan.stages] == [(2, 2), (2, 2)]
    assert plan.stages[1].param_placements["blocks.3.0.weight"] == ("R", "S(1)")
    losses, state, reference, _ = _train("mlp", plan, 8, sgd, steps=2)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(300)
def test_batch_norm_cnn_trains_like_gradient_accumulation_over_the_micro_batches():
    """Batch norm normalises each micro-batch by its own statistics, over the whole
    micro-batch on a data-parallel stage too, and updates the running statistics once per
    micro-batch: one process accumulating gradients over the same chunks is the reference,
    running means, variances and batch counters included."""
    plan = plan_for("cnn", 4, tp=1, pp=2, dp=2)
    assert plan.num_microbatches == 4 and [s.logical_mesh for s in plan.stages] == [(2, 1)] * 2
    losses, state, reference, _ = _train("cnn", plan, 4, sgd, accumulate=True)
    assert compare(losses, state, reference) == {}
    batch_counters = [key for key in state if key.endswith("num_batches_tracked")]
    assert batch_counters and all(state[key] == 4 * STEPS for key in batch_counters)


def _megatron_mlp_gpt2(plan: ParallelPlan) -> ParallelPlan:
    """``plan`` with transformers GPT-2's MLPs split Megatron-style on mesh axis 1 (its
    ``Conv1D`` weights are stored (in, out): ``c_fc`` splits dim 1, ``mlp.c_proj`` dim 0)."""
    stages = []
    for stage in plan.stages:
        placements = dict(stage.param_placements)
        for fqn in placements:
            if fqn.endswith("mlp.c_fc.weight"):
                placements[fqn] = ("R", "S(1)")
            elif fqn.endswith("mlp.c_fc.bias") or fqn.endswith("mlp.c_proj.weight"):
                placements[fqn] = ("R", "S(0)")
        stages.append(dataclasses.replace(stage, param_placements=placements))
    return dataclasses.replace(plan, stages=tuple(stages))


MASKED_PLANS = {
    "pp2-dp2": lambda: plan_for("hf-gpt2-masked", 4, tp=1, pp=2, dp=2),
    "pp2-tp2": lambda: _megatron_mlp_gpt2(
        plan_for("hf-gpt2-masked", 4, tp=2, pp=2, dp=1, micro_batch_size=2)
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan_name", sorted(MASKED_PLANS))
def test_transformers_gpt2_with_keyword_inputs_and_a_left_padding_attention_mask(plan_name):
    """``{"input_ids", "attention_mask"}`` batches: transformers' masked attention, and the
    empty key/value-cache constants its graph starts from, on plain data-parallel rows and on
    DTensor tensor-parallel stages."""
    plan = MASKED_PLANS[plan_name]()
    losses, state, reference, _ = _train("hf-gpt2-masked", plan, 4, adamw)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(300)
def test_dropout_draws_are_set_by_the_seed():
    """Dropout on Megatron tensor-parallel stages: the same ``init_seed`` gives the same
    losses, another seed other dropout masks and so other losses."""
    plan = megatron(plan_for("gpt-dropout", 4, tp=2, pp=2, dp=1, micro_batch_size=2))

    def losses_with(seed: int) -> list[float]:
        case = build_case("gpt-dropout", STEPS)
        cluster = hap.Cluster.local_cpu(4)
        with compile_case(case, cluster, plan, adamw, init_seed=seed) as exe:
            return [exe.train_step(x, y) for x, y in case.batches]

    first, again, other = losses_with(0), losses_with(0), losses_with(1)
    assert first == again
    assert min(abs(a - b) for a, b in zip(first, other, strict=True)) > 1e-4


FROZEN = {
    # the tied embedding and head, and the first block: part of each stage frozen
    "tied-embedding-and-block-0": re.compile(r"^(embed|blocks\.0)\."),
    # every parameter of stage 0 (embeddings, blocks 0 and 1): it sends nothing back
    "all-of-stage-0": re.compile(r"^(embed|pos_embed|blocks\.[01])\."),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("frozen", sorted(FROZEN))
def test_frozen_parameters_stay_as_they_are_and_the_rest_trains_like_one_process(frozen):
    """Fine-tuning with ``requires_grad=False`` parameters (Megatron tensor-parallel stages,
    AdamW with weight decay, clipping): frozen ones get no gradient, no update and no decay,
    and count in no gradient norm."""
    pattern = FROZEN[frozen]

    def frozen_case():
        case = build_case("gpt", STEPS)
        for name, param in case.model.named_parameters():
            param.requires_grad_(not pattern.search(name))
        return case

    plan = megatron(plan_for("gpt", 4, tp=2, pp=2, dp=1, micro_batch_size=2))
    case = frozen_case()
    with compile_case(case, hap.Cluster.local_cpu(4), plan, adamw, max_grad_norm=0.5) as exe:
        losses = [exe.train_step(x, y) for x, y in case.batches]
        state = exe.state_dict()
    reference = reference_run(frozen_case(), adamw, max_grad_norm=0.5)
    assert compare(losses, state, reference) == {}
    initial = build_case("gpt", 1).model.state_dict()
    held = [key for key in state if pattern.search(key)]
    assert held and all(torch.equal(state[key], initial[key]) for key in held)


CLIPPED_PLANS = {
    "gpt-tp2-pp2-tied-embedding": lambda: megatron(
        plan_for("gpt", 4, tp=2, pp=2, dp=1, micro_batch_size=2)
    ),
    "llama-pp2-dp2": lambda: plan_for("llama", 4, tp=1, pp=2, dp=2),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan_name", sorted(CLIPPED_PLANS))
def test_clipping_by_the_global_norm_and_a_learning_rate_schedule_match_one_process(plan_name):
    """``clip_grad_norm_`` over the whole model and a warm-up + cosine schedule in one process
    are the reference: the same losses, parameters and per-step gradient norms, with a bound
    low enough that every step clips (the norm counts sharded, replicated and tied gradients
    once each)."""
    max_norm = 0.2
    norms: list[list[float]] = []
    losses, state, reference, _ = _train(
        plan_name.split("-")[0],
        CLIPPED_PLANS[plan_name](),
        4,
        adamw,
        max_grad_norm=max_norm,
        lr_scheduler_fn=warmup_then_cosine,
        grad_norms=norms,
    )
    parallel_norms, reference_norms = norms
    assert min(reference_norms) > 2 * max_norm
    assert parallel_norms == pytest.approx(reference_norms, rel=1e-5)
    assert compare(losses, state, reference) == {}


@pytest.mark.timeout(300)
def test_planner_searches_the_plan_when_none_is_given():
    losses, state, reference, plan = _train("mlp", None, 4, sgd, steps=2)
    plan.validate()
    assert compare(losses, state, reference) == {}


@pytest.fixture(scope="module")
def gpt_executable() -> Iterator[tuple]:
    case = build_case("gpt", 1)
    inputs, targets = case.batches[0]
    plan = plan_for("gpt", 4, tp=1, pp=4, dp=1, micro_batch_size=2)
    exe = hap.compile_parallel(
        case.model,
        hap.Cluster.local_cpu(4),
        example_inputs=inputs,
        targets=targets,
        loss_fn=case.loss_fn,
        optimizer_fn=sgd,
        plan=plan,
    )
    try:
        yield exe, inputs, targets
    finally:
        exe.shutdown()


@pytest.mark.timeout(120)
def test_bad_batches_raise_value_error_before_any_worker_runs(gpt_executable):
    exe, inputs, targets = gpt_executable
    before = exe.state_dict()
    with pytest.raises(ValueError, match="shape"):
        exe.train_step((inputs[0][:, :4],), targets)
    with pytest.raises(ValueError, match="dtype"):
        exe.train_step((inputs[0].int(),), targets)
    with pytest.raises(ValueError, match="compiled for 1"):
        exe.train_step((inputs[0], inputs[0]), targets)
    after = exe.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.timeout(120)
def test_last_step_trace_times_every_instruction_and_the_closing_phases(gpt_executable):
    exe, inputs, targets = gpt_executable
    assert exe.last_step_trace() == [()] * len(exe.workers)  # no step yet
    exe.train_step(inputs, targets)
    traces = exe.last_step_trace()
    lists = ray.get([w.__ray_call__.remote(lambda w: list(w.instructions)) for w in exe.workers])
    for trace, instructions in zip(traces, lists, strict=True):
        phases = [t.op for t in trace]
        assert phases == [i.op for i in instructions] + list(CLOSING_PHASES)
        assert [(t.stage, t.microbatch) for t in trace[: len(instructions)]] == [
            (i.stage, i.microbatch) for i in instructions
        ]
        starts = [t.start_s for t in trace]
        assert starts == sorted(starts) and all(t.end_s >= t.start_s >= 0 for t in trace)
    means = stage_compute_means(traces)
    assert sorted(means) == list(range(4))  # one stage per worker
    assert all(m.forward_s > 0 and m.backward_s > 0 and m.optimizer_s > 0 for m in means.values())


@pytest.mark.timeout(60)
def test_workers_run_at_normal_cpu_priority(gpt_executable):
    """Ray starts worker processes at niceness 15; the runtime's actors ask for 0, so that on a
    shared host other processes cannot take the CPU from a training step."""
    exe, _, _ = gpt_executable
    niceness = ray.get([w.__ray_call__.remote(lambda _: os.nice(0)) for w in exe.workers])
    assert niceness == [0] * len(exe.workers)


def test_a_global_batch_that_does_not_split_into_micro_batches_is_refused():
    case = build_case("gpt", 1)
    inputs, targets = case.batches[0]
    plan = plan_for("gpt", 4, tp=1, pp=4, dp=1, micro_batch_size=2)  # 4 micro-batches of 2
    with pytest.raises(PlanError, match="global batch"):
        hap.compile_parallel(
            case.model,
            hap.Cluster.local_cpu(4),
            example_inputs=(inputs[0][:6],),
            targets=targets[:6],
            loss_fn=case.loss_fn,
            optimizer_fn=sgd,
            plan=plan,
        )


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
def test_a_max_grad_norm_that_is_not_positive_is_refused_before_planning(bound):
    """Checked first: the plan file named here does not exist, and is never read."""
    case = build_case("mlp", 1)
    missing = "no-such-plan.json"
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
        compile_case(case, hap.Cluster.local_cpu(2), missing, sgd, max_grad_norm=bound)


@pytest.mark.timeout(180)
def test_a_killed_worker_fails_the_step_naming_it_and_shutdown_frees_every_actor(
    gpt_executable,
):
    exe, inputs, targets = gpt_executable
    assert isinstance(exe.train_step(inputs, targets), float)
    victim = 2  # the only worker of stage 2
    errors: list[BaseException] = []

    def step() -> None:
        try:
            for _ in range(50):
                exe.train_step(inputs, targets)
        except BaseException as exc:  # the error under test, checked below
            errors.append(exc)

    started = time.monotonic()
    runner = threading.Thread(target=step)
    runner.start()
    time.sleep(0.5)  # kill while steps are running
    ray.kill(exe.workers[victim], no_restart=True)
    runner.join(timeout=90)
    elapsed = time.monotonic() - started
    assert not runner.is_alive()
    assert errors and isinstance(errors[0], WorkerFailedError), errors
    assert elapsed < 60
    assert errors[0].rank == victim and errors[0].stage == 2
    assert "rank 2" in str(errors[0]) and "stage 2" in str(errors[0])
    with pytest.raises(WorkerFailedError, match="cannot run any more"):
        exe.train_step(inputs, targets)
    exe.shutdown()
    assert _free_cpus() == LOGICAL_CPUS
