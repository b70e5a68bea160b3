"""The outer pass end to end: plans are valid, fit memory, and are never worse than a hand
configuration priced by the same simulator; the simulator agrees with the schedule formulas."""

from __future__ import annotations

import numpy as np
import pytest

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.plan import ParallelPlan
from stage_partitioner.layers import planning_layers
from stage_partitioner.manual import ManualConfig, simulate_manual
from stage_partitioner.model_planning import capture_spec, planning_context
from stage_partitioner.planner import (
    PlannerOptions,
    distinct_options,
    plan_in_context,
    to_parallel_plan,
)
from stage_partitioner.simulator import candidate_from_plan
from stage_partitioner.stage_costs import (
    MeshChoice,
    StageCostTable,
    StageOption,
    build_table,
    part_tasks,
)

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=1024,seq=128"


@pytest.fixture(scope="module")
def graph():
    return capture_spec(SPEC, seq=None, precision="bf16")


def context_for(graph, cluster_spec: str, batch: int, **options):
    cluster = Cluster.from_spec(cluster_spec)
    return planning_context(
        graph, cluster, PlannerOptions(global_batch=batch, workers=1, **options), "bf16"
    )


def test_plan_is_valid_fits_and_round_trips(graph, tmp_path):
    context = context_for(graph, "2x4xA100-80GB", 32)
    plan, simulation = plan_in_context(context, model_name=SPEC, precision="bf16")
    plan.validate()
    plan.check_matches(graph, context.cluster)
    assert plan.predicted_peak_memory_bytes_per_device <= context.budget
    assert plan.micro_batch_size * plan.num_microbatches == 32
    assert plan.seq_len == 128  # the spec's seq, so `hap simulate plan.json` re-captures alike
    path = plan.save(tmp_path / "plan.json")
    loaded = ParallelPlan.load(path)
    assert loaded == plan
    again = context.simulator.simulate(candidate_from_plan(context, loaded))
    assert again.step_time_s == pytest.approx(simulation.step_time_s)


@pytest.mark.parametrize(
    "config",
    [
        ManualConfig(tp=1, pp=1, dp=8, micro_batch_size=1),
        ManualConfig(tp=4, pp=2, dp=1, micro_batch_size=2),
        ManualConfig(tp=2, pp=2, dp=2, micro_batch_size=1, recompute="full"),
        ManualConfig(
            tp=1, pp=2, dp=4, micro_batch_size=1, schedule="interleaved", virtual_stages=2
        ),
    ],
)
def test_planner_is_never_worse_than_a_manual_configuration(graph, config):
    context = context_for(graph, "2x4xA100-80GB", 32)
    manual = simulate_manual(context, config)
    assert manual is not None
    plan, _ = plan_in_context(context, model_name=SPEC, precision="bf16")
    assert plan.predicted_step_time_s <= manual[1].step_time_s * (1 + 1e-9)


def test_uniform_1f1b_step_follows_the_bubble_formula(graph):
    """Equal stages, no transfers between ranks that matter at this size: the simulated step
    is (m + p − 1)·(f + b) plus the gradient sync, within the transfer time."""
    context = context_for(graph, "1x4xA100-80GB", 16)
    candidate, simulation = simulate_manual(
        context, ManualConfig(tp=1, pp=4, dp=1, micro_batch_size=1)
    )
    middle = simulation.stages[1]
    m, p = candidate.num_microbatches, candidate.num_ranks
    ideal = (m + p - 1) * middle.time_per_microbatch_s
    transfers = 2 * (p - 1) * m * max(s.send_s for s in simulation.stages)
    assert (
        ideal * 0.8
        <= simulation.step_time_s
        <= ideal * 1.3 + transfers + sum(s.gradient_sync_s for s in simulation.stages)
    )


def test_in_flight_memory_of_1f1b_is_p_microbatches_on_the_first_stage(graph):
    context = context_for(graph, "1x4xA100-80GB", 16)
    _, simulation = simulate_manual(context, ManualConfig(tp=1, pp=4, dp=1, micro_batch_size=1))
    first, last = simulation.memory[0], simulation.memory[-1]
    act_first, act_last = (
        simulation.stages[0].activation_bytes,
        simulation.stages[-1].activation_bytes,
    )
    assert first.activations == pytest.approx(4 * act_first, rel=1e-6, abs=8)
    assert last.activations == pytest.approx(1 * act_last, rel=1e-6, abs=8)


def test_bad_manual_configuration_names_the_fix(graph):
    context = context_for(graph, "1x4xA100-80GB", 16)
    with pytest.raises(ValueError, match="tp·pp·dp"):
        simulate_manual(context, ManualConfig(tp=2, pp=1, dp=1, micro_batch_size=1))
    with pytest.raises(ValueError, match="divisible"):
        simulate_manual(context, ManualConfig(tp=1, pp=1, dp=4, micro_batch_size=3))


def test_to_parallel_plan_places_every_parameter(graph):
    context = context_for(graph, "1x4xA100-80GB", 16)
    candidate, simulation = simulate_manual(
        context, ManualConfig(tp=2, pp=2, dp=1, micro_batch_size=2)
    )
    plan = to_parallel_plan(
        candidate,
        simulation,
        graph,
        context.cluster,
        context.solver,
        model_name=SPEC,
        precision="bf16",
    )
    placed = {fqn for stage in plan.stages for fqn in stage.param_placements}
    assert placed == set(graph.param_shapes)
    assert [s.devices for s in plan.stages] == [(0, 1), (2, 3)]


