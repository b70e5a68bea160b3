"""`hap cluster probe`: the alpha-beta fit, and real probes on local gloo workers under Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import pytest
import torch

from hierarchical_ap.cluster import Cluster, Collective, DeviceSpec
from hierarchical_ap.commands import cluster as cluster_command
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import ClusterSpecError
from hierarchical_ap.models.gpt import GPTBlock
from hierarchical_ap.probe import (
    CACHE_WORKING_SET,
    GEMM_SIZE,
    MIN_ALPHA,
    MIN_BETA,
    REFERENCE_BLOCK,
    REFERENCE_TOKENS,
    DeviceRates,
    compute_scale,
    fit_alpha_beta,
    median_rates,
    modelled_reference_block_s,
    probe,
    rated_device,
)
from tests.measure import AtenCalls

ray = pytest.importorskip("ray")

KIB, MIB = 2**10, 2**20
FAST_SIZES = ["4KiB", "256KiB", "1MiB"]


def hap(argv: list[str]) -> int:
    """Run `hap` with only the cluster command registered (the CLI's other commands are
    someone else's)."""
    parser = argparse.ArgumentParser(prog="hap")
    cluster_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def alive_actors(wait_s: float = 10.0) -> list[str]:
    """Actors not yet dead, after giving `ray.kill` (asynchronous) up to `wait_s` to land."""
    # ray.util.state needs the dashboard, which the probe does not start.
    from ray._private import state

    deadline = time.monotonic() + wait_s
    while True:
        alive = [actor_id for actor_id, info in state.actors().items() if info["State"] != "DEAD"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.fixture
def no_ray_left_behind():
    """The probe starts its own Ray and must leave none (and so no actor) behind."""
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "probe left Ray running"


# ----------------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("collective", list(Collective))
@pytest.mark.parametrize("n", [2, 4])
def test_fit_recovers_an_exact_line(collective, n):
    a, b = 3e-4, 8e-10  # total latency (s), time per byte on the link (s/byte)
    sizes = [4 * KIB, 64 * KIB, MIB, 16 * MIB]
    traffic = {Collective.ALL_REDUCE: 2 * (n - 1) / n, Collective.SEND_RECV: 1.0}.get(
        collective, (n - 1) / n
    )
    steps = {Collective.ALL_REDUCE: 2 * (n - 1), Collective.SEND_RECV: 1}.get(collective, n - 1)
    times = [a + b * traffic * s for s in sizes]
    fit = fit_alpha_beta(collective, n, sizes, times)
    assert fit.alpha == pytest.approx(a / steps, rel=1e-9)
    assert fit.beta == pytest.approx(b, rel=1e-9)


def test_fit_is_clipped_to_positive_values():
    sizes = [4 * KIB, MIB, 16 * MIB]
    falling = fit_alpha_beta(Collective.ALL_REDUCE, 2, sizes, [3e-3, 2e-3, 1e-3])
    assert falling.beta == MIN_BETA and falling.alpha > 0
    through_origin = fit_alpha_beta(
        Collective.SEND_RECV, 2, sizes, [1e-9 * s - 1e-6 for s in sizes]
    )
    assert through_origin.alpha == MIN_ALPHA and through_origin.beta > 0


def test_fit_needs_two_sizes_and_two_workers():
    with pytest.raises(ValueError, match="two or more sizes"):
        fit_alpha_beta(Collective.ALL_REDUCE, 2, [MIB, MIB], [1e-3, 1e-3])
    with pytest.raises(ValueError, match="at least 2 workers"):
        fit_alpha_beta(Collective.ALL_REDUCE, 1, [KIB, MIB], [1e-3, 2e-3])


def test_bad_probe_requests_say_why():
    with pytest.raises(ClusterSpecError, match="at least 2 workers, got 1; e.g. --workers 2"):
        probe(1)
    with pytest.raises(ClusterSpecError, match="at least two distinct sizes"):
        probe(2, sizes=[MIB])
    with pytest.raises(ClusterSpecError, match="unknown device 'TPUv4'"):
        probe(2, device="TPUv4")


@pytest.mark.parametrize(
    ("text", "nbytes"), [("4096", 4096), ("4KiB", 4 * KIB), ("16mib", 16 * MIB), ("1G", 2**30)]
)
def test_parse_size(text, nbytes):
    assert cluster_command.parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["4 KB/s", "-4KiB", "2", "many"])
def test_parse_size_rejects_non_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cluster_command.parse_size(text)


# ----------------------------------------------------------------------------------- real probes


def check_probed_file(path, workers: int) -> Cluster:
    cluster = Cluster.from_file(path)
    assert (cluster.num_hosts, cluster.devices_per_host, cluster.backend) == (1, workers, "gloo")
    link = cluster.intra_host_link
    for collective in Collective:
        fit = link.fit(collective)
        assert fit is not None and fit.alpha > 0 and fit.beta > 0, collective
    assert cluster.device.peak_flops_fp32 > 1e8  # the measured GEMM rates, fp32 and bf16
    assert cluster.device.peak_flops_bf16 > 1e7
    assert cluster.device.peak_flops_bf16 != cluster.device.peak_flops_fp32
    assert cluster.device.peak_flops_fp16 == cluster.device.peak_flops_fp32
    default = DeviceSpec.cpu(workers)
    assert cluster.device.hbm_bandwidth != default.hbm_bandwidth  # measured, not the default
    assert 1e8 < cluster.device.hbm_bandwidth < 1e12
    assert 1e-7 < cluster.device.kernel_overhead_s < 1e-3
    assert cluster.device.cache_bytes == CACHE_WORKING_SET
    assert 1e8 < cluster.device.cache_bandwidth < 1e13
    assert 0 <= cluster.device.dtensor_dispatch_s < 1e-2
    assert 0.2 < cluster.device.compute_scale < 10
    axis = cluster.logical_mesh((1, workers)).axes[1]
    assert CostModel.for_cluster(cluster).all_reduce_time(MIB, axis) > 0
    return cluster


@pytest.mark.timeout(120)
def test_probe_two_workers_writes_a_loadable_yaml(tmp_path, capsys, no_ray_left_behind):
    path = tmp_path / "cluster.yaml"
    argv = ["cluster", "probe", "--workers", "2", "--sizes", *FAST_SIZES, "--reps", "2", "-q"]
    assert hap([*argv, "-o", str(path)]) == 0
    check_probed_file(path, 2)
    out = capsys.readouterr().out
    assert "reduce_scatter" in out and "send_recv" in out
    assert f"wrote {path}" in out


@pytest.mark.timeout(120)
def test_probe_four_workers_json(tmp_path, capsys, no_ray_left_behind):
    path = tmp_path / "cluster.json"
    argv = ["cluster", "probe", "--workers", "4", "--sizes", *FAST_SIZES, "--reps", "2", "--json"]
    assert hap([*argv, "-o", str(path)]) == 0
    check_probed_file(path, 4)
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(path) and summary["workers"] == 4
    assert set(summary["collectives"]) == {c.value for c in Collective}
    # the GEMM rate is each worker's share with all four busy at once: on fewer than four cores
    # near the cores' share of what one thread reaches alone (best of five here), well below
    # one thread's whole rate. The margin covers the VM's speed changing between the probe and
    # the reference: a CI run measured 44.8 GFLOP/s per worker against a reference of 63.3
    # (1.42 × the share), which the same test measures within 1.25 × when rerun.
    single = max(_single_thread_gemm_flops() for _ in range(5))
    share = min(1.0, len(os.sched_getaffinity(0)) / 4)
    assert summary["gemm_flops"] <= 1.6 * share * single
    # busy neighbours cannot make dispatching a kernel cheaper than one thread alone does it
    alone = min(_single_thread_kernel_overhead() for _ in range(5))
    assert summary["kernel_overhead_s"] >= 0.8 * alone
    assert summary["memory_bandwidth"] > 0
    assert summary["cache_bandwidth"] > 0 and summary["cache_bytes"] == CACHE_WORKING_SET
    # DTensor wraps every op it dispatches in sharding propagation: dearer than the plain op
    assert summary["dtensor_dispatch_s"] > 0.2 * summary["kernel_overhead_s"]
    # the reference block, timed with one busy worker per core, cannot beat one thread alone
    # (best of five here) by more than the VM's drift
    cluster = Cluster.from_file(path)
    assert summary["compute_scale"] == cluster.device.compute_scale
    alone = min(_single_thread_block_seconds() for _ in range(5))
    assert summary["reference_block_s"] >= 0.8 * alone


def _single_thread_gemm_flops() -> float:
    """FLOP/s of one GEMM of the probe's size on one thread of this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
        a @ b
        started = time.perf_counter()
        a @ b
        return 2 * GEMM_SIZE**3 / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def test_compute_scale_is_the_median_ratio_of_measured_to_modelled_block_time():
    """s = median_r t_block(r) / t_model(r), each repetition's block against the cost model
    with that repetition's rates: three repetitions whose block took 1.1, 1.5 and 1.3 times
    the model's time give 1.3, whatever their rates."""
    device = DeviceSpec.cpu(2)
    reps = []
    for factor, gemm in ((1.1, 40e9), (1.5, 90e9), (1.3, 60e9)):
        rates = DeviceRates(gemm, 10e9, 8e-6, 40e9, 5e-5, 0.0, 4 * gemm)
        modelled = modelled_reference_block_s(rated_device(device, rates))
        reps.append(dataclasses.replace(rates, reference_block_s=factor * modelled))
    assert compute_scale(device, reps) == pytest.approx(1.3, rel=1e-12)
    # the device then prices the block at the median repetition's measured time
    median = reps[2]
    scaled = dataclasses.replace(rated_device(device, median), compute_scale=1.3)
    assert modelled_reference_block_s(scaled) == pytest.approx(median.reference_block_s)
    assert median_rates(reps) == DeviceRates(
        60e9, 10e9, 8e-6, 40e9, 5e-5, statistics.median(r.reference_block_s for r in reps), 240e9
    )


def _single_thread_block_seconds() -> float:
    """Seconds of one forward and backward of the probe's reference GPT block on one thread
    of this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        block = GPTBlock(REFERENCE_BLOCK)
        hidden = torch.randn(*REFERENCE_TOKENS, REFERENCE_BLOCK.hidden)
        params = list(block.parameters())
        torch.autograd.grad(block(hidden), params, torch.ones_like(hidden))
        started = time.perf_counter()
        torch.autograd.grad(block(hidden), params, torch.ones_like(hidden))
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def _single_thread_kernel_overhead() -> float:
    """Seconds per kernel of the probe's multiply chain, forward and backward, on one thread
    of this process, the kernels counted by a dispatch mode of the test's own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        leaf = torch.ones(16, requires_grad=True)

        def chain() -> None:
            value = leaf
            for _ in range(200):
                value = value * 1.0001
            value.sum().backward()

        with AtenCalls() as counted:
            chain()
        kernels = counted.calls
        started = time.perf_counter()
        chain()
        return (time.perf_counter() - started) / kernels
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_probe_on_a_running_ray_kills_its_actors_and_leaves_ray_up():
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        result = probe(2, sizes=[4 * KIB, MIB], reps=1)
        assert ray.is_initialized()
        assert alive_actors() == []
    finally:
        ray.shutdown()
    assert {s.collective for s in result.samples} == set(Collective)
    assert all(fit.alpha > 0 and fit.beta > 0 for fit in result.fits.values())
