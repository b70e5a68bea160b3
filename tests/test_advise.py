"""`hap advise`: formability, ZeRO pricing, memory accounting, the simplicity rule, what-if.

References: brute force over every degree for formability; the ZeRO paper's accounting
(16 bytes per parameter for fp32 Adam, each part divided by the data-parallel degree as the
stage partitions it) counted from the model's own parameters; ring collective formulas for
what ZeRO-2 adds to ZeRO-0; the cluster datasheet for what-if changes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hierarchical_ap.cluster import Cluster, LogicalMesh, Submesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import PlannerOptionError
from hierarchical_ap.models import from_spec
from hierarchical_ap.profile import TensorMeta, optimizer_update_profile
from intra_op.cost_graph import candidate_placements
from intra_op.gradient_sync import BUCKET_BYTES
from intra_op.placement import Partial, Replicate, Shard
from intra_op.zero import PERSISTENCE_THRESHOLD, ZeroStage
from stage_partitioner.advisor import (
    CANNOT_BE_FORMED,
    DOES_NOT_FIT,
    EQUIVALENT,
    Configuration,
    MemoryPerDevice,
    ModelShape,
    Row,
    SearchSpace,
    enumerate_configurations,
    recommend,
)
from stage_partitioner.advisor_search import AdvisorOptions, advise, price_all
from stage_partitioner.manual import ManualConfig, simulate_manual
from stage_partitioner.model_planning import capture_spec, planning_context
from stage_partitioner.planner import PlannerOptions
from stage_partitioner.what_if import apply_what_if, parse_what_if

SPEC = "gpt:layers=2,hidden=256,heads=4,vocab=1024,seq=64,tied=false"
"""Every dim divides 4; matrices of ≥ 1e5 elements except attention's output projection."""
ACROSS_HOSTS = "4x1xA100-80GB"
"""One device per host: the data-parallel axis crosses hosts, so the ILP data-parallelises."""
BATCH, MICRO = 64, 8
"""dp = 4 replicas of 8 sequences: B = 2 micro-batches per step."""


@pytest.fixture(scope="module")
def graph():
    return capture_spec(SPEC, seq=None, precision="fp32")


@pytest.fixture(scope="module")
def parameters() -> dict[str, int]:
    model = from_spec(SPEC, batch=1, device="meta").model
    return {name: p.numel() for name, p in model.named_parameters()}


def context_for(graph, cluster: Cluster, batch: int = BATCH):
    options = PlannerOptions(global_batch=batch, workers=1)
    return planning_context(graph, cluster, options, "fp32")


def priced_zero_stages(graph) -> dict[int, Row]:
    """tp = pp = 1, dp = 4, m = 8, each ZeRO stage, priced exhaustively."""
    cluster = Cluster.from_spec(ACROSS_HOSTS)
    configs = [Configuration(1, 1, 4, MICRO, zero) for zero in range(4)]
    rows, rejected = price_all(
        context_for(graph, cluster), configs, peak_flops=cluster.device.peak_flops_fp32
    )
    assert not rejected
    return {row.config.zero: row for row in rows}


@pytest.fixture(scope="module")
def zero_rows(graph):
    return priced_zero_stages(graph)


# ------------------------------------------------------------------------------ formability


def formable(tp, pp, dp, m, shape, per_host, batch):
    """The conditions of `stage_partitioner.advisor`'s docstring, checked one by one."""
    group = tp * dp
    return (
        per_host % tp == 0
        and shape.heads % tp == 0
        and shape.kv_heads % tp == 0
        and shape.layers % pp == 0
        and (group <= per_host or group % per_host == 0)
        and batch % (dp * m) == 0
    )


