"""Hand-written Megatron-LM style configurations, priced by the planner's own costs.

A configuration ``(tp, pp, dp, micro-batch size m, recompute, schedule, v)`` on ``tp·pp·dp``
devices becomes a candidate: the fine layers (one per block) split evenly into ``pp·v``
chunks, each rank a submesh of ``tp·dp`` devices viewed as the logical mesh ``(dp, tp)``, a
global micro-batch of ``dp·m`` sequences, and per stage the best intra-op sharding of that
mesh (the fastest memory level that fits, else the smallest). ``"selective"`` recomputation (the attention
core, Korthikanti et al.) is costed as ``"none"``: the captured attention is PyTorch's fused
``scaled_dot_product_attention``, which keeps no ``s²`` tensors to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from hierarchical_ap.errors import PlannerOptionError
from hierarchical_ap.plan import RECOMPUTE_MODES, SCHEDULES
from stage_partitioner.layers import block_layers
from stage_partitioner.planner import PlanningContext, equal_ranges, submesh_of
from stage_partitioner.simulator import Candidate, Simulation
from stage_partitioner.stage_costs import MEMORY_LEVELS, MeshChoice, StageOption


@dataclass(frozen=True)
class ManualConfig:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str = "none"
    schedule: str = "1f1b"
    virtual_stages: int = 1

    def describe(self) -> str:
        text = (
            f"manual configuration tp={self.tp} pp={self.pp} dp={self.dp} "
            f"micro-batch={self.micro_batch_size} recompute={self.recompute} "
            f"schedule={self.schedule}"
        )
        return text + (f" v={self.virtual_stages}" if self.schedule == "interleaved" else "")


def manual_candidates(context: PlanningContext, config: ManualConfig) -> list[Candidate]:
    """The candidates of ``config``, one per memory level (the simulator picks)."""
    cluster, batch = context.cluster, context.options.global_batch
    _check(config, cluster.num_devices, cluster.devices_per_host, batch)
    layers = tuple(block_layers(context.graph))
    v = config.virtual_stages if config.schedule == "interleaved" else 1
    chunks = config.pp * v
    if len(layers) % chunks:
        raise PlannerOptionError(
            f"{len(layers)} layers cannot be split into pp·v = {chunks} equal chunks; "
            "choose pp and --virtual-stages whose product divides the number of layers"
        )
    microbatch = config.dp * config.micro_batch_size
    num_microbatches = batch // microbatch
    if config.schedule == "interleaved" and num_microbatches % config.pp:
        raise PlannerOptionError(
            f"the interleaved schedule needs the {num_microbatches} micro-batches to be a "
            f"multiple of pp={config.pp}; change the global batch or the micro-batch size"
        )
    submesh = submesh_of(config.tp * config.dp, cluster.devices_per_host)
    mesh = MeshChoice(submesh, (config.dp, config.tp))
    recompute = "full" if config.recompute == "full" else "none"
    ranges = equal_ranges(len(layers), chunks)
    return [
        Candidate(
            layers,
            ranges,
            (StageOption(mesh, level, recompute),) * chunks,
            microbatch,
            num_microbatches,
            config.schedule,
            v,
        )
        for level in range(MEMORY_LEVELS)
    ]


def simulate_manual(
    context: PlanningContext, config: ManualConfig
) -> tuple[Candidate, Simulation] | None:
    """The fastest of ``config``'s candidates that fits memory, else the smallest one."""
    results = [
        (c, s) for c in manual_candidates(context, config) if (s := context.simulator.simulate(c))
    ]
    if not results:
        return None
    fitting = [r for r in results if r[1].peak_memory_bytes <= context.budget]
    if fitting:
        return min(fitting, key=lambda r: r[1].step_time_s)
    return min(results, key=lambda r: r[1].peak_memory_bytes)


def _check(config: ManualConfig, devices: int, per_host: int, batch: int) -> None:
    if min(config.tp, config.pp, config.dp, config.micro_batch_size, config.virtual_stages) < 1:
        raise PlannerOptionError(f"tp, pp, dp, micro-batch size and v must be ≥ 1, got {config}")
    if config.tp * config.pp * config.dp != devices:
        raise PlannerOptionError(
            f"tp·pp·dp = {config.tp * config.pp * config.dp} but the cluster has {devices} "
            "devices; choose degrees whose product is the device count"
        )
    if config.tp > per_host or per_host % config.tp:
        raise PlannerOptionError(
            f"tp={config.tp} must divide the {per_host} devices of a host (tensor parallelism "
            "stays inside a host)"
        )
    group = config.tp * config.dp
    if group > per_host and group % per_host:
        raise PlannerOptionError(
            f"a stage's tp·dp = {group} devices must be whole hosts of {per_host} or fit in one"
        )
    if batch % (config.dp * config.micro_batch_size):
        raise PlannerOptionError(
            f"global batch {batch} is not divisible by dp·micro-batch = "
            f"{config.dp * config.micro_batch_size}"
        )
    if config.recompute not in RECOMPUTE_MODES:
        raise PlannerOptionError(
            f"recompute must be one of {RECOMPUTE_MODES}, got {config.recompute!r}"
        )
    if config.schedule not in SCHEDULES:
        raise PlannerOptionError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
