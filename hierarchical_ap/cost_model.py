"""Analytic cost model: roofline compute time and alpha-beta collective time per mesh axis.

Compute (roofline plus dispatch): an op that does `F` FLOPs, moves `M` bytes through device
memory and dispatches `K` kernels takes

    t = s · (K · kernel_overhead_s + max(F / (peak(dtype) · matmul_efficiency),
                                         M / (bw(M / K) · memory_efficiency))),

where s is the device's `compute_scale` (1 but on probed CPU workers: the measured over the
modelled time of a reference transformer block there, `hierarchical_ap.probe`),
`kernel_overhead_s` is the device's fixed host-side cost per kernel (`DeviceSpec`; 0 for
the GPU presets, measured by `hap cluster probe` on CPU workers, where eager dispatch and
autograd run on the core that does the maths) and bw(w) is the bandwidth of a kernel whose
working set is w bytes, the op's bytes shared evenly among its kernels (M when K = 0):

    bw(w) = max(cache_bandwidth, hbm_bandwidth)   if 0 < w ≤ cache_bytes,
            hbm_bandwidth                         otherwise

(`DeviceSpec.memory_bandwidth`; the GPU presets have no cache tier, so bw = hbm_bandwidth).

Around the graph's ops a training step also updates each parameter tensor w (n_w elements per
device, g_w bytes of gradient per device):

    gradient accumulation, per micro-batch   (B−1)/B · Σ_w (kernel_overhead_s + 3·g_w / bw(3·g_w))
    optimizer step, once per step             Σ_w (k·kernel_overhead_s + β·n_w / bw(β·n_w / k))

(each bw times memory_efficiency, each term times s): from the second of B micro-batches on, autograd
adds each new gradient into the accumulated one (one kernel reading two buffers and writing
one; 0 with `fused_gradient_accumulation`, as in Megatron-LM, whose weight-gradient GEMM adds
into the fp32 gradient buffer itself), and the optimizer's step dispatches k kernels moving β
bytes per element (`hierarchical_ap.profile.optimizer_update_profile` counts both for the real
torch optimizer).

Collectives among the `n` devices of a mesh-axis group use ring algorithms. On one link with
per-step latency α and per-byte time β = 1 / (bandwidth · link_efficiency), for `B` bytes:

    all-reduce      (B = the buffer)            2(n−1)·α + 2(n−1)/n · B·β
    all-gather      (B = the gathered output)    (n−1)·α +  (n−1)/n · B·β
    reduce-scatter  (B = the full input)         (n−1)·α +  (n−1)/n · B·β
    all-to-all      (B = the local buffer)       (n−1)·α +  (n−1)/n · B·β
    send/recv       (B = the message)                  α +            B·β

and n = 1 costs nothing. The step counts and per-byte factors are `ring_steps` and
`ring_traffic`. When the link carries per-collective (α, β) fitted by `hap cluster probe`, those
are used as they are for that collective (on gloo a reduce-scatter is no cheaper than an
all-reduce, which no analytic formula predicts), and `link_efficiency` does not apply.

A group spanning k hosts with g devices on each (n = k·g):

    all-reduce      = RS_intra(g, B) + AR_inter(k, B/g) + AG_intra(g, B)
    all-gather      = (n−1) · max(α_inter + B/n · β_inter/g,  α_intra + (g−1)/g · B/n · β_intra)
    reduce-scatter  = the same as all-gather (B = the full input)
    all-to-all      = (g−1)·α_intra + (g−1)/n · B·β_intra + (n−g)·α_inter + (n−g)/n · B·β_inter
    send/recv       = on the inter-host link

All-reduce is costed like NCCL's hierarchical algorithms, the intra-host phases on the
intra-host link and the inter-host phase on the inter-host link, where the g devices of a host
each run the inter-host all-reduce on 1/g of the data in parallel.

All-gather and reduce-scatter have no hierarchical algorithm in the NCCL releases of the
published A100 runs (2021; only all-reduce has a tree): they run as one flat ring over all n
ranks, ordered host by host, with as many rings (channels) as a host has NICs, each leaving the
host through a different NIC, each ring carrying 1/g of the data. (Later releases add PAT, for
one GPU per host, and CollNet / NVLS with in-switch reduction; the model does not cover those.)
The ring runs in n−1 steps; in each, every rank passes one chunk of B/n (B/(n·g) per ring) to
its neighbour, and a rank can send step s only after receiving step s−1, so every step lasts as
long as its slowest hop:

* a hop between hosts: α_inter plus the ring's share B/(n·g) on the device's own NIC;
* a hop inside a host: α_intra plus, on the device's NVLink, the chunks of the g−1 rings whose
  next rank is on the same host, (g−1)/g · B/n.

On GPU hosts the network hop is the slower one, so the ring pays (n−1)·α_inter of latency,
growing with the number of ranks n, not hosts, and (n−1)/n · B · β_inter/g of bandwidth, the
same per-device share as the inter-host phase of a two-phase algorithm. (NCCL's tuner,
`tuning.cc`, instead adds the hop latencies along one chunk's path, (n−k)·α_intra +
(k−1)·α_inter: right when latency is pure propagation, but each network step also occupies the
link, the NIC and NCCL's proxy thread posting it, for its α, and all n−1 steps pass every hop.)
ZeRO-3 over every GPU of a large cluster pays this per sharded parameter tensor four times a
micro-batch under full recomputation (all-gathers for the forward, the recomputed forward and
the backward, and the gradient's reduce-scatter; what DeepSpeed's 2021 list-based collectives
added per rank is `intra_op.zero`'s, not the cost model's).

With g = 1 this is the flat ring on the inter-host link. (All-to-all: each device exchanges B/n
bytes with its g−1 host peers over the intra-host link and its n−g remote peers over the
inter-host link.) A group that does not split evenly across hosts is costed as a flat ring over
the inter-host link, the bottleneck of such a ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hierarchical_ap.cluster import Cluster, Collective, DeviceSpec, Link, MeshAxis
from hierarchical_ap.profile import NodeProfile

#: Default efficiencies for datasheet (GPU) figures; see `CostModel`. They are the only free
#: parameters of the GPU cost model and the same for every model and cluster:
#:
#: - `GPU_MATMUL_EFFICIENCY = 0.6`: calibrated once, as a single value, against the ten
#:   Megatron-LM weak-scaling runs of Narayanan et al. (SC21) table 1 (GPT 1.7B–1T on 32–3072
#:   A100s, `data/megatron_sc21_table1.csv`), where it puts the median error of the simulated
#:   iteration time near zero; table 2's six PTD runs (175B and 530B), not used to choose it,
#:   then fall within 7 % (`benchmarks/megatron_calibration.py`). It is below what cuBLAS
#:   reaches on one large isolated GEMM (~0.8 of peak) because it also stands for what the
#:   roofline leaves out of a training step: kernel launch gaps, Megatron's unfused attention
#:   (the s×s scores go through memory) and dropout. (The optimizer step is modelled on its
#:   own since; it moved the simulated Megatron runs by a few per cent, the calibration's
#:   verdict unchanged.)
#: - `GPU_MEMORY_EFFICIENCY = 0.8` and `GPU_LINK_EFFICIENCY = 0.8` (unchanged by the
#:   calibration): the usual rule of thumb that streaming kernels and large NCCL collectives
#:   reach roughly 80 % of the datasheet HBM and link bandwidths. Megatron's runs are
#:   compute-bound enough that the calibration cannot separate them from the matmul figure.
GPU_MATMUL_EFFICIENCY = 0.6
GPU_MEMORY_EFFICIENCY = 0.8
GPU_LINK_EFFICIENCY = 0.8


def ring_steps(collective: Collective, n: int) -> int:
    """Latency-bound steps of the ring algorithm on n devices (0 for n = 1)."""
    if n <= 1:
        return 0
    if collective is Collective.ALL_REDUCE:
        return 2 * (n - 1)
    if collective is Collective.SEND_RECV:
        return 1
    return n - 1


def ring_traffic(collective: Collective, n: int) -> float:
    """Bytes each device sends per byte of the collective's size B (0 for n = 1):
    2(n−1)/n for all-reduce, (n−1)/n for all-gather / reduce-scatter / all-to-all, 1 for
    send/recv."""
    if n <= 1:
        return 0.0
    if collective is Collective.ALL_REDUCE:
        return 2 * (n - 1) / n
    if collective is Collective.SEND_RECV:
        return 1.0
    return (n - 1) / n


@dataclass(frozen=True)
class CostModel:
    """Roofline compute and alpha-beta communication times (see the module docstring).

    - `matmul_efficiency`: fraction of the device's peak FLOP/s the GEMMs of a training step
      reach (see `GPU_MATMUL_EFFICIENCY` for the calibrated GPU default);
    - `memory_efficiency`: fraction of HBM bandwidth a streaming kernel reaches;
    - `link_efficiency`: fraction of a link's bandwidth a large collective reaches (unused for
      collectives with probed alpha/beta, which are already achieved figures);
    - `fused_gradient_accumulation`: gradients accumulate inside the weight-gradient GEMM at
      no extra cost (Megatron-LM's `gradient_accumulation_fusion`, what the published GPU runs
      the defaults are calibrated on used), instead of eager PyTorch's separate add per
      parameter and micro-batch (the CPU default, what the runtime's workers run).
    """

    matmul_efficiency: float = GPU_MATMUL_EFFICIENCY
    memory_efficiency: float = GPU_MEMORY_EFFICIENCY
    link_efficiency: float = GPU_LINK_EFFICIENCY
    fused_gradient_accumulation: bool = True

    def __post_init__(self) -> None:
        for field in ("matmul_efficiency", "memory_efficiency", "link_efficiency"):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise ValueError(f"CostModel.{field} must be in (0, 1], got {value!r}")

    @classmethod
    def for_cluster(cls, cluster: Cluster) -> CostModel:
        """`for_device` of the cluster's devices."""
        return cls.for_device(cluster.device)

    @classmethod
    def for_device(cls, device: DeviceSpec) -> CostModel:
        """Defaults suited to the device: GPU datasheet peaks get the GPU efficiencies; CPU
        (gloo) figures are already achieved rates (per-core defaults or probed), so 1.0."""
        if device.is_cpu:
            return cls(
                matmul_efficiency=1.0,
                memory_efficiency=1.0,
                link_efficiency=1.0,
                fused_gradient_accumulation=False,
            )
        return cls()

    # ----------------------------------------------------------------------------- compute

    def op_time(
        self,
        flops: float,
        bytes_accessed: float,
        device: DeviceSpec,
        dtype: torch.dtype,
        kernels: int = 0,
    ) -> float:
        """Time (s): compute_scale · (kernels·kernel_overhead_s + max(flops /
        (peak(dtype)·matmul_efficiency), bytes_accessed / (bw·memory_efficiency))), bw the
        device's bandwidth for a kernel touching bytes_accessed / max(kernels, 1) bytes
        (`DeviceSpec.memory_bandwidth`)."""
        if flops < 0 or bytes_accessed < 0 or kernels < 0:
            raise ValueError(
                f"flops, bytes and kernels must be >= 0, got {flops!r}, {bytes_accessed!r} and "
                f"{kernels!r}"
            )
        compute = flops / (device.peak_flops(dtype) * self.matmul_efficiency)
        bandwidth = device.memory_bandwidth(bytes_accessed / max(kernels, 1))
        memory = bytes_accessed / (bandwidth * self.memory_efficiency)
        return device.compute_scale * (kernels * device.kernel_overhead_s + max(compute, memory))

    def node_forward_time(
        self, profile: NodeProfile, device: DeviceSpec, dtype: torch.dtype, work_split: int = 1
    ) -> float:
        """`op_time` of a profiled node's forward, its FLOPs and bytes split `work_split` ways
        (its kernels are dispatched by every device)."""
        return self.op_time(
            profile.forward_flops / work_split,
            profile.forward_bytes / work_split,
            device,
            dtype,
            profile.forward_kernels,
        )

    def node_backward_time(
        self, profile: NodeProfile, device: DeviceSpec, dtype: torch.dtype, work_split: int = 1
    ) -> float:
        """`op_time` of a profiled node's backward, split as `node_forward_time`."""
        return self.op_time(
            profile.backward_flops / work_split,
            profile.backward_bytes / work_split,
            device,
            dtype,
            profile.backward_kernels,
        )

    def gradient_accumulation_time(
        self, gradient_bytes: Sequence[float], device: DeviceSpec, num_microbatches: int
    ) -> float:
        """Per micro-batch (s): (B−1)/B · Σ_w (kernel_overhead_s + 3·g_w / bw(3·g_w)) for the
        per-device gradient bytes g_w of each parameter tensor, or 0 with
        `fused_gradient_accumulation` (module docstring)."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches!r}")
        if self.fused_gradient_accumulation:
            return 0.0
        share = (num_microbatches - 1) / num_microbatches
        return share * sum(
            self.op_time(0.0, 3 * g, device, torch.float32, 1) for g in gradient_bytes
        )

    def optimizer_step_time(
        self,
        kernels_per_tensor: int,
        bytes_per_element: float,
        elements: Sequence[float],
        device: DeviceSpec,
    ) -> float:
        """Once per step (s): Σ_w (k·kernel_overhead_s + β·n_w / bw(β·n_w / k)) over the per-device
        elements n_w of each parameter tensor the optimizer updates (module docstring)."""
        return sum(
            self.op_time(0.0, bytes_per_element * n, device, torch.float32, kernels_per_tensor)
            for n in elements
        )

    # ----------------------------------------------------------------------------- communication

    def collective_time(
        self, collective: Collective, nbytes: float, axes: MeshAxis | Sequence[MeshAxis]
    ) -> float:
        """Time (s) of `collective` on `nbytes` among the groups of one mesh axis, or of several
        axes at once (a sequence, e.g. `mesh.axes` for the whole mesh)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        axis = axes if isinstance(axes, MeshAxis) else MeshAxis.combine(axes)
        n = axis.size
        if n == 1:
            return 0.0
        if not axis.spans_hosts:
            return self.ring_time(collective, n, nbytes, axis.intra_link)
        if collective is Collective.SEND_RECV or not axis.splits_evenly:
            return self.ring_time(collective, n, nbytes, axis.inter_link)
        return self._multi_host_time(collective, nbytes, axis)

    def all_reduce_time(self, nbytes: float, axes: MeshAxis | Sequence[MeshAxis]) -> float:
        """All-reduce of an `nbytes` buffer: 2(n−1)·α + 2(n−1)/n · nbytes·β on one link."""
        return self.collective_time(Collective.ALL_REDUCE, nbytes, axes)

    def bucketed_all_reduce_time(
        self, nbytes: float, axes: MeshAxis | Sequence[MeshAxis], bucket_bytes: float
    ) -> float:
        """One tensor's share of all-reducing a flat bucket of `bucket_bytes` (DDP's gradient
        buckets): the all-reduce time is affine in the bytes, T(B) = T(0) + (T(B) − T(0)), and
        the bucket's latency T(0) is shared by its tensors in proportion to their bytes:

            t = min(1, nbytes / bucket_bytes) · T(0) + T(nbytes) − T(0)."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes!r}")
        latency = self.all_reduce_time(0.0, axes)
        share = min(1.0, nbytes / bucket_bytes)
        return share * latency + self.all_reduce_time(nbytes, axes) - latency

    def all_gather_time(self, nbytes: float, axes: MeshAxis | Sequence[MeshAxis]) -> float:
        """All-gather whose gathered output is `nbytes`: (n−1)·α + (n−1)/n · nbytes·β."""
        return self.collective_time(Collective.ALL_GATHER, nbytes, axes)

    def reduce_scatter_time(self, nbytes: float, axes: MeshAxis | Sequence[MeshAxis]) -> float:
        """Reduce-scatter of an `nbytes` input: (n−1)·α + (n−1)/n · nbytes·β."""
        return self.collective_time(Collective.REDUCE_SCATTER, nbytes, axes)

    def all_to_all_time(self, nbytes: float, axes: MeshAxis | Sequence[MeshAxis]) -> float:
        """All-to-all of an `nbytes` local buffer: (n−1)·α + (n−1)/n · nbytes·β."""
        return self.collective_time(Collective.ALL_TO_ALL, nbytes, axes)

    def send_recv_time(self, nbytes: float, path: MeshAxis | Link) -> float:
        """Point-to-point message of `nbytes`: α + nbytes·β, over a link or between neighbours
        of a mesh axis (the inter-host link if the axis spans hosts)."""
        if isinstance(path, Link):
            return self.ring_time(Collective.SEND_RECV, 2, nbytes, path)
        return self.collective_time(Collective.SEND_RECV, nbytes, path)

    def ring_time(self, collective: Collective, n: int, nbytes: float, link: Link) -> float:
        """Flat ring on one link: ring_steps·α + ring_traffic·nbytes·β, with the link's probed
        (α, β) for this collective if present, else (latency, 1 / (bandwidth·link_efficiency))."""
        alpha, beta = self._alpha_beta(collective, link)
        return ring_steps(collective, n) * alpha + ring_traffic(collective, n) * nbytes * beta

    def _alpha_beta(self, collective: Collective, link: Link) -> tuple[float, float]:
        """(α, β) of `collective` on `link`: probed if present, else analytic."""
        fit = link.fit(collective)
        if fit is not None:
            return fit.alpha, fit.beta
        return link.latency, 1.0 / (link.bandwidth * self.link_efficiency)

    def _multi_host_time(self, collective: Collective, nbytes: float, axis: MeshAxis) -> float:
        """A collective on k hosts × g devices as NCCL runs it (module docstring): two-level
        all-reduce, flat-ring all-gather / reduce-scatter, pairwise all-to-all."""
        k, g, n = axis.hosts, axis.devices_per_host, axis.size
        intra, inter = axis.intra_link, axis.inter_link
        if collective is Collective.ALL_REDUCE:
            return (
                self.ring_time(Collective.REDUCE_SCATTER, g, nbytes, intra)
                + self.ring_time(Collective.ALL_REDUCE, k, nbytes / g, inter)
                + self.ring_time(Collective.ALL_GATHER, g, nbytes, intra)
            )
        if collective in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER):
            return self._flat_ring_time(collective, nbytes, axis)
        # all-to-all: g−1 peers on the host, n−g on other hosts, each getting nbytes / n.
        per_peer = nbytes / n
        return self._exchange_time(g - 1, per_peer, intra) + self._exchange_time(
            n - g, per_peer, inter
        )

    def _flat_ring_time(self, collective: Collective, nbytes: float, axis: MeshAxis) -> float:
        """NCCL's ring all-gather / reduce-scatter over k hosts × g devices, paced by its
        slowest hop (module docstring): (n−1) · max(α_inter + B/n · β_inter/g,
        α_intra + (g−1)/g · B/n · β_intra)."""
        g, n = axis.devices_per_host, axis.size
        alpha_intra, beta_intra = self._alpha_beta(collective, axis.intra_link)
        alpha_inter, beta_inter = self._alpha_beta(collective, axis.inter_link)
        chunk = nbytes / n
        network_hop = alpha_inter + chunk * beta_inter / g
        host_hop = alpha_intra + (g - 1) / g * chunk * beta_intra
        return ring_steps(collective, n) * max(network_hop, host_hop)

    def _exchange_time(self, peers: int, per_peer: float, link: Link) -> float:
        """`peers` pairwise exchanges of `per_peer` bytes on one link: peers·(α + per_peer·β)."""
        alpha, beta = self._alpha_beta(Collective.ALL_TO_ALL, link)
        return peers * (alpha + per_peer * beta)
