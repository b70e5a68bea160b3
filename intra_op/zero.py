"""ZeRO stages (Rajbhandari et al., SC20) as constraints on the sharding ILP's parameters.

On a logical mesh ``(dp, tp)`` mesh axis 0 is the data-parallel axis. Left free, the ILP
chooses each parameter's storage placement itself (sharding it along axis 0 is ZeRO-3). A
``ZeroStage`` instead fixes what the stage partitions over axis 0 and prices it with the same
resharding costs (``intra_op.resharding``). For a parameter of ``w`` bytes whose storage is
split ``s`` ways by the other axes (tensor parallelism), with gradient and optimizer factors
``g`` and ``o`` (``TrainingMemory``), per device:

    stage  storage on axis 0   parameters  gradients   optimizer   gradient synchronisation
    0      replicated          w/s         g·w/s       o·w/s       all-reduce once per step
    1      replicated          w/s         g·w/s       o·w/(s·dp)  reduce-scatter + all-gather
                                                                   of the parameters, once
    2      replicated          w/s         g·w/(s·dp)  o·w/(s·dp)  reduce-scatter every
                                                                   micro-batch, all-gather once
    3      sharded             w/(s·dp)    g·w/(s·dp)  o·w/(s·dp)  all-gather before each use,
                                                                   reduce-scatter every
                                                                   micro-batch

the ZeRO paper's ``(2 + 2 + K)·Ψ`` accounting divided by ``N_d`` stage by stage. ZeRO-3's
gathers are the ILP's own parameter edges: a sharded weight used replicated is all-gathered
for the forward and again for the backward (and for the recomputed forward, which the outer
planner adds), and its gradient reduce-scattered every micro-batch
(``accumulated_gradient_times``). ZeRO-1 and ZeRO-2 keep the weight replicated, and their
gradient goes through the *optimizer shard*: the storage placement with axis 0 turned into
``Shard(d)`` for the first dim ``d`` that splits evenly.

Two rules follow DeepSpeed: ZeRO-3 leaves parameters of fewer than ``PERSISTENCE_THRESHOLD``
elements unpartitioned (``stage3_param_persistence_threshold``; they get ZeRO-2's treatment),
and partitions a parameter no dim of which splits evenly over axis 0 *flat*: DeepSpeed
flattens it and pads it to a multiple of the ``dp`` ranks, so each holds ``⌈numel/dp⌉``
elements (``padded_partitions``). Its placement is written ``Shard(d)`` on its largest dim and
costed like an even shard, ``w/dp`` per device and an all-gather of ``w`` (the padding is
under one element per rank). Gradients and optimizer states that ZeRO-1 / 2 (or ZeRO-3 below
the threshold) partition are split the same padded way where no dim splits evenly. Only the
cost model uses such placements: the planner's own search (no ``ZeroStage``) keeps to even
ones, which the runtime executes.

With ``list_collectives`` the parameters' axis-0 collectives are costed as DeepSpeed ran them
in 2021 (≤ 0.3.16, the release of the published ZeRO-3 runs; DeepSpeed PR #1188 and issue
#1069 describe it): each parameter is gathered on its own, synchronously, with the list-based
``torch.distributed.all_gather`` into ``n`` views of a zero-filled buffer, which DeepSpeed
builds in a Python loop over the ranks and PyTorch's NCCL process group fills with one copy
per rank out of its flat receive buffer; each gradient is reduce-scattered from a list of
``n`` views, which the process group first copies into one flat buffer. On top of the ring,
for a tensor of ``B`` bytes gathered or reduce-scattered over ``n = dp`` ranks:

    all-gather      n · (t_view + t_copy)  +  3B / (hbm_bandwidth · memory_efficiency)
    reduce-scatter  n · (t_view + t_copy)  +  2B / (hbm_bandwidth · memory_efficiency)

(the fill writes ``B``, the copies read and write ``B``), with ``t_view = VIEW_S`` one Python
``narrow`` and ``t_copy = COPY_LAUNCH_S`` the launch of one device copy. Later DeepSpeed
releases coalesce the gathers into ``all_gather_into_tensor`` (no per-rank work), the default.

With ``tensor_parallel``, mesh axis 1 is held to tensor parallelism as Megatron-LM uses it:
every weight matrix (a parameter of two or more dims) is split along axis 1 wherever it can
be, so that a configuration's ``tp`` devices divide the weights rather than the batch; the ILP
still chooses which dim (column or row parallel, vocabulary-parallel embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hierarchical_ap.cluster import LogicalMesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.profile import TensorMeta
from intra_op.placement import Partial, Placements, Shard, is_valid, shard_factor
from intra_op.resharding import accumulated_gradient_times, reshard_time

ZERO_STAGES = (0, 1, 2, 3)
DATA_AXIS = 0
TENSOR_AXIS = 1
PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default ``stage3_param_persistence_threshold``: smaller parameters stay whole."""
VIEW_S = 1.2e-6
"""One ``tensor.narrow`` in a Python loop (measured: 1.2 µs per view over 2,240 views, torch
2.13 on this project's development VM)."""
COPY_LAUNCH_S = 5e-6
"""Host cost of launching one device-to-device copy from C++: the few-µs CUDA launch overhead
(an assumption, not a measurement; CUDA documents launches of a few microseconds)."""


