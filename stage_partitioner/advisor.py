"""`hap advise`: the classic parallel configurations of a model on a cluster, and the rule
that recommends one.

A *configuration* is Megatron-LM's ``(tp, pp, dp, m)`` — tensor parallelism inside a host,
``pp`` pipeline stages, ``dp`` data-parallel replicas, ``m`` sequences per micro-batch and
replica — with a ZeRO stage over the data-parallel axis (``intra_op.zero``), recomputation
(none, selective, full) and a pipeline schedule (1F1B, GPipe, interleaved 1F1B with ``v``
chunks per rank). On ``N`` devices, ``M`` per host, a model of ``L`` layers and ``H`` heads
(``H_kv`` key/value heads), global batch ``B_g``, it can be formed when

    tp | M,  tp | H,  tp | H_kv,  tp·pp·dp = N,  pp | L,  (tp·dp ≤ M or M | tp·dp),
    dp·m | B_g,  and for interleaving  pp·v | L  and  pp | B_g / (dp·m),

and ZeRO-2/3 only without pipelining (``pp = 1``): DeepSpeed, which implements them, rejects
ZeRO-2/3 with pipeline parallelism ("ZeRO-2 and ZeRO-3 are incompatible with pipeline
parallelism"), since the gradients each stage accumulates over micro-batches would be
reduce-scattered every micro-batch; pipelines use ZeRO-1 (Megatron's distributed optimizer).

``enumerate_configurations`` lists every formable configuration and says why the others are
dropped, at the coarsest level that rules them out (``tp=3`` once, not once per ``pp``). Some
are *equivalent* to another and are not priced twice: ZeRO-1/2/3 with ``dp = 1`` is ZeRO-0,
and selective recomputation is priced as none (the captured attention is PyTorch's fused
``scaled_dot_product_attention``, which keeps no ``s²`` scores to recompute;
``stage_partitioner.manual``). Pricing is ``stage_partitioner.advisor_search``.

``recommend`` picks, among the priced rows within ``TOLERANCE`` (3 %) of the fastest, the
simplest: fewest kinds of parallelism (tensor, pipeline, data), then the lowest ZeRO stage,
then the least recomputation, then the plainest schedule (1F1B, GPipe, interleaved), then
the fastest. The two-level planner's plan counts as less simple than any
configuration: it is recommended only when no configuration is within the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hierarchical_ap.graph import OpGraph
from stage_partitioner.layers import block_layers
from stage_partitioner.manual import ManualConfig

TOLERANCE = 0.03
MICRO_BATCH_SIZES = (1, 2, 4, 8)
ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "gpipe", "interleaved")
MAX_VIRTUAL_STAGES = 4

ZERO_WITH_PIPELINE = (
    "ZeRO-2/3 shard the gradients that pipeline stages accumulate over micro-batches; "
    "DeepSpeed rejects them with pipeline parallelism (ZeRO-1, Megatron's distributed "
    "optimizer, is the stage that pipelines use)"
)
SELECTIVE_AS_NONE = (
    "priced as recompute=none: the captured attention is fused scaled_dot_product_attention, "
    "which keeps no s² scores to recompute"
)
CANNOT_BE_FORMED = "cannot be formed"
EQUIVALENT = "equivalent"
DOES_NOT_FIT = "does not fit memory"
OUTRANKED = "outranked"
"""Priced no further: a lower bound on its step time shows it can enter neither the top rows
nor the tolerance of the fastest."""


@dataclass(frozen=True)
class Configuration:
    """One classic configuration (module docstring)."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    zero: int = 0
    recompute: str = "none"
    schedule: str = "1f1b"
    virtual_stages: int = 1

    @property
    def manual(self) -> ManualConfig:
        """The same degrees as ``stage_partitioner.manual`` prices them."""
        return ManualConfig(
            self.tp,
            self.pp,
            self.dp,
            self.micro_batch_size,
            self.recompute,
            self.schedule,
            self.virtual_stages,
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of parallelism used."""
        used = (("tensor", self.tp), ("pipeline", self.pp), ("data", self.dp))
        return tuple(name for name, degree in used if degree > 1)

    @property
    def schedule_label(self) -> str:
        if self.pp == 1:
            return "-"
        return f"interleaved v={self.virtual_stages}" if self.virtual_stages > 1 else self.schedule

    @property
    def label(self) -> str:
        return (
            f"tp={self.tp} pp={self.pp} dp={self.dp} m={self.micro_batch_size} "
            f"ZeRO-{self.zero} recompute={self.recompute} schedule={self.schedule_label}"
        )

    @property
    def compact(self) -> str:
        """``tp4 pp8 dp48 m1 Z1 none interleaved v=4``: the label in a narrow column."""
        return (
            f"tp{self.tp} pp{self.pp} dp{self.dp} m{self.micro_batch_size} Z{self.zero} "
            f"{self.recompute} {self.schedule_label}"
        )

    def simplicity(self) -> tuple[int, ...]:
        """Sort key of the simplicity rule: smaller is simpler (module docstring)."""
        return (
            len(self.kinds),
            self.zero,
            RECOMPUTE.index(self.recompute),
            SCHEDULES.index(self.schedule) if self.pp > 1 else 0,
        )


@dataclass(frozen=True)
class Rejected:
    """Configurations left out, and why: ``what`` names the degrees they share, ``rule`` the
    condition they fail (the same for every rejection of its kind), ``reason`` the details."""

    what: str
    category: str
    rule: str
    reason: str
    bound_s: float | None = None
    """For outranked configurations: the lower bound on their step time."""


@dataclass(frozen=True)
class ModelShape:
    """What formability depends on: pipeline layers (one per block), attention heads."""

    layers: int
    heads: int | None
    """``None``: unknown (a model from a factory), no condition on tp."""
    kv_heads: int | None


def model_shape(spec: str, seq: int | None, graph: OpGraph) -> ModelShape:
    """The shape of the model a spec names: its blocks as ``block_layers`` finds them, and its
    heads from the zoo's configuration (a model without one puts no head condition on tp)."""
    from hierarchical_ap.models import from_spec

    config = from_spec(spec, batch=1, seq=seq, device="meta").config
    layers = len(block_layers(graph))
    if config is None:
        return ModelShape(layers, heads=None, kv_heads=None)
    return ModelShape(layers, config.heads, config.kv_heads)


@dataclass(frozen=True)
class SearchSpace:
    micro_batch_sizes: Sequence[int] = MICRO_BATCH_SIZES
    zero_stages: Sequence[int] = ZERO_STAGES
    recompute: Sequence[str] = RECOMPUTE
    schedules: Sequence[str] = SCHEDULES
    max_virtual_stages: int = MAX_VIRTUAL_STAGES


def enumerate_configurations(
    shape: ModelShape,
    num_hosts: int,
    devices_per_host: int,
    global_batch: int,
    space: SearchSpace = SearchSpace(),
) -> tuple[list[Configuration], list[Rejected]]:
    """Every formable configuration, and the rejected ones with their reasons."""
    found = _Enumeration(shape, devices_per_host, global_batch, space)
    devices = num_hosts * devices_per_host
    for tp in _divisors(devices_per_host):
        if found.tensor_parallel(tp):
            for pp in _divisors(devices // tp):
                found.pipeline(tp, pp, devices // (tp * pp))
    return found.configs, found.rejected


class _Enumeration:
    """The formability conditions of the module docstring, degree by degree."""

    def __init__(self, shape: ModelShape, per_host: int, batch: int, space: SearchSpace) -> None:
        self.shape, self.per_host, self.batch, self.space = shape, per_host, batch, space
        self.configs: list[Configuration] = []
        self.rejected: list[Rejected] = []

    def reject(self, what: str, category: str, rule: str, reason: str) -> None:
        self.rejected.append(Rejected(what, category, rule, reason))

    def tensor_parallel(self, tp: int) -> bool:
        for count, name in ((self.shape.heads, "attention"), (self.shape.kv_heads, "key/value")):
            if count is not None and count % tp:
                reason = f"tp={tp} does not divide the {count} {name} heads"
                self.reject(
                    f"tp={tp}", CANNOT_BE_FORMED, f"tp does not divide the {name} heads", reason
                )
                return False
        return True

    def pipeline(self, tp: int, pp: int, dp: int) -> None:
        what, layers = f"tp={tp} pp={pp} dp={dp}", self.shape.layers
        if layers % pp:
            reason = f"pp={pp} does not divide the {layers} layers"
            self.reject(what, CANNOT_BE_FORMED, "pp does not divide the layers", reason)
            return
        group = tp * dp
        if group > self.per_host and group % self.per_host:
            reason = (
                f"a stage's tp·dp = {group} devices are neither inside a host nor whole hosts "
                f"of {self.per_host}"
            )
            self.reject(
                what, CANNOT_BE_FORMED, "a stage is not inside a host or whole hosts", reason
            )
            return
        for m in self.space.micro_batch_sizes:
            if self.batch % (dp * m):
                reason = f"dp·m = {dp * m} does not divide the global batch {self.batch}"
                self.reject(
                    f"{what} m={m}", CANNOT_BE_FORMED, "dp·m does not divide the batch", reason
                )
            else:
                self.options(tp, pp, dp, m)

    def options(self, tp: int, pp: int, dp: int, m: int) -> None:
        what = f"tp={tp} pp={pp} dp={dp} m={m}"
        schedules = self.schedules(what, pp, self.batch // (dp * m))
        for zero in self.space.zero_stages:
            if zero and dp == 1:
                reason = "with dp = 1 there is nothing to shard: the same as ZeRO-0"
                self.reject(f"{what} ZeRO-{zero}", EQUIVALENT, "ZeRO with dp = 1", reason)
                continue
            if zero >= 2 and pp > 1:
                rule = "ZeRO-2/3 with pipeline parallelism"
                self.reject(f"{what} ZeRO-{zero}", CANNOT_BE_FORMED, rule, ZERO_WITH_PIPELINE)
                continue
            for recompute in self.space.recompute:
                if recompute == "selective":
                    what_r = f"{what} ZeRO-{zero} recompute=selective"
                    self.reject(what_r, EQUIVALENT, "selective recomputation", SELECTIVE_AS_NONE)
                    continue
                for schedule, v in schedules:
                    self.configs.append(Configuration(tp, pp, dp, m, zero, recompute, schedule, v))

    def schedules(self, what: str, pp: int, microbatches: int) -> list[tuple[str, int]]:
        if pp == 1:
            return [("1f1b", 1)]
        found = [(s, 1) for s in self.space.schedules if s != "interleaved"]
        if "interleaved" not in self.space.schedules:
            return found
        per_rank = self.shape.layers // pp
        for v in range(2, self.space.max_virtual_stages + 1):
            what_v = f"{what} interleaved v={v}"
            if per_rank % v:
                reason = f"{per_rank} layers per rank do not split into v={v} chunks"
                self.reject(
                    what_v, CANNOT_BE_FORMED, "v does not divide the layers per rank", reason
                )
            elif microbatches % pp:
                reason = f"{microbatches} micro-batches are not a multiple of pp={pp}"
                rule = "interleaving needs micro-batches in multiples of pp"
                self.reject(what_v, CANNOT_BE_FORMED, rule, reason)
            else:
                found.append(("interleaved", v))
        return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MemoryPerDevice:
    """Peak bytes on the fullest device, split as the ZeRO paper counts training state."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Row:
    """A priced configuration (``config``) or the planner's plan (``config is None``)."""

    name: str
    config: Configuration | None
    step_time_s: float
    tokens_per_s: float
    mfu: float
    """Model FLOPs (no recomputation) per second and device over the device's peak."""
    memory: MemoryPerDevice

    def simplicity(self) -> tuple[float, ...]:
        if self.config is None:
            return (float("inf"),)
        return self.config.simplicity()


def recommend(rows: Sequence[Row], tolerance: float = TOLERANCE) -> tuple[Row, str]:
    """The simplest row within ``tolerance`` of the fastest, and why (module docstring)."""
    if not rows:
        raise ValueError("recommend needs at least one priced row")
    best = min(rows, key=lambda r: r.step_time_s)
    near = [r for r in rows if r.step_time_s <= best.step_time_s * (1 + tolerance)]
    pick = min(near, key=lambda r: (r.simplicity(), r.step_time_s))
    others = len(near) - 1
    within = f"{others} other row(s) lie within {tolerance:.0%} of the fastest"
    if pick.config is None:
        return pick, (
            f"the planner's plan: no classic configuration comes within {tolerance:.0%} of it "
            "(run `hap plan` to write it)"
        )
    if pick is best:
        return (
            pick,
            f"the fastest, and no simpler configuration is within {tolerance:.0%} ({within})",
        )
    slower = pick.step_time_s / best.step_time_s - 1
    return pick, (
        f"{slower:.1%} slower than the fastest ({best.name}) but simpler: "
        + "; ".join(_simpler(pick.config, best.config))
        + f" ({within})"
    )


def _simpler(pick: Configuration, best: Configuration | None) -> list[str]:
    """What makes ``pick`` simpler than ``best``, in the order of the rule."""
    if best is None:
        return ["a uniform Megatron-style configuration instead of the planner's stages"]
    reasons = []
    if len(pick.kinds) != len(best.kinds):
        reasons.append(
            f"{len(pick.kinds)} kind(s) of parallelism ({', '.join(pick.kinds) or 'none'}) "
            f"instead of {len(best.kinds)} ({', '.join(best.kinds)})"
        )
    if pick.zero != best.zero:
        reasons.append(f"ZeRO-{pick.zero} instead of ZeRO-{best.zero}")
    if pick.recompute != best.recompute:
        reasons.append(f"recompute={pick.recompute} instead of {best.recompute}")
    if pick.simplicity()[-1] != best.simplicity()[-1]:
        reasons.append(f"schedule {pick.schedule_label} instead of {best.schedule_label}")
    return reasons