def test_no_plan_fits_names_the_memory_needed_and_the_fixes(graph):
    from hierarchical_ap import NoFeasiblePlanError

    context = context_for(graph, "1x4xA100-80GB", 16, memory_fraction=1e-5)
    with pytest.raises(NoFeasiblePlanError, match=r"smallest plan found needs \d+\.\d+ GiB") as err:
        plan_in_context(context, model_name=SPEC, precision="bf16")
    assert "more devices" in str(err.value) and "--memory-fraction" in str(err.value)


def test_bad_planner_options_are_user_errors(graph):
    from hierarchical_ap import HapError

    with pytest.raises(HapError, match="global batch"):
        plan_in_context(context_for(graph, "1x4xA100-80GB", 0))


@pytest.mark.parametrize("tied", [1, 0])
def test_tied_embedding_is_held_once_by_a_single_pipeline_rank(tied):
    """One device holds the whole model: its state is 18 bytes per bf16 parameter (weight,
    fp32 gradient, master and two moments), each parameter once, the tied embedding (read by
    the input embedding and the LM head, so counted by both parts' ILPs) included. With two
    pipeline ranks each holds its copy."""
    spec = f"gpt:layers=2,hidden=256,heads=8,vocab=4096,seq=64,tied={tied}"
    graph = capture_spec(spec, seq=None, precision="bf16")
    alone = context_for(graph, "1x1xA100-80GB", 4)
    _, one = simulate_manual(alone, ManualConfig(tp=1, pp=1, dp=1, micro_batch_size=1))
    pair = context_for(graph, "1x2xA100-80GB", 4)
    _, two = simulate_manual(pair, ManualConfig(tp=1, pp=2, dp=1, micro_batch_size=1))
    per_byte = 18 / 2
    memory_factors = alone.training_memory
    assert 1 + memory_factors.gradient_factor + memory_factors.optimizer_factor == per_byte
    embedding = 4096 * 256 * 2
    (memory,) = one.memory
    state = memory.parameters + memory.gradients + memory.optimizer
    assert state == pytest.approx(per_byte * graph.param_bytes, rel=1e-6, abs=16)
    first, last = (m.parameters + m.gradients + m.optimizer for m in two.memory)
    copies = first + last - per_byte * graph.param_bytes
    assert copies == pytest.approx(per_byte * embedding if tied else 0, rel=1e-6, abs=16)


def test_stage_table_holds_a_tied_embedding_once_per_range():
    """The DP's range sums agree with the simulator: the range of every layer holds the tied
    embedding once, a range with only one of its readers is the plain sum."""
    spec = "gpt:layers=2,hidden=256,heads=8,vocab=4096,seq=64,tied=1"
    graph = capture_spec(spec, seq=None, precision="bf16")
    context = context_for(graph, "1x1xA100-80GB", 4)
    candidate, simulation = simulate_manual(
        context, ManualConfig(tp=1, pp=1, dp=1, micro_batch_size=1)
    )
    layers = list(candidate.layers)
    option = candidate.options[0]
    table = build_table(context.solver, layers, candidate.microbatch, [option.mesh], ("none",))
    q = table.options.index(option)
    plain, held = table.range_sum(table.state), table.range_state()
    (memory,) = simulation.memory
    whole = memory.parameters + memory.gradients + memory.optimizer
    last = len(layers) - 1
    assert held[0, last, q] == pytest.approx(whole, rel=1e-6)
    embedding = 4096 * 256 * 2 * 9  # bf16 weight, 18 bytes of state per parameter
    assert plain[0, last, q] - held[0, last, q] == pytest.approx(embedding, rel=1e-6)
    assert held[1, last, q] == pytest.approx(plain[1, last, q])
    assert table.state_of(list(range(last + 1)), q) == pytest.approx(held[0, last, q])
    # one planning layer holding both readers holds the embedding once too
    (single,) = planning_layers(graph, num_layers=1)
    context.solver.solve_all(part_tasks([single], candidate.microbatch, [option.mesh]))
    merged = build_table(context.solver, [single], candidate.microbatch, [option.mesh], ("none",))
    assert merged.range_state()[0, 0, q] == pytest.approx(whole, rel=1e-6)


def test_distinct_options_keeps_one_of_each_set_of_equal_columns():
    """Memory levels whose ILPs found the same shardings are one option to the screening;
    another mesh, recomputation or any differing column keeps an option of its own."""
    mesh, other = MeshChoice((1, 4), (4, 1)), MeshChoice((1, 4), (2, 2))
    options = [
        StageOption(mesh, 0, "none"),
        StageOption(mesh, 1, "none"),  # = level 0
        StageOption(mesh, 2, "none"),  # less state: kept
        StageOption(other, 0, "none"),  # another logical mesh: kept
        StageOption(mesh, 0, "full"),  # recomputes: kept
    ]
    column = np.array([[1.0], [2.0]])
    same = np.repeat(column, len(options), axis=1)
    state = same.copy()
    state[:, 2] = 0.5
    table = StageCostTable(
        layers=[],
        microbatch=1,
        options=options,
        time=same,
        forward_time=same,
        gradient_sync=same,
        state=state,
        activation=same,
        peak_extra=same,
        shared_state={},
    )
    assert distinct_options(table) == [0, 2, 3, 4]