@dataclass(frozen=True)
class StateBytes:
    """Training state of one parameter per device, split as the ZeRO paper counts it."""

    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


@dataclass(frozen=True)
class ZeroStage:
    """What ZeRO stage ``stage`` partitions over mesh axis 0, and whether axis 1 is held to
    tensor parallelism (module docstring)."""

    stage: int
    tensor_parallel: bool = False
    list_collectives: bool = False
    """ZeRO-3 only: cost the parameters' axis-0 collectives as DeepSpeed's 2021 list-based
    ones (module docstring)."""

    def __post_init__(self) -> None:
        if self.stage not in ZERO_STAGES:
            raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {self.stage!r}")
        if self.list_collectives and self.stage != 3:
            raise ValueError(
                f"list_collectives models DeepSpeed's 2021 ZeRO-3 gathers; stage {self.stage} "
                "has none (use stage 3 or drop list_collectives)"
            )

    @property
    def syncs_through_shards(self) -> bool:
        """ZeRO-1 and ZeRO-2 always synchronise a gradient through the optimizer shard (the
        updated shard must be all-gathered), never by a plain all-reduce."""
        return self.stage in (1, 2)

    def storage_choices(
        self, meta: TensorMeta, choices: Sequence[Placements], mesh_shape: Sequence[int]
    ) -> list[Placements]:
        """The storage placements a parameter may take: sharded along axis 0 under ZeRO-3
        (when it is partitioned at all), replicated along it otherwise; weight matrices split
        along axis 1 under tensor parallelism."""
        allowed = list(choices)
        if mesh_shape[DATA_AXIS] > 1:
            sharded = [p for p in allowed if isinstance(p[DATA_AXIS], Shard)]
            partitioned = self.stage == 3 and meta.numel >= PERSISTENCE_THRESHOLD
            if partitioned:
                sharded = sharded or padded_partitions(meta, allowed)
            if partitioned and sharded:
                allowed = sharded
            else:
                allowed = [p for p in allowed if not isinstance(p[DATA_AXIS], Shard)]
        if self.tensor_parallel and mesh_shape[TENSOR_AXIS] > 1 and len(meta.shape) >= 2:
            split = [p for p in allowed if isinstance(p[TENSOR_AXIS], Shard)]
            allowed = split or allowed
        return allowed

    def state_bytes(
        self,
        meta: TensorMeta,
        stored: Placements,
        mesh_shape: Sequence[int],
        gradient_factor: float,
        optimizer_factor: float,
    ) -> StateBytes:
        """Parameters, gradients and optimizer states per device for storage ``stored``."""
        weight = meta.nbytes / shard_factor(stored, mesh_shape)
        split = self.state_split(meta, stored, mesh_shape)
        return StateBytes(
            parameters=weight,
            gradients=gradient_factor * weight / (split if self.stage >= 2 else 1),
            optimizer=optimizer_factor * weight / split,
        )

    def gradient_times(
        self,
        meta: TensorMeta,
        grad: Placements,
        stored: Placements,
        mesh: LogicalMesh,
        cost: CostModel,
    ) -> tuple[float, float]:
        """``(every micro-batch, once per step)`` seconds of a parameter's gradient
        synchronisation, from the placement it is produced in (``grad``) to its storage."""
        shard = optimizer_shard(meta, stored, mesh.shape)
        if shard is None or self.stage == 0 or isinstance(stored[DATA_AXIS], Shard):
            return accumulated_gradient_times(meta, grad, stored, mesh, cost)
        gather = reshard_time(meta, shard, stored, mesh, cost)
        if self.stage == 1:
            every, _ = accumulated_gradient_times(meta, grad, stored, mesh, cost)
            staged = _staged(grad, stored)
            return every, reshard_time(meta, staged, shard, mesh, cost) + gather
        every, rest = accumulated_gradient_times(meta, grad, shard, mesh, cost)
        return every, rest + gather

    def collective_overhead(
        self, meta: TensorMeta, src: Placements, dst: Placements, mesh: LogicalMesh, cost: CostModel
    ) -> float:
        """Seconds that list-based collectives add to resharding a parameter (or its gradient)
        from ``src`` to ``dst`` (module docstring): an all-gather where axis 0 goes from
        ``Shard`` to unsharded, a reduce-scatter where it goes from ``Partial`` to ``Shard``;
        0 without ``list_collectives``."""
        ranks = mesh.shape[DATA_AXIS]
        if not self.list_collectives or ranks == 1:
            return 0.0
        before, after = src[DATA_AXIS], dst[DATA_AXIS]
        if isinstance(before, Shard) and not isinstance(after, Shard):
            passes = 3
        elif isinstance(before, Partial) and isinstance(after, Shard):
            passes = 2
        else:
            return 0.0
        gathered = meta.nbytes / shard_factor(src[1:], mesh.shape[1:])
        memory = cost.op_time(0.0, passes * gathered, mesh.submesh.cluster.device, meta.dtype)
        return ranks * (VIEW_S + COPY_LAUNCH_S) + memory

    def state_split(self, meta: TensorMeta, stored: Placements, mesh_shape: Sequence[int]) -> int:
        """How many ways the stage splits the optimizer state (and, from stage 2, the
        gradients) over axis 0 beyond the storage ``stored``: the size of axis 0, or 1."""
        if self.stage == 0 or isinstance(stored[DATA_AXIS], Shard):
            return 1
        partitioned = optimizer_shard(meta, stored, mesh_shape) is not None
        return mesh_shape[DATA_AXIS] if partitioned else 1


