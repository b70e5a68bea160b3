"""The ILP rediscovers the classic parallelisms where they are cheapest."""

from __future__ import annotations

import dataclasses
import operator

import pytest

from hierarchical_ap import NoFeasiblePlanError, capture
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.models import from_spec
from hierarchical_ap.profile import METADATA_CHECKS
from intra_op import solve_sharding
from intra_op.cost_graph import build_cost_graph
from intra_op.gradient_sync import BUCKET_BYTES
from intra_op.ilp import IlpSession
from intra_op.placement import Partial, Replicate, Shard

R = Replicate()


def captured(spec: str, batch: int):
    bundle = from_spec(spec, batch=batch)
    return capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )


def slow_ethernet_cluster(hosts: int) -> Cluster:
    return Cluster.from_dict(
        {
            "spec": f"{hosts}x1xV100-16GB",
            "inter_host_link": {"bandwidth_gbps": 25, "latency_us": 25},
        }
    )


def partial_outputs(solution, nodes) -> list[str]:
    return [n for n in nodes if any(isinstance(p, Partial) for p in solution.node_outputs[n])]


def test_gpt3_block_on_nvlink_is_megatron_tensor_parallel():
    graph = captured("gpt:layers=1,hidden=12288,heads=96,vocab=51200,seq=2048", batch=1)
    cluster = Cluster.from_spec("1x8xA100-80GB")
    block = graph.layer("blocks.0").nodes
    solution = solve_sharding(graph, cluster.logical_mesh((1, 8)), cluster, nodes=block)
    params = solution.param_placements
    assert params["blocks.0.mlp.up_proj.weight"] == (R, Shard(0))  # column parallel (4h rows)
    assert params["blocks.0.mlp.down_proj.weight"] == (R, Shard(1))  # row parallel (4h columns)
    assert params["blocks.0.attn.qkv_proj.weight"] == (R, Shard(0))
    assert params["blocks.0.attn.o_proj.weight"] == (R, Shard(1))
    (attention,) = [n for n in block if "scaled_dot_product" in graph.nodes[n].target]
    assert solution.node_inputs[attention][0] == (R, Shard(1))  # sharded by heads
    # one reduction per sub-layer in forward: exactly the two row-parallel outputs are Partial
    # (reduced by an all-reduce, or by a reduce-scatter into a sequence-sharded residual)
    assert len(partial_outputs(solution, block)) == 2
    assert solution.num_variables > 0 and solution.solve_time_s < 30


def test_small_gpt_large_batch_slow_network_is_data_parallel():
    graph = captured("gpt:layers=2,hidden=1024,heads=16,vocab=8192,seq=1024", batch=64)
    cluster = slow_ethernet_cluster(8)
    solution = solve_sharding(graph, cluster.logical_mesh((8, 1)), cluster)
    not_replicated = {fqn for fqn, p in solution.param_placements.items() if p != (R, R)}
    # The position table has no batch dim: storing it hidden-sharded costs an all-gather in
    # forward and a reduce-scatter in backward, the same ring traffic as the all-reduce of its
    # gradient, and splits its lookup, so the ILP may pick either; every other weight is
    # replicated, as in pure data parallelism.
    assert not_replicated <= {"pos_embed.weight"}
    for name in graph.model_inputs + graph.target_inputs:
        assert solution.input_placements[name] == (Shard(0), R)
    assert not partial_outputs(solution, [n for n in solution.node_outputs if "linear" in n])


def test_tight_memory_budget_gives_zero3_parameter_sharding():
    graph = captured("gpt:layers=2,hidden=1024,heads=16,vocab=8192,seq=1024", batch=64)
    cluster = slow_ethernet_cluster(8)
    mesh = cluster.logical_mesh((8, 1))
    unconstrained = solve_sharding(graph, mesh, cluster)
    state_bytes = 16 * graph.num_params  # fp32 weights + gradients + two Adam moments
    budget = unconstrained.memory_bytes_per_device - 0.6 * state_bytes
    solution = solve_sharding(graph, mesh, cluster, memory_budget_bytes=budget)
    assert solution.memory_bytes_per_device <= budget
    big = [fqn for fqn, shape in graph.param_shapes.items() if shape.numel >= 1024 * 1024]
    sharded = [fqn for fqn in big if isinstance(solution.param_placements[fqn][0], Shard)]
    assert len(sharded) >= len(big) // 2  # ZeRO-3: weights sharded along the data axis
    for name in graph.model_inputs:
        assert solution.input_placements[name] == (Shard(0), R)  # still data parallel
    assert solution.cost_s > unconstrained.cost_s


