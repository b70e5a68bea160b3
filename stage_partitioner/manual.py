"""Hand-written Megatron-LM style configurations, priced by the planner's own costs.

A configuration ``(tp, pp, dp, micro-batch size m, recompute, schedule, v)`` on ``tp·pp·dp``
devices becomes a candidate: the fine layers (one per block) split evenly into ``pp·v``
chunks, each rank a submesh of ``tp·dp`` devices viewed as the logical mesh ``(dp, tp)``, a
global micro-batch of ``dp·m`` sequences, and per stage the best intra-op sharding of that
mesh (the fastest memory level that fits, else the smallest). ``"selective"`` recomputation (the attention
core, Korthikanti et al.) is costed as ``"none"``: the captured attention is PyTorch's fused
``scaled_dot_product_attention``, which keeps no ``s²`` tensors to recompute.

``megatron_sc21_runs`` lists the published Megatron-LM runs (SC21 tables 1 and 2) with the
configurations each may have used, and ``best_manual`` picks the fastest that fits: what
``benchmarks/megatron_calibration.py`` compares with the published iteration times.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hierarchical_ap.errors import PlannerOptionError
from hierarchical_ap.models.presets import gpt_spec, read_data_csv
from hierarchical_ap.plan import RECOMPUTE_MODES, SCHEDULES
from stage_partitioner.layers import PlanningLayer, block_layers
from stage_partitioner.planner import PlannerOptions, PlanningContext, equal_ranges, submesh_of
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


def manual_candidates(
    context: PlanningContext,
    config: ManualConfig,
    layers: tuple[PlanningLayer, ...] | None = None,
) -> list[Candidate]:
    """The candidates of ``config``, one per memory level (the simulator picks); ``layers``:
    the graph's ``block_layers``, when the caller has them already."""
    cluster, batch = context.cluster, context.options.global_batch
    _check(config, cluster.num_devices, cluster.devices_per_host, batch)
    layers = tuple(block_layers(context.graph)) if layers is None else layers
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


def best_manual(
    context: PlanningContext, configs: Iterable[ManualConfig]
) -> tuple[ManualConfig, Candidate, Simulation] | None:
    """The fastest of several configurations that fits memory (``None`` when none fits);
    configurations the model or cluster cannot take (``PlannerOptionError``) are skipped."""
    best: tuple[ManualConfig, Candidate, Simulation] | None = None
    for config in configs:
        try:
            result = simulate_manual(context, config)
        except PlannerOptionError:
            continue
        if result is None or result[1].peak_memory_bytes > context.budget:
            continue
        if best is None or result[1].step_time_s < best[2].step_time_s:
            best = (config, *result)
    return best


@dataclass(frozen=True)
class PublishedRun:
    """A measured Megatron-LM run (Narayanan et al., SC21) and the configurations it may have
    used: the tables give tp, pp and dp but not always the micro-batch size, nor the number of
    interleaved chunks per rank."""

    name: str
    model: str
    """Model spec (the zoo GPT at the row's layers, hidden size and heads, s = 2048, V = 51200)."""
    cluster: str
    global_batch: int
    iteration_time_s: float
    configs: tuple[ManualConfig, ...]
    """Candidates; the fastest that fits stands for the run (``best_manual``)."""
    note: str
    zero_stage: int | None = None
    """3 for the ZeRO-3 runs (DeepSpeed's, ``intra_op.zero``), ``None`` for PTD-P (Megatron's
    own sharding, which the ILP finds on the ``(dp, tp)`` mesh)."""

    def planner_options(self) -> PlannerOptions:
        """The options that simulate the run as it was run: its ZeRO stage and, for ZeRO-3
        (DeepSpeed in 2021), list-based collectives."""
        return PlannerOptions(
            global_batch=self.global_batch,
            zero_stage=self.zero_stage,
            zero_list_collectives=self.zero_stage == 3,
        )


MEGATRON_SEQ = 2048
PUBLISHED_MICRO_BATCHES = (1, 2, 4, 8)
"""Micro-batch sizes tried for table 1, whose rows do not give it."""
MAX_VIRTUAL_STAGES = 4
"""Interleaved chunks per rank tried (every count up to this that divides the layers per rank;
the paper does not give it per row)."""


def megatron_sc21_runs() -> list[PublishedRun]:
    """Every row of ``data/megatron_sc21_table1.csv`` and ``megatron_sc21_table2.csv``.

    All runs use fp16, full recomputation and, with pipelining, the interleaved 1F1B schedule
    (the paper's setup); tensor parallelism inside a DGX A100 host, data parallelism across.
    Table 1 rows try ``PUBLISHED_MICRO_BATCHES``; table 2 gives the micro-batch size. ZeRO-3
    rows are ``tp = pp = 1``, ``dp`` = every GPU, with ``zero_stage = 3``: parameters,
    gradients and optimizer states sharded over the data-parallel axis as DeepSpeed does it,
    parameters under its persistence threshold kept whole.
    """
    runs = []
    for row in read_data_csv("megatron_sc21_table1.csv"):
        runs.append(_published_run(row, f"T1 {float(row['params_b']):g}B", PUBLISHED_MICRO_BATCHES))
    for row in read_data_csv("megatron_sc21_table2.csv"):
        name = f"T2 {row['scheme']} {float(row['params_b']):g}B {row['gpus']}"
        zero_stage = 3 if row["scheme"] == "ZeRO-3" else None
        runs.append(_published_run(row, name, (int(row["micro_batch"]),), zero_stage))
    return runs


def _published_run(
    row: dict[str, str],
    name: str,
    micro_batches: Sequence[int],
    zero_stage: int | None = None,
) -> PublishedRun:
    gpus, tp, pp = int(row["gpus"]), int(row["tp"]), int(row["pp"])
    dp = gpus // (tp * pp)
    layers_per_rank = int(row["layers"]) // pp
    chunk_counts = [
        v for v in range(2, MAX_VIRTUAL_STAGES + 1) if pp > 1 and layers_per_rank % v == 0
    ]
    configs = tuple(
        ManualConfig(tp, pp, dp, m, "full", "interleaved", v)
        if v > 1
        else ManualConfig(tp, pp, dp, m, "full", "1f1b", 1)
        for m in micro_batches
        for v in (chunk_counts or [1])
    )
    given = "micro-batch given" if len(micro_batches) == 1 else "best micro-batch that fits"
    return PublishedRun(
        name=name,
        model=gpt_spec(row, MEGATRON_SEQ),
        cluster=f"{gpus // 8}x8xA100-80GB",
        global_batch=int(row["global_batch"]),
        iteration_time_s=float(row["iter_time_s"]),
        configs=configs,
        note=f"tp={tp} pp={pp} dp={dp}, {given}",
        zero_stage=zero_stage,
    )
