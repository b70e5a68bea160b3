"""Roofline compute and alpha-beta collectives against hand-derived numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hierarchical_ap.cluster import AlphaBeta, Cluster, Collective, Link, MeshAxis
from hierarchical_ap.cost_model import CostModel, ring_steps, ring_traffic

GIB = 2**30
MIB = 2**20
EFF = 0.8  # default link efficiency
NVLINK_A100 = (5e-6, 300e9 * EFF)  # (alpha, effective bandwidth)
IB_A100 = (10e-6, 25e9 * EFF)

model = CostModel()
a100x2 = Cluster.from_spec("2x8xA100-80GB")


def approx(value: float):
    return pytest.approx(value, rel=1e-12)


# ----------------------------------------------------------------------------------- compute


def test_large_bf16_gemm_is_compute_bound():
    n = 8192
    flops, nbytes = 2 * n**3, 3 * n * n * 2
    device = a100x2.device
    assert model.op_time(flops, nbytes, device, torch.bfloat16) == approx(flops / (312e12 * 0.6))
    assert model.op_time(flops, nbytes, device, torch.float32) == approx(flops / (19.5e12 * 0.6))


def test_elementwise_op_is_memory_bound():
    numel = 2**28
    flops, nbytes = numel, 3 * numel * 2  # a + b -> c in bf16
    assert model.op_time(flops, nbytes, a100x2.device, torch.bfloat16) == approx(
        nbytes / (2.039e12 * 0.8)
    )
    assert model.op_time(0, 0, a100x2.device, torch.int64) == 0.0


def test_kernels_add_their_fixed_cost_to_the_roofline():
    device = dataclasses.replace(a100x2.device, kernel_overhead_s=10e-6)
    n = 8192
    flops = 2 * n**3
    assert model.op_time(flops, 0, device, torch.bfloat16, kernels=3) == approx(
        3 * 10e-6 + flops / (312e12 * 0.6)
    )
    assert model.op_time(0, 0, device, torch.float32, kernels=4) == approx(40e-6)
    # the datasheet presets leave it out: kernels cost nothing there
    assert model.op_time(flops, 0, a100x2.device, torch.bfloat16, kernels=3) == approx(
        flops / (312e12 * 0.6)
    )


def test_kernels_within_the_cache_stream_at_the_cache_bandwidth():
    cpu = dataclasses.replace(
        Cluster.local_cpu(2).device,
        hbm_bandwidth=5e9,
        kernel_overhead_s=20e-6,
        cache_bandwidth=15e9,
        cache_bytes=3 * MIB,
    )
    cost = CostModel.for_cluster(Cluster.local_cpu(2))
    # 4 kernels sharing 8 MiB: 2 MiB each fits the 3 MiB cache, so 15 GB/s
    assert cost.op_time(0, 8 * MIB, cpu, torch.float32, kernels=4) == approx(
        4 * 20e-6 + 8 * MIB / 15e9
    )
    # 2 kernels sharing 8 MiB: 4 MiB each does not, so device memory's 5 GB/s
    assert cost.op_time(0, 8 * MIB, cpu, torch.float32, kernels=2) == approx(
        2 * 20e-6 + 8 * MIB / 5e9
    )
    # an op counted without kernels is one working set of all its bytes
    assert cost.op_time(0, 3 * MIB, cpu, torch.float32) == approx(3 * MIB / 15e9)
    assert cost.op_time(0, 3 * MIB + 1, cpu, torch.float32) == approx((3 * MIB + 1) / 5e9)
    # the optimizer's k kernels each touch β·n/k bytes: 84 B × 262,144 / 10 = 2.1 MiB fits,
    # 84 B × 1,048,576 / 10 = 8.4 MiB does not
    update = 10 * 20e-6 + 84 * 262144 / 15e9 + 10 * 20e-6 + 84 * 1048576 / 5e9
    assert cost.optimizer_step_time(10, 84.0, [262144, 1048576], cpu) == approx(update)
    # accumulating a gradient of g bytes touches 3g: 1 MiB of gradient fits, 2 MiB does not
    share = 3 / 4
    accumulation = share * (20e-6 + 3 * MIB / 15e9 + 20e-6 + 6 * MIB / 5e9)
    assert cost.gradient_accumulation_time([MIB, 2 * MIB], cpu, 4) == approx(accumulation)
    # a measured cache rate below device memory's never makes a small kernel slower
    slow_cache = dataclasses.replace(cpu, cache_bandwidth=4e9)
    assert cost.op_time(0, MIB, slow_cache, torch.float32, kernels=1) == approx(20e-6 + MIB / 5e9)


def test_gradient_accumulation_and_optimizer_step_by_hand():
    cpu = dataclasses.replace(
        Cluster.local_cpu(2).device, hbm_bandwidth=5e9, kernel_overhead_s=20e-6
    )
    cost = CostModel.for_cluster(Cluster.local_cpu(2))
    # 4 micro-batches: 3 of 4 add into the accumulated gradient, one kernel each, reading two
    # buffers of g bytes and writing one
    gradients = [4e6, 1e3]
    per_microbatch = 3 / 4 * sum(20e-6 + 3 * g / 5e9 for g in gradients)
    assert cost.gradient_accumulation_time(gradients, cpu, 4) == approx(per_microbatch)
    assert cost.gradient_accumulation_time(gradients, cpu, 1) == 0.0
    # an update of k = 10 kernels moving 84 bytes per element, over tensors of 1e6 and 256
    elements = [1e6, 256]
    update = sum(10 * 20e-6 + 84 * n / 5e9 for n in elements)
    assert cost.optimizer_step_time(10, 84.0, elements, cpu) == approx(update)
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        cost.gradient_accumulation_time(gradients, cpu, 0)
    # Megatron-LM's fused accumulation (the GPU default) adds into the buffer inside the GEMM
    assert model.fused_gradient_accumulation
    assert model.gradient_accumulation_time(gradients, cpu, 4) == 0.0


def test_cost_model_parameters_are_checked():
    with pytest.raises(ValueError, match="matmul_efficiency must be in"):
        CostModel(matmul_efficiency=1.5)
    with pytest.raises(ValueError, match="flops, bytes and kernels must be >= 0"):
        model.op_time(-1, 0, a100x2.device, torch.float32)
    with pytest.raises(ValueError, match="flops, bytes and kernels must be >= 0"):
        model.op_time(0, 0, a100x2.device, torch.float32, kernels=-1)
    assert CostModel.for_cluster(a100x2) == CostModel(0.6, 0.8, 0.8)
    assert CostModel.for_cluster(Cluster.local_cpu(2)) == CostModel(1.0, 1.0, 1.0, False)


# ----------------------------------------------------------------------------------- one host


def test_ring_steps_and_traffic():
    assert [ring_steps(c, 8) for c in Collective] == [14, 7, 7, 7, 1]
    assert [ring_traffic(c, 8) for c in Collective] == [14 / 8, 7 / 8, 7 / 8, 7 / 8, 1.0]
    assert ring_steps(Collective.ALL_REDUCE, 1) == 0 and ring_traffic(Collective.SEND_RECV, 1) == 0


def test_compute_scale_multiplies_every_op_time():
    """s · (K·κ + max(F / peak, M / bw)) with the probed CPU workers' measured scale s."""
    device = dataclasses.replace(a100x2.device, kernel_overhead_s=10e-6, compute_scale=1.25)
    n = 8192
    flops = 2 * n**3
    assert model.op_time(flops, 0, device, torch.bfloat16, kernels=3) == approx(
        1.25 * (3 * 10e-6 + flops / (312e12 * 0.6))
    )
    numel = 2**28
    assert model.op_time(0, 3 * numel * 2, device, torch.bfloat16) == approx(
        1.25 * 3 * numel * 2 / (2.039e12 * 0.8)
    )
    # gradient accumulation and the optimizer step are op times too
    eager = dataclasses.replace(model, fused_gradient_accumulation=False)
    assert eager.gradient_accumulation_time([MIB], device, 2) == approx(
        0.5 * 1.25 * (10e-6 + 3 * MIB / (2.039e12 * 0.8))
    )
    with pytest.raises(ValueError, match="compute_scale must be a finite number > 0"):
        dataclasses.replace(device, compute_scale=0.0)


