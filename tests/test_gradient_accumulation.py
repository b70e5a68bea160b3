"""Gradient synchronisation under gradient accumulation, per mesh axis, against hand-derived
collective times: a replicated axis all-reduces once per step, a sharding (ZeRO) axis
reduce-scatters every micro-batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from hierarchical_ap import capture
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.models import from_spec
from hierarchical_ap.profile import TensorMeta
from intra_op import solve_sharding
from intra_op.cost_graph import TrainingMemory, build_cost_graph
from intra_op.gradient_sync import BUCKET_BYTES
from intra_op.ilp import solve
from intra_op.placement import Partial, Replicate, Shard
from intra_op.resharding import accumulated_gradient_times, reshard_time
from tests.reference_models import class_loss

R, P = Replicate(), Partial()
CLUSTER = Cluster.from_spec("2x4xA100-80GB")
MESH = CLUSTER.logical_mesh((2, 4))  # axis 0 across the two hosts, axis 1 on NVLink
COST = CostModel.for_cluster(CLUSTER)
WEIGHT = TensorMeta((4096, 1024), (1024, 1), torch.float16)


def bucketed(nbytes: float, axis) -> float:
    """A gradient's share of a DDP bucket's all-reduce: its bytes' time T(B) less the latency
    T(0) beyond its share min(1, B / BUCKET_BYTES) of the bucket's."""
    latency = COST.all_reduce_time(0, axis)
    return COST.all_reduce_time(nbytes, axis) - latency * (1 - min(1.0, nbytes / BUCKET_BYTES))


def captured(spec: str, batch: int, dtype: torch.dtype = torch.float32):
    bundle = from_spec(spec, batch=batch, device="meta", dtype=dtype)
    return capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )


def test_megatron_weight_all_reduces_its_shard_over_the_data_axis_once_per_step():
    # stored (R, S(0)): the gradient comes out Partial over the batch axis, sharded like the
    # weight over the tensor axis; only the data-parallel all-reduce of the 1/4 shard remains,
    # in a bucket
    every, step = accumulated_gradient_times(WEIGHT, (P, Shard(0)), (R, Shard(0)), MESH, COST)
    assert every == 0.0
    assert step == pytest.approx(bucketed(WEIGHT.nbytes / 4, MESH.axes[0]))
    assert step < COST.all_reduce_time(WEIGHT.nbytes / 4, MESH.axes[0])


def test_zero3_weight_reduce_scatters_every_microbatch():
    every, step = accumulated_gradient_times(WEIGHT, (P, R), (Shard(0), R), MESH, COST)
    assert every == pytest.approx(COST.reduce_scatter_time(WEIGHT.nbytes, MESH.axes[0]))
    assert step == 0.0


def test_mixed_weight_splits_into_reduce_scatter_then_all_reduce_of_the_shard():
    # sharded over the hosts (ZeRO), replicated over NVLink: reduce-scatter the full Partial
    # gradient over axis 0 each micro-batch, all-reduce the host's half over axis 1 per step
    every, step = accumulated_gradient_times(WEIGHT, (P, P), (Shard(0), R), MESH, COST)
    assert every == pytest.approx(COST.reduce_scatter_time(WEIGHT.nbytes, MESH.axes[0]))
    assert step == pytest.approx(bucketed(WEIGHT.nbytes / 2, MESH.axes[1]))


def test_replicated_weight_synchronises_everything_once_per_step():
    grad, stored = (P, P), (R, R)
    every, step = accumulated_gradient_times(WEIGHT, grad, stored, MESH, COST)
    assert every == 0.0
    # one bucketed all-reduce per axis, each of the whole gradient
    assert step == pytest.approx(
        bucketed(WEIGHT.nbytes, MESH.axes[0]) + bucketed(WEIGHT.nbytes, MESH.axes[1])
    )
    assert step < reshard_time(WEIGHT, grad, stored, MESH, COST)