def padded_partitions(meta: TensorMeta, choices: Sequence[Placements]) -> list[Placements]:
    """DeepSpeed's flat, padded partition over axis 0 of a tensor no dim of which splits evenly
    there (module docstring), for each of ``choices`` replicated on axis 0: axis 0 set to
    ``Shard(d)`` of the largest dim ``d`` (when no other axis shards ``d``)."""
    if not meta.shape:
        return []
    largest = max(range(len(meta.shape)), key=lambda d: meta.shape[d])
    return [
        (Shard(largest), *p[1:])
        for p in choices
        if not isinstance(p[DATA_AXIS], Shard)
        and all(not isinstance(q, Shard) or q.dim != largest for q in p[1:])
    ]


def optimizer_shard(
    meta: TensorMeta, stored: Placements, mesh_shape: Sequence[int]
) -> Placements | None:
    """``stored`` with axis 0 turned into ``Shard(d)`` for the first dim ``d`` that splits
    evenly, else DeepSpeed's padded partition (``None`` when axis 0 has one device, ``stored``
    is sharded on it already, or the tensor is a scalar)."""
    if mesh_shape[DATA_AXIS] == 1 or isinstance(stored[DATA_AXIS], Shard):
        return None
    for dim in range(len(meta.shape)):
        candidate = (Shard(dim), *stored[1:])
        if is_valid(meta.shape, candidate, mesh_shape):
            return candidate
    padded = padded_partitions(meta, [stored])
    return padded[0] if padded else None


def _staged(grad: Placements, stored: Placements) -> Placements:
    """The placement ``accumulated_gradient_times`` accumulates a gradient in."""
    return tuple(w if isinstance(w, Shard) else g for g, w in zip(grad, stored, strict=True))