def test_bucketed_all_reduce_shares_the_bucket_latency_by_bytes():
    """A tensor all-reduced in a 25 MiB bucket over 8 NVLink A100s pays its own bytes'
    bandwidth, 2·7/8 · B / bw, and the bucket's latency 2·7·α in proportion to its bytes."""
    axis = a100x2.logical_mesh((1, 8)).axes[1]
    alpha, bw = NVLINK_A100
    bucket = 25 * MIB
    for nbytes in (MIB, 5 * MIB, 25 * MIB, 100 * MIB):
        share = min(1.0, nbytes / bucket)
        expected = share * 2 * 7 * alpha + 2 * 7 / 8 * nbytes / bw
        assert model.bucketed_all_reduce_time(nbytes, axis, bucket) == approx(expected)
    # a bucket's tensors together pay one all-reduce of the bucket
    parts = (3 * MIB, 7 * MIB, 15 * MIB)
    assert sum(model.bucketed_all_reduce_time(b, axis, bucket) for b in parts) == approx(
        model.all_reduce_time(bucket, axis)
    )
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        model.bucketed_all_reduce_time(MIB, axis, 0)


def test_1gib_all_reduce_over_8_nvlink_a100():
    axis = a100x2.logical_mesh((1, 8)).axes[1]
    alpha, bw = NVLINK_A100
    assert model.all_reduce_time(GIB, axis) == approx(2 * 7 * alpha + 2 * 7 / 8 * GIB / bw)
    assert model.all_reduce_time(GIB, axis) == approx(
        2 * 7 * 5e-6 + 2 * 7 / 8 * 2**30 / (300e9 * 0.8)
    )