class _FeedForward(nn.Module):
    """Megatron's MLP without biases: column-parallel up, row-parallel down."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(1024, 4096, bias=False)
        self.down = nn.Linear(4096, 1024, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


MEGATRON_LINEARS = {"linear": "S0S1 = S0R x RS0", "linear_1": "S0P = S0S1 x RS1"}
"""Batch over the hosts; column-parallel up, row-parallel down with a Partial output."""


def _forced(cost_graph, graph, wanted, strategies=MEGATRON_LINEARS):
    """The problem with every parameter held to its ``wanted`` placement, the inputs split by
    batch over the hosts and the named nodes to their strategies (other choices cost 1e3 s)."""
    costs = list(cost_graph.problem.costs)
    for name, chooser in cost_graph.choosers.items():
        if chooser.kind != "node":
            target = wanted.get(graph.value_to_param.get(name), (Shard(0), R))
            penalty = np.array([0.0 if p == target else 1e3 for p in chooser.outputs])
        elif name in strategies:
            names = [s.name for s in chooser.strategies]
            assert strategies[name] in names, names
            penalty = np.array([0.0 if n == strategies[name] else 1e3 for n in names])
        else:
            continue
        costs[chooser.group] = costs[chooser.group] + penalty
    return replace(cost_graph.problem, costs=costs)


def test_megatron_mlp_charges_the_data_parallel_all_reduce_once_per_step():
    """Data parallel across the hosts, Megatron TP inside, on a (2, 4) mesh: the gradient
    sync is the data-axis all-reduce of each weight's 1/4 shard (in a bucket), and with B = 8 micro-batches
    only 1/8 of it is charged per micro-batch (the rest of the assignment held equal)."""
    graph = capture(
        _FeedForward(),
        (torch.randn(512, 1024),),
        loss_fn=class_loss,
        targets=torch.zeros(512, dtype=torch.long),
    )
    wanted = {"up.weight": (R, Shard(0)), "down.weight": (R, Shard(1))}
    one = build_cost_graph(graph, MESH, COST, num_microbatches=1)
    eight = build_cost_graph(graph, MESH, COST, num_microbatches=8)
    choice = solve(_forced(one, graph, wanted)).choice
    sync = sum(bucketed(graph.param_shapes[fqn].nbytes / 4, MESH.axes[0]) for fqn in wanted)
    at_one, at_eight = one.breakdown(choice), eight.breakdown(choice)
    assert at_one.gradient_sync_s == pytest.approx(sync, rel=1e-9)
    assert at_eight.gradient_sync_s == pytest.approx(sync, rel=1e-9)
    assert at_one.time_s - at_eight.time_s == pytest.approx(sync * 7 / 8, rel=1e-9)
    # ZeRO over the hosts instead: the reduce-scatter is paid in full every micro-batch
    zero = {"up.weight": (Shard(0), Shard(0)), "down.weight": (Shard(1), Shard(1))}
    zero_choice = solve(_forced(eight, graph, zero, {})).choice
    assert eight.breakdown(zero_choice).gradient_sync_s == 0.0
    assert one.breakdown(zero_choice).time_s == pytest.approx(
        eight.breakdown(zero_choice).time_s, rel=1e-9
    )


def test_gpt3_block_on_16_hosts_under_memory_is_megatron_not_zero():
    """The regression of stop 8: a GPT-3 175B block at 16 sequences on 16 hosts x 8 GPUs with
    96 micro-batches, budgeted to what Megatron TP needs. With the data-parallel all-reduce
    of the TP shards charged once per step, TP (about 15 ms) wins over ZeRO-style sharding
    over the hosts (33-45 ms per micro-batch)."""
    graph = captured(
        "gpt:layers=1,hidden=12288,heads=96,vocab=51200,seq=2048", batch=16, dtype=torch.float16
    )
    cluster = Cluster.from_spec("16x8xA100-80GB")
    block = graph.layer("blocks.0").nodes
    solution = solve_sharding(
        graph,
        cluster.logical_mesh((16, 8)),
        cluster,
        nodes=block,
        num_microbatches=96,
        memory_budget_bytes=4.5e9,
        training_memory=TrainingMemory.for_training(torch.float16, fp32_gradients=True),
    )
    params = solution.param_placements
    assert params["blocks.0.attn.qkv_proj.weight"] == (R, Shard(0))
    assert params["blocks.0.attn.o_proj.weight"] == (R, Shard(1))
    assert params["blocks.0.mlp.up_proj.weight"] == (R, Shard(0))
    assert params["blocks.0.mlp.down_proj.weight"] == (R, Shard(1))
    assert solution.cost_s < 0.020
