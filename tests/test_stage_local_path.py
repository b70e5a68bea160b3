"""Data-parallel stages on plain local shards, checked against the DTensor path and one process.

On a mesh of several devices, a stage whose forward DTensor runs without collectives, with
every parameter replicated and the batch split (``intra_op.local_execution``), runs inside a
step as the compiled plain graph module captured at the local batch, on each device's rows,
its parameter gradients all-reduced once per step. These tests check, on 2 gloo processes:

* the same stage built twice on a 2-device data-parallel mesh (default: local shards;
  ``plain=False``: DTensor) gives the same values, gradients of its received inputs and
  parameter gradients accumulated over two micro-batches of one step;
* the reasons a stage does not qualify: a sharded parameter, no local graph, a local graph at
  another batch, a forward with collectives; ``plain=True`` then raises naming the reason;
* a data-parallel plan with every parameter replicated trains like one process (losses and
  final parameters within the runtime tests' tolerance) on the local path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh

from hierarchical_ap.graph import capture
from intra_op.apply import apply, propagate_solution
from intra_op.local_execution import local_execution, local_shape
from intra_op.placement import Replicate, Shard, replicated
from intra_op.solution import ShardingSolution
from runtime import boundary
from runtime.stage_graph import slice_stages
from runtime.stage_program import batch_placements
from tests.distributed import DistributedWorkers
from tests.runtime_cases import (
    adamw,
    build_case,
    built_worker,
    canonical_names,
    compare,
    largest_gap,
    microbatch_values,
    plan_for,
    reference_run,
)

WORLD = 2
STEPS = 2
MICRO_BATCH = 4


def _replicated_plan(plan):
    """``plan`` with every parameter of every stage stored replicated."""
    stages = [
        dataclasses.replace(
            stage,
            param_placements={fqn: ("R",) * len(ps) for fqn, ps in stage.param_placements.items()},
        )
        for stage in plan.stages
    ]
    return dataclasses.replace(plan, stages=stages)


@functools.cache
def _data_parallel_mesh() -> DeviceMesh:
    """The ``(2, 1)`` mesh of this process group, made once per process: every mesh makes
    process groups, and a process holds a bounded number of gloo connections."""
    return DeviceMesh("cpu", [[0], [1]])


def _capture(case, rows: int):
    inputs, targets = case.batches[0]
    return capture(
        case.model, tuple(t[:rows] for t in inputs), loss_fn=case.loss_fn, targets=targets[:rows]
    )


def _stage_program(name: str, stage_index: int, plain, *, shard: str = "", local_rows=None):
    """Stage ``stage_index`` of a 2-stage slicing of ``name``, on a 2-device mesh that splits
    the batch; ``shard`` names a parameter stored ``Shard(0)`` instead of replicated (set in
    the propagated solution);
    ``local_rows`` is the batch of the local graph (``None``: no local graph)."""
    plan = plan_for(name, WORLD, tp=1, pp=2, dp=1, micro_batch_size=MICRO_BATCH)
    case = build_case(name, 1)
    graph = _capture(case, MICRO_BATCH)
    local_graph = None if local_rows is None else _capture(case, local_rows)
    stage_slice = slice_stages(graph, plan)[stage_index]
    mesh = _data_parallel_mesh()
    outside = [*stage_slice.user_inputs, *stage_slice.received]
    metas = {n: graph.value_meta(n) for n in outside}
    placements = {n: batch_placements(m.shape, MICRO_BATCH, (2, 1)) for n, m in metas.items()}
    zeros = {n: torch.zeros(m.shape, dtype=m.dtype) for n, m in metas.items()}
    params = {fqn: replicated(2) for fqn in stage_slice.params}
    solution = propagate_solution(graph, mesh, params, placements, zeros, nodes=stage_slice.nodes)
    if shard:  # stored split, used as before: only the storage breaks condition 1
        solution.param_placements[shard] = (Shard(0), Replicate())
    program = apply(
        graph,
        solution,
        mesh,
        case.model,
        nodes=stage_slice.nodes,
        plain=plain,
        local_graph=local_graph,
    )
    return program, stage_slice, graph, case


def run_both_paths(name: str, stage_index: int) -> dict[str, float]:
    """Largest |local - DTensor| over outputs, received gradients and parameter gradients of
    two micro-batches in one step; also which path each program ran."""
    results = {}
    for plain in (None, False):
        program, stage_slice, graph, case = _stage_program(
            name, stage_index, plain, local_rows=MICRO_BATCH // 2
        )
        wanted = [*stage_slice.sent, *stage_slice.outputs]
        program.open_step()
        outputs, received_grads = [], []
        for mb in range(2):
            values = microbatch_values(graph, stage_slice, case, mb, MICRO_BATCH)
            entering = {
                n: boundary.entering(v, program.device_mesh) if n in stage_slice.received else v
                for n, v in values.items()
            }
            out = program.run_part(entering, wanted)
            full = [out[n].full_tensor() for n in wanted]
            generator = torch.Generator().manual_seed(20 + mb)
            seeds = [torch.randn(t.shape, generator=generator) for t in full]
            torch.autograd.backward(full, seeds)
            outputs += [t.detach() for t in full]
            received_grads += [values[n].grad.clone() for n in stage_slice.received]
        program.close_step()
        grads = {fqn: p.grad.full_tensor() for fqn, p in program.parameters_by_fqn().items()}
        results[plain] = (program.runs_local, outputs, received_grads, grads)
    local_run, dtensor_run = results[None], results[False]

    keys = sorted(local_run[3])
    assert keys == sorted(dtensor_run[3])
    return {
        "local_ran_local": float(local_run[0]),
        "dtensor_ran_local": float(dtensor_run[0]),
        "outputs": largest_gap(local_run[1], dtensor_run[1]),
        "received_grads": largest_gap(local_run[2], dtensor_run[2]),
        "param_grads": largest_gap(
            [local_run[3][k] for k in keys], [dtensor_run[3][k] for k in keys]
        ),
        "num_param_grads": float(len(keys)),
        "num_received": float(len(local_run[2])),
    }


def obstacles(name: str) -> dict[str, str]:
    """Why stage 1 of ``name`` does not run on local shards in each broken case, and the error
    ``plain=True`` raises for one of them."""
    program, stage_slice, *_ = _stage_program(name, 1, None, local_rows=MICRO_BATCH // 2)
    assert program.runs_local
    sharded = next(fqn for fqn in stage_slice.params if fqn.endswith("weight"))
    reasons = {"sharded_param": sharded}
    for case, kwargs in {
        "sharded": {"shard": sharded, "local_rows": MICRO_BATCH // 2},
        "no_local_graph": {},
        "wrong_batch": {"local_rows": MICRO_BATCH},
    }.items():
        try:
            _stage_program(name, 1, True, **kwargs)
            reasons[case] = ""
        except ValueError as exc:
            reasons[case] = str(exc)
        program, *_ = _stage_program(name, 1, None, **kwargs)
        reasons[case + "_ran_local"] = str(program.runs_local)
    return reasons


def train_on_rank(plan, name: str, steps: int):
    """On one rank: build the worker, train ``steps`` steps; losses, state, local paths."""
    torch.manual_seed(0)
    case = build_case(name, steps)
    worker = built_worker(plan, case, adamw)
    losses = [worker.train_step(inputs, targets) for inputs, targets in case.batches]
    local = {s: p.program.runs_local for s, p in worker.programs.items()}
    return losses, worker.full_state(), local


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


def test_local_shape_divides_each_sharded_dim_by_its_axes():
    assert local_shape((8, 6, 4), (Shard(0), Shard(2)), (2, 2)) == (4, 6, 2)
    assert local_shape((8, 6), (Shard(0), Shard(0)), (2, 2)) == (2, 6)
    assert local_shape((8, 6), (Replicate(), Replicate()), (2, 2)) == (8, 6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,stage", [("gpt", 0), ("gpt", 1), ("llama", 1), ("mlp", 1)])
def test_local_path_equals_dtensor_path(workers, name, stage):
    gaps = workers.run(run_both_paths, name, stage, timeout_s=240)[0]
    assert gaps["local_ran_local"] == 1.0 and gaps["dtensor_ran_local"] == 0.0
    assert gaps["num_param_grads"] > 0
    assert gaps["num_received"] == (0.0 if stage == 0 else gaps["num_received"])
    assert gaps["outputs"] <= 1e-5, gaps
    assert gaps["received_grads"] <= 1e-6, gaps
    assert gaps["param_grads"] <= 1e-5, gaps


@pytest.mark.timeout(300)
def test_stages_that_do_not_qualify_run_on_dtensors_and_say_why(workers):
    reasons = workers.run(obstacles, "gpt", timeout_s=240)[0]
    assert f"parameter '{reasons['sharded_param']}' is stored S0R" in reasons["sharded"]
    assert "no graph at the local batch" in reasons["no_local_graph"]
    assert "in the local graph but" in reasons["wrong_batch"]
    for case in ("sharded", "no_local_graph", "wrong_batch"):
        assert "leave plain=None" in reasons[case]
        assert reasons[case + "_ran_local"] == "False"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_data_parallel_stage_trains_like_one_process(workers, name):
    plan = _replicated_plan(plan_for(name, WORLD, tp=1, pp=1, dp=2, micro_batch_size=MICRO_BATCH))
    results = workers.run(train_on_rank, plan, name, STEPS, timeout_s=240)
    assert all(local == {0: True} for _, _, local in results)
    losses = next(r[0] for r in results if r[0][0] is not None)
    step_losses = [sum(mb) / len(mb) for mb in losses]
    reference = reference_run(build_case(name, STEPS), adamw)
    state: dict = {}
    for _, shard, _ in results:
        state.update(shard)
    full = {k: state[canonical_names(build_case(name, 1).model).get(k, k)] for k in reference[1]}
    assert compare(step_losses, full, reference) == {}


def test_collectives_in_the_forward_keep_a_stage_on_dtensors():
    """Condition 2 alone, without a mesh: a solution whose forward ran a collective (or whose
    collectives are unknown) does not qualify, whatever else holds."""
    case = build_case("mlp", 1)
    graph = _capture(case, MICRO_BATCH)
    solution = ShardingSolution((2, 1), {}, {}, {}, {})
    assert "not recorded by propagate_solution" in local_execution(
        graph, solution, (2, 1), None, {}, graph
    )
    solution.forward_collectives = 3
    assert "runs 3 collective(s)" in local_execution(graph, solution, (2, 1), None, {}, graph)