@pytest.mark.parametrize("method", ["all_gather_time", "reduce_scatter_time", "all_to_all_time"])
def test_one_pass_collectives_over_4_nvlink_a100(method):
    axis = a100x2.logical_mesh((2, 4)).axes[1]
    alpha, bw = NVLINK_A100
    assert getattr(model, method)(64 * MIB, axis) == approx(3 * alpha + 3 / 4 * 64 * MIB / bw)


def test_send_recv():
    alpha, bw = NVLINK_A100
    assert model.send_recv_time(MIB, a100x2.logical_mesh((1, 8)).axes[1]) == approx(
        alpha + MIB / bw
    )
    assert model.send_recv_time(MIB, a100x2.inter_host_link) == approx(
        IB_A100[0] + MIB / IB_A100[1]
    )
    # neighbours of an axis that spans hosts talk over the inter-host link
    assert model.send_recv_time(MIB, a100x2.logical_mesh((2, 8)).axes[0]) == approx(
        IB_A100[0] + MIB / IB_A100[1]
    )


def test_a_group_of_one_costs_nothing():
    axis = a100x2.logical_mesh((1, 8)).axes[0]
    assert axis.size == 1
    for collective in Collective:
        assert model.collective_time(collective, GIB, axis) == 0.0


# ----------------------------------------------------------------------------------- across hosts


def test_one_device_per_host_is_a_ring_over_the_network():
    axis = a100x2.logical_mesh((2, 8)).axes[0]  # k = 2 hosts, g = 1
    alpha, bw = IB_A100
    assert model.all_reduce_time(GIB, axis) == approx(2 * 1 * alpha + 2 * 1 / 2 * GIB / bw)
    assert model.all_gather_time(GIB, axis) == approx(alpha + 1 / 2 * GIB / bw)


