"""The plain-tensor path of one-device stages, checked against the DTensor path and one process.

On a one-device mesh ``ShardedProgram.run_part`` runs a stage's graph slice as a compiled
``fx.GraphModule`` on plain tensors instead of node by node on DTensors, and the parameters
are wrapped once per optimizer step (``open_step`` / ``close_step``). These tests check:

* the same part, built twice on the same one-device mesh (default: plain; ``plain=False``:
  DTensor), gives the same values, the same gradients of its received inputs and the same
  parameter gradients accumulated over two micro-batches of one step;
* without an open step the plain path still sends gradients to the DTensor parameters;
* a 2-stage 1F1B pipeline of one-device stages on 2 gloo processes trains like one process
  (losses and final parameters within 1e-5), running the plain path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hierarchical_ap.graph import capture
from intra_op.apply import apply, propagate_solution
from intra_op.placement import replicated
from runtime import boundary
from runtime.stage_graph import slice_stages
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
MICRO_BATCH = 2


def _stage_programs(name: str, stage_index: int, plain: bool | None):
    """The program of stage ``stage_index`` of a 2-stage plan of ``name`` on a one-device
    mesh, its slice, and zero-free seeded inputs of one micro-batch."""
    plan = plan_for(name, WORLD, tp=1, pp=2, dp=1, micro_batch_size=MICRO_BATCH)
    case = build_case(name, 1)
    inputs, targets = case.batches[0]
    graph = capture(
        case.model,
        tuple(t[:MICRO_BATCH] for t in inputs),
        loss_fn=case.loss_fn,
        targets=targets[:MICRO_BATCH],
    )
    stage_slice = slice_stages(graph, plan)[stage_index]
    # every rank makes every rank's one-device mesh, in the same order (groups are collective)
    meshes = [DeviceMesh("cpu", [rank]) for rank in range(dist.get_world_size())]
    mesh = meshes[dist.get_rank()]
    outside = [*stage_slice.user_inputs, *stage_slice.received]
    placements = {name: replicated(1) for name in outside}
    zeros = {
        n: torch.zeros(graph.value_meta(n).shape, dtype=graph.value_meta(n).dtype) for n in outside
    }
    params = {fqn: replicated(1) for fqn in stage_slice.params}
    solution = propagate_solution(graph, mesh, params, placements, zeros, nodes=stage_slice.nodes)
    program = apply(graph, solution, mesh, case.model, nodes=stage_slice.nodes, plain=plain)
    return program, stage_slice, graph, case


def run_both_paths(name: str, stage_index: int) -> dict[str, float]:
    """Largest |plain - DTensor| over outputs, received gradients and parameter gradients of
    two micro-batches in one step; also which path each program ran."""
    results = {}
    for plain in (None, False):
        program, stage_slice, graph, case = _stage_programs(name, stage_index, plain)
        wanted = [*stage_slice.sent, *stage_slice.outputs]
        program.open_step()
        outputs, received_grads = [], []
        for mb in range(2):
            values = microbatch_values(graph, stage_slice, case, mb, MICRO_BATCH)
            # received values enter as StageProgram passes them (a DTensor the grad reaches)
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
            received_grads += [values[n].grad for n in stage_slice.received]
        program.close_step()
        grads = {fqn: p.grad.full_tensor() for fqn, p in program.parameters_by_fqn().items()}
        results[plain] = (program.runs_plain, outputs, received_grads, grads)
    plain_run, dtensor_run = results[None], results[False]

    assert plain_run[3].keys() == dtensor_run[3].keys()
    keys = sorted(plain_run[3])
    return {
        "plain_ran_plain": float(plain_run[0]),
        "dtensor_ran_plain": float(dtensor_run[0]),
        "outputs": largest_gap(plain_run[1], dtensor_run[1]),
        "received_grads": largest_gap(plain_run[2], dtensor_run[2]),
        "param_grads": largest_gap(
            [plain_run[3][k] for k in keys], [dtensor_run[3][k] for k in keys]
        ),
        "num_param_grads": float(len(keys)),
    }


def grads_without_step(name: str) -> float:
    """Largest |plain - DTensor| parameter gradient of one ``run_part`` without open step."""
    grads = []
    for plain in (None, False):
        program, stage_slice, graph, case = _stage_programs(name, 1, plain)
        values = microbatch_values(graph, stage_slice, case, 0, MICRO_BATCH)
        (loss_name,) = stage_slice.outputs
        entering = {
            n: boundary.entering(v, program.device_mesh) if n in stage_slice.received else v
            for n, v in values.items()
        }
        program.run_part(entering, [loss_name])[loss_name].full_tensor().backward()
        grads.append([p.grad.full_tensor() for p in program.parameters_by_fqn().values()])
    return max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))


def train_on_rank(plan, name: str, steps: int):
    """On one rank: build the worker, train ``steps`` steps; losses, state, paths run."""
    torch.manual_seed(0)
    case = build_case(name, steps)
    worker = built_worker(plan, case, adamw)
    losses = [worker.train_step(inputs, targets) for inputs, targets in case.batches]
    plain = [p.program.runs_plain for p in worker.programs.values()]
    return losses, worker.full_state(), plain


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,stage", [("gpt", 0), ("gpt", 1), ("llama", 1), ("mlp", 1)])
def test_plain_path_equals_dtensor_path(workers, name, stage):
    gaps = workers.run(run_both_paths, name, stage, timeout_s=200)[0]
    assert gaps["plain_ran_plain"] == 1.0 and gaps["dtensor_ran_plain"] == 0.0
    assert gaps["num_param_grads"] > 0
    assert gaps["outputs"] <= 1e-6, gaps
    assert gaps["received_grads"] <= 1e-6, gaps
    assert gaps["param_grads"] <= 1e-6, gaps


@pytest.mark.timeout(240)
def test_plain_path_without_open_step_reaches_parameters(workers):
    assert workers.run(grads_without_step, "gpt", timeout_s=200)[0] <= 1e-6


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_one_device_stages_train_like_one_process(workers, name):
    plan = plan_for(name, WORLD, tp=1, pp=2, dp=1, micro_batch_size=MICRO_BATCH)
    results = workers.run(train_on_rank, plan, name, STEPS, timeout_s=200)
    assert all(all(plain) for _, _, plain in results)
    losses = next(r[0] for r in results if r[0][0] is not None)
    step_losses = [sum(mb) / len(mb) for mb in losses]
    state: dict = {}
    for _, shard, _ in results:
        state.update(shard)
    reference = reference_run(build_case(name, STEPS), adamw)
    canonical = canonical_names(build_case(name, 1).model)
    full = {k: state[canonical.get(k, k)] for k in reference[1]}
    assert compare(step_losses, full, reference) == {}
