"""Measure a cluster's collectives on real workers and fit alpha-beta per collective.

`probe` starts one Ray actor per worker on this host; the actors form a torch.distributed process
group (gloo on CPU, NCCL on GPU) through a TCP store on 127.0.0.1 and time all-reduce,
all-gather, reduce-scatter, all-to-all and send/recv over a range of sizes. Each timing is the
median over `reps` repetitions of the slowest rank, every repetition starting after a barrier.

For each collective c on n workers the fit is

    time = a + b · x,   x = ring_traffic(c, n) · bytes   (bytes each worker puts on the link),

by least squares on relative error (Σ ((a + b·x − t) / t)², so that 4 KiB and 16 MiB weigh
alike), clipped to positive values. The link then carries α = a / ring_steps(c, n) (seconds per
step) and β = b (seconds per byte), which `CostModel` reads back as
`ring_steps·α + ring_traffic·bytes·β`, i.e. exactly the fitted line at n workers.

For CPU workers the device's rates are measured on all workers at once (as in training,
where they share the host's cores): each window starts after a barrier, runs a fixed amount
of work on every worker, and its time is the slowest worker's, so the whole window is under
full contention (a worker that finished early would otherwise let the others run faster than
they do in training). A repetition runs one window of each kind below in turn, so that a slow
spell of a shared machine falls on all of them alike; the median over repetitions gives

* the peak FLOP/s: `GEMMS_PER_REP` 1024³ fp32 GEMMs, and as many bf16 ones for the bf16 rate
  (CPUs with AMX tiles run them several times faster than fp32, others slower; fp16 keeps
  the fp32 rate, as bf16 is the only half precision the runtime trains in);
* the memory bandwidth: `STREAM_PER_REP` out-of-place adds of two 16 MiB fp32 vectors (read
  two, write one: 48 MiB each);
* the cache bandwidth: `CACHE_STREAM_PER_REP` of the same adds on 1 MiB vectors, a 3 MiB
  working set (`CACHE_WORKING_SET`, which becomes the device's `cache_bytes`): what kernels the
  size of a parameter's optimizer update reach, run one after another on the same buffers;
* the kernel overhead: `CHAIN_PER_REP` times the forward and backward of a chain of
  `CHAIN_LENGTH` scalar multiplies on a 16-element tensor that needs a gradient (too small for
  the maths to count), divided by the aten kernels it dispatches
  (`hierarchical_ap.profile.KernelCounter`, the same count the profiler gives each node);
* DTensor's dispatch: the same chain on a DTensor replicated over every worker (no
  collective runs), its extra time over the plain chain per kernel (`dtensor_dispatch_s`);
* the compute scale: `BLOCKS_PER_REP` forwards and backwards of `REFERENCE_BLOCK`, a zoo GPT
  block on `REFERENCE_TOKENS`, gradients by `torch.autograd.grad` (none accumulated). Each
  rate above is one kernel run over and over on its own; a real block mixes GEMMs of a
  hundred rows, normalisations, attention and activations whose caches and memory the busy
  neighbours share, and on the 2-core development VM it ran 1.2–1.5× slower beside them than
  the rates predict (alone, within 10 %). The device's `compute_scale` is

      s = t_block (measured) / Σ_nodes (t_fwd + t_bwd) (the cost model, with the rates above),

  its median over repetitions of the ratio within each, which `CostModel.op_time` then
  applies to every op: the cost model prices the reference block at its measured time.

With more workers than cores every rate is measured twice: with all workers busy (the
device's rates: workers taking turns on a core get their share of it) and with one busy worker
per core, the rest idle at the barriers (`min(workers, cores)`), which is what the scale is
measured under, block and rates alike. The scale so stands for the mix's loss to neighbours
on other cores, not for the turns taken on one (with four workers on two cores a block took
1.66× the all-busy rates' prediction, every switch between two processes on a core cooling
its caches). Even so the all-busy rates can err high for a pipeline, whose workers wait for
their peers and so take fewer turns than all of them busy at once: on the 2-core development
VM the 4-stage benchmark's step was predicted 420, 286 and 376 ms against 333, 305 and 317
measured (with the all-busy scale, 418 against 310; with none, 254 against 306). On two workers, one per core, the 2-stage
step measured 7 % and 16 % above its prediction in two runs (37–59 % without the scale),
and 54 % in a third, whose probe read this shared machine faster than its training ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor

from hierarchical_ap.cluster import CPU_DEVICE_NAME, AlphaBeta, Cluster, Collective, DeviceSpec
from hierarchical_ap.cluster_ray import WORKER_RUNTIME_ENV
from hierarchical_ap.cost_model import CostModel, ring_steps, ring_traffic
from hierarchical_ap.errors import ClusterSpecError
from hierarchical_ap.graph import OpGraph, capture
from hierarchical_ap.models.config import ModelConfig
from hierarchical_ap.models.gpt import GPTBlock
from hierarchical_ap.profile import KernelCounter

logger = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
#: 4 KiB … 16 MiB in steps of 4×.
DEFAULT_SIZES = tuple(4 * KIB * 4**i for i in range(7))
DEFAULT_REPS = 5
#: Limit on joining the process group, on each collective, and on each Ray call.
DEFAULT_TIMEOUT_S = 120.0
#: Square fp32 GEMM timed to estimate a CPU worker's achieved FLOP/s.
GEMM_SIZE = 1024
#: GEMMs each worker runs in one timed window (about 0.1–0.2 s on one shared CPU core).
GEMMS_PER_REP = 4
#: The dtype of every probe buffer, and its bytes per element.
_ELEMENT = torch.float32
_ELEMENT_BYTES = 4
#: fp32 elements of each vector of the bandwidth probe (16 MiB), and adds per window.
STREAM_NUMEL = 4 * MIB
STREAM_PER_REP = 8
#: fp32 elements of each vector of the cache-bandwidth probe (1 MiB), adds per window, and the
#: bytes each add reads and writes (two inputs and the output).
CACHE_STREAM_NUMEL = 256 * KIB
CACHE_STREAM_PER_REP = 128
CACHE_WORKING_SET = 3 * CACHE_STREAM_NUMEL * _ELEMENT_BYTES
#: Scalar multiplies in the kernel-overhead chain, and chains (forward + backward) per window.
CHAIN_LENGTH = 200
CHAIN_PER_REP = 10
#: The compute scale's reference workload: one block of the zoo GPT at the demo's width, on
#: (batch, sequence) = 2 × 64 tokens, fp32; and forwards + backwards per window.
REFERENCE_BLOCK = ModelConfig(
    family="gpt",
    layers=1,
    hidden=256,
    heads=4,
    kv_heads=4,
    ffn_hidden=1024,
    vocab=1024,
    seq=64,
    tied_head=False,
)
REFERENCE_TOKENS = (2, 64)
BLOCKS_PER_REP = 4
#: Floors of the fitted alpha (s) and beta (s/byte) so both stay positive.
MIN_ALPHA = 1e-9
MIN_BETA = 1e-15


@dataclass(frozen=True)
class Sample:
    """One measurement: the median time (s) of `collective` on `nbytes` (its B, see cost_model)."""

    collective: Collective
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class DeviceRates:
    """What one CPU worker achieves with every worker busy (module docstring)."""

    gemm_flops: float
    """FLOP/s of fp32 GEMMs."""
    memory_bandwidth: float
    """Bytes/s an elementwise kernel streams from memory (a 48 MiB working set)."""
    kernel_overhead_s: float
    """Seconds of host-side cost per dispatched kernel."""
    cache_bandwidth: float
    """Bytes/s an elementwise kernel streams when its working set is `CACHE_WORKING_SET`."""
    dtensor_dispatch_s: float
    """Seconds DTensor adds to each kernel it dispatches (comm-free, replicated)."""
    reference_block_s: float
    """Seconds of one forward and backward of `REFERENCE_BLOCK`."""
    gemm_flops_bf16: float
    """FLOP/s of bf16 GEMMs."""


@dataclass(frozen=True)
class ProbeResult:
    """The probed cluster (fits on its intra-host link), the raw samples, and the CPU
    workers' measured rates (``None`` for GPUs, whose datasheet rates are kept)."""

    cluster: Cluster
    samples: tuple[Sample, ...]
    rates: DeviceRates | None
    per_core_rates: DeviceRates | None = None
    """The same rates with one busy worker per core, which the compute scale comes from (the
    same as `rates` when the host has a core for every worker)."""

    @property
    def fits(self) -> dict[Collective, AlphaBeta]:
        return dict(self.cluster.intra_host_link.fitted)