def test_hierarchical_collectives_two_hosts_two_devices_each():
    axis = a100x2.logical_mesh((4, 4)).axes[0]  # k = 2, g = 2, n = 4
    (ai, bi), (ae, be) = NVLINK_A100, IB_A100
    b = float(GIB)
    rs_intra = 1 * ai + 1 / 2 * b / bi
    ag_intra = 1 * ai + 1 / 2 * b / bi
    ar_inter = 2 * 1 * ae + 2 * 1 / 2 * (b / 2) / be
    assert model.all_reduce_time(b, axis) == approx(rs_intra + ar_inter + ag_intra)
    # all-gather / reduce-scatter: one flat ring over the 4 ranks in 3 steps, each as slow as
    # its slowest hop: a chunk of b/4, half of it (one of the 2 rings) through the device's
    # NIC, the other half over NVLink
    flat_ring = 3 * max(ae + b / 4 / 2 / be, ai + 1 / 2 * b / 4 / bi)
    assert flat_ring == approx(3 * ae + 3 / 8 * b / be)  # the network is the bottleneck
    assert model.all_gather_time(b, axis) == approx(flat_ring)
    assert model.reduce_scatter_time(b, axis) == approx(flat_ring)
    # all-to-all: 1 peer on the host, 2 on the other host, b / 4 bytes each
    assert model.all_to_all_time(b, axis) == approx(1 * (ai + b / 4 / bi) + 2 * (ae + b / 4 / be))


def test_zero3_all_gather_over_a_large_cluster_pays_a_network_hop_per_rank():
    """GPT-3's 3h² QKV weight (h = 12288, fp16) gathered over all 1536 GPUs of 192 DGX hosts:
    NCCL's ring takes 1535 steps, each paced by its network hop (α_IB plus the ring's share of
    the chunk on the device's NIC, one of 8 rings), not by the faster NVLink hops."""
    mesh = Cluster.from_spec("192x8xA100-80GB").logical_mesh((1536, 1))
    (ai, bi), (ae, be) = NVLINK_A100, IB_A100
    b = 3 * 12288**2 * 2.0
    chunk = b / 1536
    assert ae + chunk / 8 / be > ai + 7 / 8 * chunk / bi
    expected = 1535 * (ae + chunk / 8 / be)
    assert model.all_gather_time(b, mesh.axes[0]) == approx(expected)
    assert model.reduce_scatter_time(b, mesh.axes) == approx(expected)
    assert 1535 * ae == pytest.approx(15.35e-3)  # latency alone: 15 ms per collective
    # half the ranks: half the latency (it grows with ranks, not hosts)
    small = Cluster.from_spec("96x8xA100-80GB").logical_mesh((768, 1)).axes[0]
    assert model.all_gather_time(0.0, small) == approx(767 * ae)


def test_a_ring_step_waits_for_its_slowest_hop():
    """With a network faster than NVLink (a made-up cluster), the NVLink hop paces the ring."""
    fast_network = dataclasses.replace(
        a100x2,
        inter_host_link=dataclasses.replace(a100x2.inter_host_link, latency=1e-7, bandwidth=1e15),
    )
    axis = fast_network.logical_mesh((4, 4)).axes[0]  # k = 2, g = 2, n = 4
    ai, bi = NVLINK_A100
    b = float(GIB)
    assert model.all_gather_time(b, axis) == approx(3 * (ai + 1 / 2 * b / 4 / bi))


def test_fits_apply_per_link_of_a_flat_ring():
    cluster = dataclasses.replace(a100x2, inter_host_link=probed(a100x2.inter_host_link))
    axis = cluster.logical_mesh((4, 4)).axes[0]  # k = 2, g = 2
    ai, bi = NVLINK_A100
    b = float(GIB)
    expected = 3 * max(5e-4 + b / 4 * 2.6e-9 / 2, ai + 1 / 2 * b / 4 / bi)
    assert model.reduce_scatter_time(b, axis) == approx(expected)