def test_2x4_mesh_is_data_parallel_across_hosts_and_tensor_parallel_inside():
    """Every weight matrix split over the NVLink axis and replicated over the hosts. (At a
    batch of 16 the MLP split over the hosts instead ties within 0.2 %: its activations'
    all-reduce over InfiniBand then costs what the weights' gradient all-reduce over it
    saves; the activations grow with the batch, the gradients do not.)"""
    graph = captured("gpt:layers=1,hidden=4096,heads=32,vocab=8192,seq=1024", batch=64)
    cluster = Cluster.from_spec("2x4xA100-80GB")
    block = graph.layer("blocks.0").nodes
    solution = solve_sharding(graph, cluster.logical_mesh((2, 4)), cluster, nodes=block)
    params = solution.param_placements
    matrices = [fqn for fqn in params if fqn.endswith("proj.weight")]
    assert len(matrices) == 4
    for fqn in matrices:
        host_axis, device_axis = params[fqn]
        assert host_axis == R and isinstance(device_axis, Shard), (fqn, params[fqn])
    (first,) = [n for n in block if graph.nodes[n].target == "aten.layer_norm.default"][:1]
    assert isinstance(solution.node_inputs[first][0][0], Shard)  # batch on the host axis


def test_no_feasible_plan_reports_smallest_memory():
    graph = captured("gpt-tiny", batch=4)
    cluster = Cluster.from_spec("1x2xA100-80GB")
    with pytest.raises(NoFeasiblePlanError, match="smallest any strategy needs"):
        solve_sharding(graph, cluster.logical_mesh((1, 2)), cluster, memory_budget_bytes=1024)


def test_breakdown_of_data_parallel_mlp_is_hand_derived():
    """Two 1024x1024 fp32 linear layers on two NVLink devices, data parallel at a large batch:
    the gradient all-reduce is paid once per step, a quarter of it per micro-batch with four
    micro-batches; the state is 16 bytes per parameter; the forward share is below the rest."""
    import torch

    from hierarchical_ap.cost_model import CostModel
    from tests.reference_models import MLP, class_loss

    cluster = Cluster.from_spec("1x2xA100-80GB")
    model = MLP(width=1024, depth=1, classes=1024)
    graph = capture(
        model,
        (torch.randn(65536, 1024),),
        loss_fn=class_loss,
        targets=torch.zeros(65536, dtype=torch.long),
    )
    mesh = cluster.logical_mesh((2, 1))
    one = solve_sharding(graph, mesh, cluster)
    four = solve_sharding(graph, mesh, cluster, num_microbatches=4)
    assert four.param_placements == one.param_placements
    assert all(p == (R, R) for p in one.param_placements.values())  # data parallel

    # each gradient is all-reduced in a DDP bucket: its bytes' bandwidth and its share of the
    # bucket's latency, T(0)·min(1, bytes / BUCKET_BYTES) with T(B) the ring all-reduce of B
    cost = CostModel.for_cluster(cluster)
    param_bytes = graph.param_bytes
    latency = cost.all_reduce_time(0, mesh.axes[0])
    sync = sum(
        cost.all_reduce_time(meta.nbytes, mesh.axes[0])
        - latency * (1 - min(1.0, meta.nbytes / BUCKET_BYTES))
        for meta in graph.param_shapes.values()
    )
    assert latency > 0 and sync < sum(
        cost.all_reduce_time(meta.nbytes, mesh.axes[0]) for meta in graph.param_shapes.values()
    )
    assert one.gradient_sync_s == pytest.approx(sync, rel=1e-6)
    assert one.cost_s - four.cost_s == pytest.approx(0.75 * sync, rel=1e-6)
    assert one.state_bytes_per_device == pytest.approx(4 * param_bytes)
    assert one.activation_bytes_per_device == pytest.approx(
        one.memory_bytes_per_device - 4 * param_bytes
    )
    assert 0 < one.forward_time_s < one.cost_s - sync


