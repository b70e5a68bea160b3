"""``ParallelExecutable.eval_step`` against ``model.eval()`` in one process.

After a few training steps, the executable's weights (``state_dict``) are loaded into the model
in one process, which computes the loss of a held-out batch under ``model.eval()`` and
``torch.no_grad()``; ``eval_step`` on the same batch must give it within 1e-5. Models with
dropout (off in evaluation) and batch norm (normalising with its running statistics) make the
two modes differ by far more than the tolerance, so the check tells them apart. Evaluating changes nothing: the state dict
is the same after it, and training carries on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.utils._pytree as pytree

import hierarchical_ap as hap
from tests.runtime_cases import (
    TOLERANCE,
    adamw,
    build_case,
    compile_case,
    local_ray,
    megatron,
    plan_for,
)

LOGICAL_CPUS = 8
STEPS = 2

PLANS = {
    # dropout on Megatron tensor-parallel stages (DTensor ops)
    "gpt-dropout-tp2-pp2": (
        "gpt-dropout",
        lambda: megatron(plan_for("gpt-dropout", 4, tp=2, pp=2, dp=1, micro_batch_size=2)),
    ),
    # dropout on one-device stages (compiled plain-tensor parts)
    "gpt-dropout-pp4": ("gpt-dropout", lambda: plan_for("gpt-dropout", 4, tp=1, pp=4, dp=1)),
    # batch norm on data-parallel stages
    "cnn-pp2-dp2": ("cnn", lambda: plan_for("cnn", 4, tp=1, pp=2, dp=2)),
    # forwards of interleaved chunks
    "llama-interleaved": (
        "llama",
        lambda: plan_for("llama", 4, tp=1, pp=2, dp=2, schedule="interleaved", virtual_stages=2),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    with local_ray(LOGICAL_CPUS):
        yield


def _rows(batch, count: int):
    """The first ``count`` rows of every tensor of ``batch``."""
    return pytree.tree_map(lambda t: t[:count], batch)


def _eval_in_one_process(name: str, state: dict[str, torch.Tensor], batch) -> float:
    case = build_case(name, 1)
    model = case.model
    model.load_state_dict(state)
    model.eval()
    inputs, targets = batch
    with torch.no_grad():
        return case.loss_fn(model(*inputs), targets).item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_eval_step_is_the_eval_mode_loss_of_the_trained_weights(plan_name):
    name, make_plan = PLANS[plan_name]
    plan = make_plan()
    rows = plan.global_batch // plan.num_microbatches
    fewer = max(1, plan.num_microbatches - 1) * rows  # another number of micro-batches
    case = build_case(name, STEPS + 1)
    *training, held_out = case.batches
    with compile_case(case, hap.Cluster.local_cpu(4), plan, adamw) as exe:
        for x, y in training:
            exe.train_step(x, y)
        before = exe.state_dict()
        evaluated = exe.eval_step(*held_out)
        again = exe.eval_step(*held_out)
        shorter = exe.eval_step(*_rows(held_out, fewer))
        after = exe.state_dict()
        assert exe.steps == STEPS
        trained = exe.train_step(*held_out)
        assert exe.steps == STEPS + 1
    expected = _eval_in_one_process(name, before, held_out)
    assert abs(evaluated - expected) <= TOLERANCE * (1 + abs(expected))
    expected_shorter = _eval_in_one_process(name, before, _rows(held_out, fewer))
    assert abs(shorter - expected_shorter) <= TOLERANCE * (1 + abs(expected_shorter))
    assert again == evaluated
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(trained)  # training carries on after evaluating


@pytest.mark.timeout(120)
def test_a_bad_batch_is_refused_before_any_worker_runs():
    case = build_case("mlp", 1)
    inputs, targets = case.batches[0]
    plan = plan_for("mlp", 2, tp=1, pp=2, dp=1, micro_batch_size=2)
    with compile_case(case, hap.Cluster.local_cpu(2), plan, adamw) as exe:
        with pytest.raises(ValueError, match="input 0 has shape"):
            exe.eval_step((inputs[0][:, :8],), targets)
        rows = exe.plan.global_batch // exe.plan.num_microbatches
        with pytest.raises(
            ValueError, match=f"not a whole number of the plan's micro-batches of {rows}"
        ):
            exe.eval_step((inputs[0][: rows + 1],), targets[: rows + 1])
        with pytest.raises(ValueError, match="inputs and targets with batches of"):
            exe.eval_step((inputs[0][:rows],), targets[: 2 * rows])