def test_whole_mesh_collective_over_both_axes():
    mesh = a100x2.logical_mesh((2, 8))  # both axes together: k = 2, g = 8
    (ai, bi), (ae, be) = NVLINK_A100, IB_A100
    b = float(GIB)
    expected = (7 * ai + 7 / 8 * b / bi) + (2 * ae + 1.0 * (b / 8) / be) + (7 * ai + 7 / 8 * b / bi)
    assert model.all_reduce_time(b, mesh.axes) == approx(expected)
    assert model.all_reduce_time(b, list(a100x2.logical_mesh((4, 4)).axes)) == approx(expected)


def test_v100_testbed_network_is_the_bottleneck():
    cluster = Cluster.from_spec("2x8xV100-16GB")
    axis = cluster.logical_mesh((2, 8)).axes[0]
    assert model.all_reduce_time(GIB, axis) == approx(2 * 25e-6 + 1.0 * GIB / (3.125e9 / 8 * EFF))


def test_groups_that_split_unevenly_use_a_flat_ring_on_the_network():
    # rows of 6 devices: some cross from one host to the next
    axis = Cluster.from_spec("3x8xA100-80GB").logical_mesh((4, 6)).axes[1]
    alpha, bw = IB_A100
    assert model.all_reduce_time(GIB, axis) == approx(2 * 5 * alpha + 2 * 5 / 6 * GIB / bw)


# ----------------------------------------------------------------------------------- probed links


def probed(link: Link) -> Link:
    """Gloo-like fits: reduce-scatter no cheaper than all-reduce."""
    fits = {
        Collective.ALL_REDUCE: AlphaBeta(3e-4, 8e-10),
        Collective.REDUCE_SCATTER: AlphaBeta(5e-4, 2.6e-9),
        Collective.ALL_TO_ALL: AlphaBeta(2e-4, 1e-9),
    }
    return dataclasses.replace(link, fitted=fits)


def test_fitted_alpha_beta_are_used_as_they_are():
    cpu = Cluster.local_cpu(2)
    cpu = dataclasses.replace(cpu, intra_host_link=probed(cpu.intra_host_link))
    axis = cpu.logical_mesh((1, 2)).axes[1]
    b = 16 * MIB
    all_reduce = 2 * 1 * 3e-4 + 2 * 1 / 2 * b * 8e-10
    reduce_scatter = 1 * 5e-4 + 1 / 2 * b * 2.6e-9
    for m in (CostModel(), CostModel(link_efficiency=0.5)):  # efficiency does not touch fits
        assert m.all_reduce_time(b, axis) == approx(all_reduce)
        assert m.reduce_scatter_time(b, axis) == approx(reduce_scatter)
    assert model.reduce_scatter_time(b, axis) >= model.all_reduce_time(b, axis)
    # collectives without a fit stay analytic
    link = cpu.intra_host_link
    assert model.all_gather_time(b, axis) == approx(
        link.latency + 1 / 2 * b / (link.bandwidth * EFF)
    )


def test_fits_apply_per_phase_of_a_hierarchical_collective():
    cluster = dataclasses.replace(a100x2, inter_host_link=probed(a100x2.inter_host_link))
    axis = cluster.logical_mesh((4, 4)).axes[0]  # k = 2, g = 2
    ai, bi = NVLINK_A100
    b = float(GIB)
    expected = (ai + b / 2 / bi) + (2 * 3e-4 + 1.0 * (b / 2) * 8e-10) + (ai + b / 2 / bi)
    assert model.all_reduce_time(b, axis) == approx(expected)


def test_combining_axes_of_different_clusters_is_an_error():
    axes = [a100x2.logical_mesh((1, 8)).axes[1], Cluster.local_cpu(2).logical_mesh((1, 2)).axes[1]]
    with pytest.raises(ValueError, match="different clusters"):
        MeshAxis.combine(axes)