@pytest.mark.parametrize(
    ("shape", "hosts", "per_host", "batch"),
    [(ModelShape(6, 4, 2), 3, 4, 24), (ModelShape(8, 8, 8), 2, 8, 32)],
)
def test_enumeration_is_every_formable_configuration_and_says_why_not(
    shape, hosts, per_host, batch
):
    devices = hosts * per_host
    configs, rejected = enumerate_configurations(shape, hosts, per_host, batch)
    expected = set()
    for tp, pp, m in itertools.product(range(1, per_host + 1), range(1, devices + 1), (1, 2, 4, 8)):
        if devices % (tp * pp):
            continue
        dp = devices // (tp * pp)
        if not formable(tp, pp, dp, m, shape, per_host, batch):
            continue
        microbatches = batch // (dp * m)
        schedules = [("1f1b", 1)]
        if pp > 1:
            schedules += [("gpipe", 1)] + [
                ("interleaved", v)
                for v in (2, 3, 4)
                if (shape.layers // pp) % v == 0 and microbatches % pp == 0
            ]
        for zero, recompute, (schedule, v) in itertools.product(
            range(4), ("none", "full"), schedules
        ):
            if zero and dp == 1 or zero >= 2 and pp > 1:
                continue
            expected.add(Configuration(tp, pp, dp, m, zero, recompute, schedule, v))
    assert set(configs) == expected
    assert len(configs) == len(expected)
    reasons = {r.reason for r in rejected if r.category == CANNOT_BE_FORMED}
    if shape.kv_heads == 2:  # 6 heads, 2 kv heads, 3 hosts of 4
        assert "tp=4 does not divide the 2 key/value heads" in reasons
        assert "pp=4 does not divide the 6 layers" in reasons
        assert any(
            "tp·dp = 6 devices are neither inside a host nor whole hosts" in r for r in reasons
        )
        assert "dp·m = 48 does not divide the global batch 24" in reasons
    rules = {r.rule for r in rejected}
    assert "selective recomputation" in rules and "ZeRO with dp = 1" in rules
    assert all(r.category == EQUIVALENT for r in rejected if r.rule == "selective recomputation")


# ------------------------------------------------------------------------------ ZeRO pricing


def test_zero_storage_choices_follow_the_stage_and_tensor_parallelism():
    weight, bias = _meta((768, 256)), _meta((768,))
    mesh = (2, 4)
    choices = candidate_placements(weight, mesh)
    for zero in range(3):
        allowed = ZeroStage(zero, tensor_parallel=True).storage_choices(weight, choices, mesh)
        assert allowed and all(isinstance(p[0], Replicate) for p in allowed)
        assert all(isinstance(p[1], Shard) for p in allowed)
    zero3 = ZeroStage(3, tensor_parallel=True).storage_choices(weight, choices, mesh)
    assert zero3 and all(isinstance(p[0], Shard) and isinstance(p[1], Shard) for p in zero3)
    assert bias.numel < PERSISTENCE_THRESHOLD  # stays whole under ZeRO-3 (DeepSpeed's rule)
    small = ZeroStage(3).storage_choices(bias, candidate_placements(bias, mesh), mesh)
    assert all(isinstance(p[0], Replicate) for p in small)
    # 16 bytes per fp32 parameter (weight 4 + gradient 4 + Adam moments 8), tp = 4, dp = 2
    stored = (Replicate(), Shard(0))
    per_tp = weight.numel / 4 * 4
    expected = {0: (1, 1, 2), 1: (1, 1, 1), 2: (1, 0.5, 1)}
    for zero, (w, g, o) in expected.items():
        state = ZeroStage(zero).state_bytes(weight, stored, mesh, 1.0, 2.0)
        assert (state.parameters, state.gradients, state.optimizer) == (
            per_tp * w,
            per_tp * g,
            per_tp * o,
        )


def test_list_collectives_add_per_rank_work_and_buffer_passes_to_zero3_collectives():
    """DeepSpeed's 2021 ZeRO-3 gathers (``intra_op.zero``): on top of the ring, a gather over
    n ranks costs n views and n copy launches plus the fill and copies of its buffer, three
    passes over the gathered bytes through HBM; a reduce-scatter the same per-rank work and two
    passes. Other resharding steps, and the default collectives, add nothing."""
    weight = _meta((768, 256))  # fp32, 786,432 bytes
    cluster = Cluster.from_spec("2x8xA100-80GB")
    mesh = LogicalMesh(Submesh(cluster, 0, 2, 0, 8), (16, 1))
    cost = CostModel()
    lists = ZeroStage(3, list_collectives=True)
    sharded, whole = (Shard(0), Replicate()), (Replicate(), Replicate())
    partial = (Partial(), Replicate())
    hbm = 2.039e12 * 0.8
    per_rank = 16 * (1.2e-6 + 5e-6)
    gather = lists.collective_overhead(weight, sharded, whole, mesh, cost)
    assert gather == pytest.approx(per_rank + 3 * weight.nbytes / hbm)
    scatter = lists.collective_overhead(weight, partial, sharded, mesh, cost)
    assert scatter == pytest.approx(per_rank + 2 * weight.nbytes / hbm)
    assert lists.collective_overhead(weight, whole, sharded, mesh, cost) == 0.0  # a local slice
    assert ZeroStage(3).collective_overhead(weight, sharded, whole, mesh, cost) == 0.0
    with pytest.raises(ValueError, match="stage 2 has none"):
        ZeroStage(2, list_collectives=True)


def test_list_collectives_without_zero3_is_refused_naming_the_fix(graph):
    cluster = Cluster.from_spec(ACROSS_HOSTS)
    options = PlannerOptions(global_batch=BATCH, zero_list_collectives=True)
    with pytest.raises(PlannerOptionError, match="set zero_stage=3"):
        planning_context(graph, cluster, options, "fp32")


def test_zero_partitions_a_weight_no_dim_of_which_splits_flat_and_padded():
    """DeepSpeed pads a flattened weight to a multiple of the ranks: 7 ranks split no dim of
    a 768 × 256 weight, yet every ZeRO-3 storage choice shards it on its largest dim, costed
    as 1/7 of it per device; ZeRO-1 and 2 pad the optimizer (and gradient) shard the same way."""
    weight = _meta((768, 256))
    mesh = (7, 1)
    choices = candidate_placements(weight, mesh)
    assert all(isinstance(p[0], Replicate) for p in choices)  # nothing even to choose
    assert ZeroStage(3).storage_choices(weight, choices, mesh) == [(Shard(0), Replicate())]
    stored = (Shard(0), Replicate())
    state = ZeroStage(3).state_bytes(weight, stored, mesh, 1.0, 2.0)
    assert state.total == pytest.approx(weight.nbytes * 4 / 7)
    replicated = (Replicate(), Replicate())
    zero2 = ZeroStage(2).state_bytes(weight, replicated, mesh, 1.0, 2.0)
    assert (zero2.parameters, zero2.gradients, zero2.optimizer) == pytest.approx(
        (weight.nbytes, weight.nbytes / 7, 2 * weight.nbytes / 7)
    )
    # under the persistence threshold ZeRO-3 keeps the weight whole, its other states padded
    bias = _meta((100,))
    assert ZeroStage(3).storage_choices(bias, candidate_placements(bias, mesh), mesh) == [
        replicated
    ]
    kept = ZeroStage(3).state_bytes(bias, replicated, mesh, 1.0, 2.0)
    assert kept.total == pytest.approx(bias.nbytes * (1 + 3 / 7))


def _meta(shape):
    return TensorMeta(shape=tuple(shape), stride=(), dtype=torch.float32)


def test_memory_breakdown_is_the_zero_papers_accounting(zero_rows, parameters):
    """fp32 Adam: 4 + 4 + 8 bytes per parameter. ZeRO-1 divides the optimizer states by dp,
    ZeRO-2 also the gradients, ZeRO-3 also the parameters (those of ≥ 1e5 elements; smaller
    ones stay whole and get ZeRO-2's treatment)."""
    dp = 4
    total = sum(parameters.values())
    big = sum(n for n in parameters.values() if n >= PERSISTENCE_THRESHOLD)
    small = total - big
    expected = {
        0: (4 * total, 4 * total, 8 * total),
        1: (4 * total, 4 * total, 8 * total / dp),
        2: (4 * total, 4 * total / dp, 8 * total / dp),
        3: (4 * big / dp + 4 * small, 4 * total / dp, 8 * total / dp),
    }
    for zero, (weights, gradients, optimizer) in expected.items():
        memory = zero_rows[zero].memory
        assert memory.parameters == pytest.approx(weights, rel=1e-9)
        assert memory.gradients == pytest.approx(gradients, rel=1e-9)
        assert memory.optimizer == pytest.approx(optimizer, rel=1e-9)
        assert memory.activations > 0


def test_a_tied_embedding_is_counted_once_on_a_single_pipeline_rank():
    """The same accounting with the LM head tied to the token embedding: the input embedding's
    and the head's ILPs each count the shared weight, the rank holds it once; and the row's
    memory is the simulator's."""
    spec = SPEC.replace("tied=false", "tied=true")
    graph = capture_spec(spec, seq=None, precision="fp32")
    model = from_spec(spec, batch=1, device="meta").model
    total = sum(p.numel() for p in model.parameters())  # the tied weight once
    cluster = Cluster.from_spec(ACROSS_HOSTS)
    context = context_for(graph, cluster)
    configs = [Configuration(1, 1, 4, MICRO, zero) for zero in (0, 1)]
    rows, _ = price_all(context, configs, peak_flops=cluster.device.peak_flops_fp32)
    zero0, zero1 = sorted(rows, key=lambda row: row.config.zero)
    assert (zero0.memory.parameters, zero0.memory.optimizer) == pytest.approx(
        (4 * total, 8 * total), rel=1e-9
    )
    assert zero1.memory.optimizer == pytest.approx(8 * total / 4, rel=1e-9)
    options = PlannerOptions(global_batch=BATCH, workers=1, zero_stage=0)
    held = planning_context(graph, cluster, options, "fp32")
    _, simulation = simulate_manual(held, ManualConfig(1, 1, 4, MICRO))
    (memory,) = simulation.memory
    assert memory.parameters == pytest.approx(zero0.memory.parameters, rel=1e-9)


def test_zero2_adds_a_reduce_scatter_per_extra_micro_batch(zero_rows):
    """Per transformer block (the same model with 4 blocks against 2, so that what the ILP
    does with the embeddings, the final norm and the head cancels): ZeRO-0 all-reduces each
    gradient once per step, in DDP buckets; ZeRO-2 reduce-scatters it every micro-batch and
    all-gathers the updated parameter once. With one device per host, ring all-reduce =
    reduce-scatter + all-gather, so ZeRO-2 costs (B − 1) reduce-scatters more, per tensor
    (n−1)·α + (n−1)/n · bytes / (25 GB/s · 0.8), n = 4, α = 10 µs, plus the all-reduce latency
    2(n−1)·α that the bucket spared the tensor beyond its share min(1, bytes / BUCKET_BYTES).
    In return each device updates 1/n of every tensor: Adam's update of β bytes per element,
    on HBM at 2.039 TB/s · 0.8, is (1 − 1/n) cheaper (the A100 preset has no per-kernel cost,
    and accumulates gradients inside the GEMM, Megatron-LM's fusion, at no cost)."""
    deeper_spec = SPEC.replace("layers=2", "layers=4")
    deeper = priced_zero_stages(capture_spec(deeper_spec, seq=None, precision="fp32"))
    model = from_spec(deeper_spec, batch=1, device="meta").model
    added = {
        name: p.numel()
        for name, p in model.named_parameters()
        if name.startswith(("blocks.2.", "blocks.3."))
    }
    assert len(added) == 24
    n, alpha, beta = 4, 10e-6, 1 / (25e9 * 0.8)
    microbatches = BATCH // (n * MICRO)
    scatter = sum((n - 1) * alpha + (n - 1) / n * 4 * k * beta for k in added.values())
    spared = sum(2 * (n - 1) * alpha * (1 - min(1.0, 4 * k / BUCKET_BYTES)) for k in added.values())
    update = optimizer_update_profile("adam").bytes_per_element
    streamed = update * sum(added.values()) / (2.039e12 * 0.8)
    extra = (deeper[2].step_time_s - deeper[0].step_time_s) - (
        zero_rows[2].step_time_s - zero_rows[0].step_time_s
    )
    expected = (microbatches - 1) * scatter + spared - (1 - 1 / n) * streamed
    assert extra == pytest.approx(expected, rel=1e-6)


def test_zero3_lowers_memory_and_costs_time(zero_rows):
    state = {
        z: r.memory.parameters + r.memory.gradients + r.memory.optimizer
        for z, r in zero_rows.items()
    }
    assert state[3] < state[2] < state[1] < state[0]
    assert zero_rows[3].step_time_s > zero_rows[0].step_time_s
    assert zero_rows[3].mfu < zero_rows[0].mfu


def test_configurations_that_do_not_fit_are_dropped_with_the_reason(graph):
    """A device of 30 MiB: ZeRO-0's 16 bytes × 2.1 M parameters (34 MB) cannot fit; ZeRO-3's
    state (≈ 9 MB) can."""
    cluster = Cluster.from_dict({"spec": ACROSS_HOSTS, "device": {"memory_gib": 30 / 1024}})
    configs = [Configuration(1, 1, 4, 1, zero) for zero in (0, 3)]
    rows, rejected = price_all(
        context_for(graph, cluster), configs, peak_flops=cluster.device.peak_flops_fp32
    )
    assert [r.config.zero for r in rows] == [3]
    (dropped,) = rejected
    assert dropped.category == DOES_NOT_FIT
    assert dropped.what == configs[0].label
    assert "GiB per device" in dropped.reason and "budget 0.0 GiB" in dropped.reason


# ------------------------------------------------------------------------------ simplicity


def row(step, tp=1, pp=1, dp=8, zero=0, recompute="none", schedule="1f1b", v=1, planner=False):
    config = None if planner else Configuration(tp, pp, dp, 1, zero, recompute, schedule, v)
    name = "planner" if planner else config.label
    return Row(name, config, step, 1.0 / step, 0.5, MemoryPerDevice(1, 1, 1, 1))


def test_simplest_within_tolerance_is_recommended():
    fastest = row(1.00, tp=2, pp=2, dp=2, zero=1, recompute="full", schedule="interleaved", v=2)
    three_kinds = row(1.01, tp=2, pp=2, dp=2, zero=1)
    data_only = row(1.029, dp=8, zero=0)
    too_slow = row(1.031, dp=8, zero=0, recompute="none")
    pick, reason = recommend([fastest, three_kinds, data_only, too_slow])
    assert pick is data_only
    assert "2.9% slower" in reason and "1 kind(s) of parallelism (data)" in reason
    # outside the tolerance a simpler row does not win
    pick, _ = recommend([fastest, too_slow])
    assert pick is fastest


def test_no_zero3_when_a_lower_stage_is_within_tolerance():
    zero3 = row(1.00, dp=8, zero=3)
    zero1 = row(1.02, dp=8, zero=1)
    pick, reason = recommend([zero3, zero1])
    assert pick is zero1 and "ZeRO-1 instead of ZeRO-3" in reason
    pick, reason = recommend([zero3, row(1.2, dp=8, zero=1)])
    assert pick is zero3 and "the fastest" in reason


def test_planners_plan_is_recommended_only_when_nothing_classic_is_close():
    planner = row(1.0, planner=True)
    pick, _ = recommend([planner, row(1.01, dp=8)])
    assert pick.config is not None
    pick, reason = recommend([planner, row(1.05, dp=8)])
    assert pick is planner and "planner" in reason


# ------------------------------------------------------------------------------ what-if


def test_what_if_changes_the_cluster_as_written():
    base = Cluster.from_spec("2x8xA100-80GB")
    faster = apply_what_if(base, parse_what_if("inter-host-gbps=400"))
    assert faster.inter_host_link.bandwidth == 400e9 / 8
    assert faster.inter_host_link.latency == base.inter_host_link.latency
    b200 = apply_what_if(base, parse_what_if("device=B200-192GB"))
    assert (b200.num_hosts, b200.devices_per_host, b200.device.name) == (2, 8, "B200-192GB")
    assert b200.device.memory_bytes == 192 * 2**30
    both = apply_what_if(base, parse_what_if("cluster=32x8xH100-80GB,hosts=4"))
    assert (both.num_hosts, both.device.name) == (4, "H100-80GB")
    for bad, message in (
        ("speed=3", "unknown what-if key 'speed'"),
        ("inter-host-gbps=-1", "expected a number > 0"),
        ("device", "is not KEY=VALUE"),
    ):
        with pytest.raises(PlannerOptionError, match=message):
            parse_what_if(bad)


def test_what_if_moves_the_numbers_the_expected_way(graph):
    """Data parallelism across hosts: a 10× faster network shortens the step (gradient
    all-reduce) and leaves the training state as it is (the activations within 0.1 %: with
    cheaper collectives the ILP may place a small op's values differently); B200s shorten it
    more and have more memory."""
    base = Cluster.from_spec("2x2xA100-80GB")
    config = [Configuration(1, 1, 4, MICRO, 0)]
    results = {}
    for name, change in (("base", None), ("net", "inter-host-gbps=2000"), ("b200", "device=B200")):
        cluster = base if change is None else apply_what_if(base, parse_what_if(change))
        (priced,), _ = price_all(
            context_for(graph, cluster), config, peak_flops=cluster.device.peak_flops_fp32
        )
        results[name] = priced
    assert results["net"].step_time_s < results["base"].step_time_s
    net, base = results["net"].memory, results["base"].memory
    assert (net.parameters, net.gradients, net.optimizer) == (
        base.parameters,
        base.gradients,
        base.optimizer,
    )
    assert net.activations == pytest.approx(base.activations, rel=1e-3)
    assert results["b200"].step_time_s < results["base"].step_time_s


def test_advise_ranks_recommends_and_accounts_for_every_configuration(graph):
    cluster = Cluster.from_spec("1x4xA100-80GB")
    context = context_for(graph, cluster, batch=16)
    shape = ModelShape(layers=2, heads=4, kv_heads=4)
    space = SearchSpace(micro_batch_sizes=(1, 4))
    advice = advise(
        context,
        shape,
        AdvisorOptions(top=3, space=space),
        model_name=SPEC,
        precision="fp32",
        peak_flops=cluster.device.peak_flops_fp32,
    )
    steps = [r.step_time_s for r in advice.rows]
    assert steps == sorted(steps) and len(steps) >= 3
    assert advice.planner is not None
    assert advice.recommended in advice.rows and advice.reason
    assert advice.recommended.step_time_s <= 1.03 * steps[0]
    configs, _ = enumerate_configurations(shape, 1, 4, 16, space)
    priced = {r.config for r in advice.rows if r.config is not None}
    left = {r.what for r in advice.rejected if r.category in (DOES_NOT_FIT, "outranked")}
    assert {c.label for c in configs} == {c.label for c in priced} | left
    # nothing outranked could have entered the top 3 or the recommendation's 3 %
    limit = max(steps[2], 1.03 * steps[0])
    outranked = [r for r in advice.rejected if r.category == "outranked"]
    assert outranked and all(r.bound_s >= limit for r in outranked)