def fit_alpha_beta(
    collective: Collective, n: int, nbytes: Sequence[float], seconds: Sequence[float]
) -> AlphaBeta:
    """Fit `seconds ≈ a + b · ring_traffic(collective, n) · nbytes` (relative least squares,
    clipped to a ≥ MIN_ALPHA, b ≥ MIN_BETA) and return α = a / ring_steps, β = b."""
    if n < 2:
        raise ValueError(f"a collective needs at least 2 workers, got {n}")
    x = ring_traffic(collective, n) * np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if len(t) < 2 or len(np.unique(x)) < 2:
        raise ValueError("fitting alpha and beta needs timings at two or more sizes")
    w = 1.0 / t
    (a, b), *_ = np.linalg.lstsq(np.column_stack([w, w * x]), w * t, rcond=None)
    if b < MIN_BETA:
        b = MIN_BETA
        a = float(np.sum(w * w * (t - b * x)) / np.sum(w * w))
    if a < MIN_ALPHA:
        a = MIN_ALPHA
        b = max(float(np.sum(w * w * x * (t - a)) / np.sum(w * w * x * x)), MIN_BETA)
    return AlphaBeta(alpha=float(a) / ring_steps(collective, n), beta=float(b))


def probe(
    num_workers: int,
    *,
    device: str = CPU_DEVICE_NAME,
    sizes: Sequence[int] = DEFAULT_SIZES,
    reps: int = DEFAULT_REPS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_progress: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Probe `num_workers` workers of this host ("CPU" workers on gloo, or GPUs of the preset
    `device` on NCCL, one per worker) and return a 1-host cluster whose intra-host link carries
    the fitted alpha/beta per collective and whose bandwidth and latency are the send/recv fit.
    For CPU workers the device's peak FLOP/s, memory bandwidth, kernel overhead and DTensor's
    dispatch become the measured rates (`DeviceRates`), with a cache tier of
    `CACHE_WORKING_SET` bytes, and its `compute_scale` the reference block's measured over its
    modelled time (module docstring).

    Uses the running Ray instance, or starts a local one and shuts it down afterwards; every
    actor is killed on the way out, and no step (joining, a collective, a Ray call) waits longer
    than `timeout_s`.
    """
    if num_workers < 2:
        raise ClusterSpecError(
            f"probing collectives needs at least 2 workers, got {num_workers}; e.g. --workers 2"
        )
    if reps < 1 or not sizes or min(sizes) < _ELEMENT_BYTES or len(set(sizes)) < 2:
        raise ClusterSpecError(
            f"probe needs reps >= 1 and at least two distinct sizes >= 4 bytes, got reps={reps}, "
            f"sizes={list(sizes)}; e.g. sizes 4KiB 1MiB 16MiB"
        )
    base = Cluster.from_spec(f"1x{num_workers}x{device}")
    report = on_progress or (lambda message: None)

    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            num_cpus=max(num_workers, os.cpu_count() or 1),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    workers: list = []
    try:
        report(f"starting {num_workers} {base.backend} workers")
        workers = _start_workers(base, timeout_s)
        samples = []
        for collective in Collective:
            for size in sizes:
                report(f"{collective.value} {_human(size)}")
                samples.append(_measure(workers, collective, size, reps, timeout_s))
        rates = per_core = scale = None
        if base.device.is_cpu:
            report("GEMM, memory and cache bandwidth, kernel overhead, a reference block")
            all_busy = _device_rates(workers, reps, len(workers), timeout_s)
            per_core_reps = all_busy
            busy = min(len(workers), _host_cores())
            if busy < len(workers):
                report(f"the same with {busy} workers busy, one per core")
                per_core_reps = _device_rates(workers, reps, busy, timeout_s)
            rates, per_core = median_rates(all_busy), median_rates(per_core_reps)
            scale = compute_scale(base.device, per_core_reps)
    except ray.exceptions.GetTimeoutError as exc:
        raise ClusterSpecError(
            f"probing {num_workers} workers did not finish within {timeout_s:g} s; check that Ray "
            f"can place {num_workers} workers (`ray status`) or raise the timeout"
        ) from exc
    finally:
        for worker in workers:
            ray.kill(worker, no_restart=True)
        if started_ray:
            ray.shutdown()
    cluster = _probed_cluster(base, samples, rates, scale)
    return ProbeResult(cluster, tuple(samples), rates, per_core)


def _device_rates(workers: list, reps: int, busy: int, timeout_s: float) -> list[DeviceRates]:
    """`DeviceRates` of each repetition with the first `busy` workers running each window (the
    rest idle at its barriers); every worker reports the slowest busy worker's windows."""
    import ray

    calls = [w.device_rates.remote(reps, rank < busy) for rank, w in enumerate(workers)]
    first, *_ = ray.get(calls, timeout=timeout_s)
    return [DeviceRates(*fields) for fields in first]


def median_rates(reps: Sequence[DeviceRates]) -> DeviceRates:
    """Each field's median over the repetitions."""
    columns = zip(*(dataclasses.astuple(r) for r in reps), strict=True)
    return DeviceRates(*(statistics.median(column) for column in columns))


def _host_cores() -> int:
    """CPU cores this process (and so the host's workers) may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def rated_device(device: DeviceSpec, rates: DeviceRates) -> DeviceSpec:
    """`device` with the probed rates (module docstring), its `compute_scale` left as is."""
    return dataclasses.replace(
        device,
        peak_flops_fp32=rates.gemm_flops,
        peak_flops_bf16=rates.gemm_flops_bf16,
        peak_flops_fp16=rates.gemm_flops,
        hbm_bandwidth=rates.memory_bandwidth,
        kernel_overhead_s=rates.kernel_overhead_s,
        cache_bandwidth=rates.cache_bandwidth,
        cache_bytes=CACHE_WORKING_SET,
        dtensor_dispatch_s=rates.dtensor_dispatch_s,
    )


def compute_scale(device: DeviceSpec, per_core: Sequence[DeviceRates]) -> float:
    """s = the median over repetitions r of t_block(r) / t_model(r): the reference block's
    measured time over the cost model's with the rates of the same repetition, both with one
    busy worker per core (`per_core`; module docstring)."""
    return statistics.median(
        r.reference_block_s / modelled_reference_block_s(rated_device(device, r)) for r in per_core
    )


def _probed_cluster(
    base: Cluster,
    samples: Sequence[Sample],
    rates: DeviceRates | None,
    scale: float | None,
) -> Cluster:
    n = base.devices_per_host
    fits = {}
    for collective in Collective:
        mine = [s for s in samples if s.collective is collective]
        fits[collective] = fit_alpha_beta(
            collective, n, [s.nbytes for s in mine], [s.seconds for s in mine]
        )
        logger.info(
            "%s: alpha %.3g s, beta %.3g s/B",
            collective.value,
            fits[collective].alpha,
            fits[collective].beta,
        )
    p2p = fits[Collective.SEND_RECV]
    link = dataclasses.replace(
        base.intra_host_link, bandwidth=1.0 / p2p.beta, latency=p2p.alpha, fitted=fits
    )
    device = base.device
    if rates is not None and scale is not None:
        device = dataclasses.replace(rated_device(base.device, rates), compute_scale=scale)
    return dataclasses.replace(base, device=device, intra_host_link=link)


def reference_block() -> nn.Module:
    """The compute scale's reference workload, `REFERENCE_BLOCK` (module docstring)."""
    return GPTBlock(REFERENCE_BLOCK)


@cache
def _reference_graph() -> OpGraph:
    """The reference block captured on the meta device (once per process)."""
    with torch.device("meta"):
        block = reference_block()
    hidden = torch.empty(*REFERENCE_TOKENS, REFERENCE_BLOCK.hidden, device="meta")
    return capture(block, (hidden,))


def modelled_reference_block_s(device: DeviceSpec) -> float:
    """What the cost model prices one forward and backward of the reference block at on
    `device`: Σ over its captured nodes of `op_time` forward + backward, as the planner prices
    a one-device stage (`device.compute_scale` included)."""
    cost = CostModel.for_device(device)
    total = 0.0
    for node in _reference_graph().nodes.values():
        total += cost.node_forward_time(node.profile, device, node.compute_dtype)
        total += cost.node_backward_time(node.profile, device, node.compute_dtype)
    return total


def _start_workers(cluster: Cluster, timeout_s: float) -> list:
    """One actor per worker, all joined into one process group; killed again if joining fails."""
    import ray

    n = cluster.devices_per_host
    gpu = cluster.backend == "nccl"
    cpus = ray.cluster_resources().get("CPU", 1.0)
    actor = ray.remote(_Worker).options(
        num_cpus=min(1.0, cpus / n),
        num_gpus=1 if gpu else 0,
        runtime_env=WORKER_RUNTIME_ENV,  # the priority the runtime's workers train at
    )
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // n)
    workers = [
        actor.remote(rank, n, port, cluster.backend, timeout_s, threads) for rank in range(n)
    ]
    try:
        ray.get([w.join.remote() for w in workers], timeout=timeout_s)
    except BaseException:
        for worker in workers:
            ray.kill(worker, no_restart=True)
        raise
    return workers


def _measure(
    workers: list, collective: Collective, size: int, reps: int, timeout_s: float
) -> Sample:
    """Median over reps of the slowest rank's time."""
    import ray

    per_rank = ray.get(
        [w.time_collective.remote(collective.value, size, reps) for w in workers], timeout=timeout_s
    )
    slowest = [max(times) for times in zip(*per_rank, strict=True)]
    numel = _numel(size, len(workers))
    return Sample(collective, numel * _ELEMENT_BYTES, statistics.median(slowest))


def _numel(nbytes: int, world_size: int) -> int:
    """fp32 elements for about `nbytes`, rounded up to a multiple of the world size."""
    numel = -(-nbytes // _ELEMENT_BYTES)
    return -(-numel // world_size) * world_size


def _scalar_chain(leaf: torch.Tensor) -> None:
    """Forward and backward of `CHAIN_LENGTH` scalar multiplies from `leaf`."""
    value = leaf
    for _ in range(CHAIN_LENGTH):
        value = value * 1.0001
    value.sum().backward()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _human(nbytes: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


class _Worker:
    """A Ray actor holding one rank of the probe's process group."""

    def __init__(
        self, rank: int, world_size: int, port: int, backend: str, timeout_s: float, threads: int
    ):
        torch.set_num_threads(threads)
        self.rank = rank
        self.world_size = world_size
        self.port = port
        self.backend = backend
        self.timeout_s = timeout_s
        # Ray gives each GPU actor one visible GPU, which is then cuda:0.
        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def join(self) -> None:
        dist.init_process_group(
            self.backend,
            init_method=f"tcp://127.0.0.1:{self.port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=self.timeout_s),
        )
        dist.barrier()  # the first collective opens the connections; keep that out of timings

    def time_collective(self, name: str, nbytes: int, reps: int) -> list[float]:
        """Seconds of each of `reps` runs (after one warm-up), each starting after a barrier."""
        run = self._collective(Collective(name), _numel(nbytes, self.world_size))
        run()
        times = []
        for _ in range(reps):
            dist.barrier()
            self._sync()
            start = time.perf_counter()
            run()
            self._sync()
            times.append(time.perf_counter() - start)
        return times

    def device_rates(self, reps: int, busy: bool = True) -> list[tuple[float, ...]]:
        """The `DeviceRates` fields (GEMM FLOP/s, memory bytes/s, seconds per kernel, cache
        bytes/s, DTensor's seconds per kernel, seconds per reference block, bf16 GEMM FLOP/s)
        of each of `reps` repetitions, each field the work of one window over the window's time
        (`_window_seconds`). A repetition times every field once, so that a slow spell of a
        shared machine falls on all its fields alike. An idle worker (`busy=False`) only joins
        the windows' barriers and gets the busy workers' figures."""
        a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=self.device)
        b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=self.device)
        a16, b16 = a.bfloat16(), b.bfloat16()
        leaf = torch.ones(16, device=self.device, requires_grad=True)
        with KernelCounter() as counted:
            _scalar_chain(leaf)
        per_kernel = CHAIN_PER_REP * counted.count
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        replicated = distribute_tensor(leaf.detach(), mesh, [Replicate()]).requires_grad_()
        stream = self._stream(STREAM_NUMEL)
        cached = self._stream(CACHE_STREAM_NUMEL)
        block = self._reference_block_step()
        windows = {
            "gemm": (lambda: a @ b, GEMMS_PER_REP),
            "stream": (stream, STREAM_PER_REP),
            "chain": (lambda: _scalar_chain(leaf), CHAIN_PER_REP),
            "cached": (cached, CACHE_STREAM_PER_REP),
            "dtensor": (lambda: _scalar_chain(replicated), CHAIN_PER_REP),
            "block": (block, BLOCKS_PER_REP),
            "gemm_bf16": (lambda: a16 @ b16, GEMMS_PER_REP),
        }
        for run, _ in windows.values():  # warm-up
            if busy:
                run()
        gemm_flops = GEMMS_PER_REP * 2 * GEMM_SIZE**3
        out = []
        for _ in range(reps):
            t = {
                name: self._window_seconds(run, times if busy else 0)
                for name, (run, times) in windows.items()
            }
            out.append(
                (
                    gemm_flops / t["gemm"],
                    STREAM_PER_REP * 3 * STREAM_NUMEL * _ELEMENT_BYTES / t["stream"],
                    t["chain"] / per_kernel,
                    CACHE_STREAM_PER_REP * 3 * CACHE_STREAM_NUMEL * _ELEMENT_BYTES / t["cached"],
                    max(t["dtensor"] - t["chain"], 0.0) / per_kernel,
                    t["block"] / BLOCKS_PER_REP,
                    gemm_flops / t["gemm_bf16"],
                )
            )
        return out

    def _reference_block_step(self) -> Callable[[], None]:
        """One forward and backward of the reference block (module docstring)."""
        torch.manual_seed(0)
        with torch.device(self.device):
            block = reference_block()
            hidden = torch.randn(*REFERENCE_TOKENS, REFERENCE_BLOCK.hidden)
            seed = torch.ones_like(hidden)
        params = list(block.parameters())

        def forward_backward() -> None:
            torch.autograd.grad(block(hidden), params, seed)

        return forward_backward

    def _stream(self, numel: int) -> Callable[[], torch.Tensor]:
        """An out-of-place add of two `numel`-element fp32 vectors (reads two, writes one)."""
        x, y = (torch.randn(numel, device=self.device) for _ in range(2))
        out = torch.empty_like(x)
        return lambda: torch.add(x, y, out=out)

    def _window_seconds(self, run: Callable[[], object], times: int) -> float:
        """The slowest worker's time (an all-reduce MAX) to call `run` `times` times, starting
        after a barrier (an idle worker calls it 0 times)."""
        dist.barrier()
        self._sync()
        start = time.perf_counter()
        for _ in range(times):
            run()
        self._sync()
        slowest = torch.tensor(
            [time.perf_counter() - start], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return slowest.item()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _collective(self, collective: Collective, numel: int) -> Callable[[], None]:
        """A closure running `collective` with B = numel elements (see cost_model for B)."""
        n = self.world_size

        def buffer(elements: int) -> torch.Tensor:
            return torch.ones(elements, dtype=_ELEMENT, device=self.device)

        full, shard = buffer(numel), buffer(numel // n)
        if collective is Collective.ALL_REDUCE:
            return lambda: dist.all_reduce(full)
        if collective is Collective.ALL_GATHER:
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return lambda: gather(full, shard)
        if collective is Collective.REDUCE_SCATTER:
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            return lambda: scatter(shard, full)
        if collective is Collective.ALL_TO_ALL:
            out = buffer(numel)
            return lambda: dist.all_to_all_single(out, full)
        # send/recv: even ranks send to the next odd rank; an odd world's last rank idles.
        if self.rank % 2 == 0 and self.rank + 1 < n:
            return lambda: dist.send(full, self.rank + 1)
        if self.rank % 2 == 1:
            return lambda: dist.recv(full, self.rank - 1)
        return lambda: None