def test_frozen_parameters_cost_their_bytes_alone_and_no_gradient_sync():
    """The data-parallel MLP above with its first layer frozen (``requires_grad=False``, as in
    fine-tuning): the frozen layer keeps 4 bytes per parameter (no gradient, no Adam moments)
    and pays no gradient all-reduce; the trainable layer costs what it did."""
    import torch

    from tests.reference_models import MLP, class_loss

    cluster = Cluster.from_spec("1x2xA100-80GB")
    model = MLP(width=1024, depth=1, classes=1024)
    model.net[0].requires_grad_(False)
    graph = capture(
        model,
        (torch.randn(65536, 1024),),
        loss_fn=class_loss,
        targets=torch.zeros(65536, dtype=torch.long),
    )
    assert graph.frozen_params == {"net.0.weight", "net.0.bias"}
    mesh = cluster.logical_mesh((2, 1))
    solution = solve_sharding(graph, mesh, cluster)
    assert all(p == (R, R) for p in solution.param_placements.values())
    cost = CostModel.for_cluster(cluster)
    latency = cost.all_reduce_time(0, mesh.axes[0])
    trainable = [m for fqn, m in graph.param_shapes.items() if fqn not in graph.frozen_params]
    frozen = [m for fqn, m in graph.param_shapes.items() if fqn in graph.frozen_params]
    sync = sum(
        cost.all_reduce_time(meta.nbytes, mesh.axes[0])
        - latency * (1 - min(1.0, meta.nbytes / BUCKET_BYTES))
        for meta in trainable
    )
    assert solution.gradient_sync_s == pytest.approx(sync, rel=1e-6)
    assert solution.state_bytes_per_device == pytest.approx(
        4 * sum(m.nbytes for m in trainable) + sum(m.nbytes for m in frozen)
    )


def test_lean_solution_needs_the_least_memory():
    graph = captured("gpt:layers=1,hidden=1024,heads=16,vocab=8192,seq=512", batch=8)
    cluster = Cluster.from_spec("1x8xA100-80GB")
    mesh = cluster.logical_mesh((1, 8))
    fastest = solve_sharding(graph, mesh, cluster)
    lean = solve_sharding(graph, mesh, cluster, lean=True)
    assert lean.memory_bytes_per_device < fastest.memory_bytes_per_device
    assert lean.cost_s >= fastest.cost_s
    assert lean.state_bytes_per_device < fastest.state_bytes_per_device / 2  # ZeRO-style


def _dispatching_cpus(seconds_per_op: float) -> Cluster:
    cluster = Cluster.local_cpu(2)
    device = dataclasses.replace(cluster.device, dtensor_dispatch_s=seconds_per_op)
    return dataclasses.replace(cluster, device=device)


def test_dtensor_dispatch_is_charged_unless_every_parameter_is_replicated():
    """The objective with DTensor's dispatch charge, ``f(x) + D·[x shards a parameter]``, by
    its two cases: ``D = d·(N_fwd + N_bwd)`` counted here from the graph's nodes; the
    replicated optimum from the ILP restricted to replicated parameters."""
    graph = captured("gpt:layers=1,hidden=512,heads=8,vocab=1024,seq=8", batch=2)
    free = solve_sharding(
        graph, _dispatching_cpus(0.0).logical_mesh((2, 1)), _dispatching_cpus(0.0)
    )
    sharded = {fqn for fqn, p in free.param_placements.items() if p != (R, R)}
    assert sharded and free.dispatch_s == 0.0  # the MLP weights split over the batch axis
    executed = [
        node
        for name, node in graph.nodes.items()
        if graph.fx_node(name).target not in METADATA_CHECKS
        and graph.fx_node(name).target is not operator.getitem
    ]
    ops = len(executed) + sum(node.profile.backward_kernels for node in executed)
    assert ops > 2 * len(executed)
    cost_graph = build_cost_graph(
        graph,
        _dispatching_cpus(0.0).logical_mesh((2, 1)),
        CostModel.for_cluster(Cluster.local_cpu(2)),
    )
    replicated = IlpSession(cost_graph.problem).solve_within(None, cost_graph.replicated_params)
    assert replicated.objective > free.cost_s
    breakeven = (replicated.objective - free.cost_s) / ops
    for d in (breakeven / 10, breakeven * 10):
        cluster = _dispatching_cpus(d)
        solution = solve_sharding(graph, cluster.logical_mesh((2, 1)), cluster)
        if d < breakeven:
            assert solution.param_placements == free.param_placements
            assert solution.dispatch_s == pytest.approx(d * ops, rel=1e-9)
            assert solution.cost_s == pytest.approx(free.cost_s + d * ops, rel=1e-9)
        else:
            assert all(p == (R, R) for p in solution.param_placements.values())
            assert solution.dispatch_s == 0.0
            assert solution.cost_s == pytest.approx(replicated.objective, rel=1e-9)
    one_device = _dispatching_cpus(1.0)
    alone = solve_sharding(graph, one_device.logical_mesh((1, 1)), one_device)
    assert alone.dispatch_s == 0.0  # a one-device stage runs plain tensors
