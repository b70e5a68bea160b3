"""Pipeline workers on bare gloo processes (no Ray), checked against single-process training.

Each case builds a plan with the manual (Megatron-style) configuration code, runs
``PipelineWorker`` on 4 spawned processes through a few SGD steps of a tiny model and compares
every step's loss and the final parameters with the same steps in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.distributed import DistributedWorkers
from tests.runtime_cases import (
    build_case,
    built_worker,
    canonical_names,
    compare,
    megatron,
    plan_for,
    reference_run,
    sgd,
)

WORLD = 4
STEPS = 2


def train_on_rank(plan, name: str, meta: bool, steps: int) -> tuple[list[list[float]], dict]:
    """On one rank: build the worker, train ``steps`` steps, return its losses and state."""
    torch.manual_seed(0)
    case = build_case(name, steps, meta=meta)
    worker = built_worker(plan, case, sgd)
    losses = [worker.train_step(inputs, targets) for inputs, targets in case.batches]
    return losses, worker.full_state()


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


CASES = [
    # name, tp, pp, dp, schedule, v, meta ("megatron-*": Megatron placements on the plan)
    ("mlp", 1, 4, 1, "1f1b", 1, False),
    ("mlp", 2, 2, 1, "gpipe", 1, True),
    ("gpt", 1, 2, 2, "interleaved", 2, False),
    ("hf-gpt2", 2, 2, 1, "1f1b", 1, False),
    ("hf-llama", 1, 2, 2, "gpipe", 1, True),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name,tp,pp,dp,schedule,v,meta",
    CASES,
    ids=[f"{c[0]}-tp{c[1]}pp{c[2]}dp{c[3]}-{c[4]}" for c in CASES],
)
def test_pipeline_workers_train_like_one_process(workers, name, tp, pp, dp, schedule, v, meta):
    model_name = name.removeprefix("megatron-")
    plan = plan_for(
        model_name,
        WORLD,
        tp=tp,
        pp=pp,
        dp=dp,
        schedule=schedule,
        virtual_stages=v,
        micro_batch_size=2 // dp if dp <= 2 else 1,
    )
    if name.startswith("megatron-"):
        plan = megatron(plan)
        assert sum("S(" in "".join(p) for p in plan.stages[1].param_placements.values()) >= 8
    name = model_name
    results = workers.run(train_on_rank, plan, name, meta, STEPS, timeout_s=200)
    losses = next(r[0] for r in results if r[0][0] is not None)
    step_losses = [sum(mb) / len(mb) for mb in losses]
    state: dict = {}
    for _, shard in results:
        state.update(shard)
    reference = reference_run(build_case(name, STEPS, meta=meta), sgd)
    keys = reference[1].keys()
    canonical = canonical_names(build_case(name, 1, meta=True).model)
    full = {k: state[canonical.get(k, k)] for k in keys}
    assert compare(step_losses, full, reference) == {}
