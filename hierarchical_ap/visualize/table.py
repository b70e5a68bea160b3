"""The stage table of a plan as plain data: layers, devices, meshes, memory, placements.

Parameter placements are summarised per *pattern*: numeric path components become ``*`` so
that the 12 parameters of every block of a stage collapse into 12 rows
(``blocks.*.attn.qkv.weight  RS1 × 6``). Placements use Alpa's display form: one letter per
logical mesh axis, ``R`` (replicated) or ``S<d>`` (sharded on tensor dim ``d``), so
``["S(0)", "R"]`` reads ``S0R``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hierarchical_ap.plan import MemoryBreakdown, ParallelPlan


@dataclass(frozen=True)
class PlacementGroup:
    """``count`` parameters whose names match ``pattern`` stored as ``placement``."""

    pattern: str
    placement: str
    count: int


@dataclass(frozen=True)
class StageRow:
    """One pipeline stage as the tables show it."""

    stage: int
    rank: int
    """The device group the stage runs on (``stage % num_ranks``)."""
    layers: str
    devices: str
    hosts: str
    submesh: str
    mesh: str
    recompute: str
    time_per_microbatch_s: float
    memory: MemoryBreakdown
    placements: tuple[PlacementGroup, ...]

    @property
    def placement_counts(self) -> str:
        """How many parameters each placement stores, e.g. ``"RS1 ×24, S0R ×12"``."""
        counts: Counter[str] = Counter()
        for group in self.placements:
            counts[group.placement] += group.count
        return ", ".join(f"{p} ×{n}" for p, n in counts.most_common()) or "—"


def stage_rows(plan: ParallelPlan) -> list[StageRow]:
    """One row per stage of ``plan``, in pipeline order."""
    rows = []
    for index, stage in enumerate(plan.stages):
        first, last = stage.layers
        names = plan.layers[first].name
        if last != first:
            names += f" … {plan.layers[last].name}"
        rows.append(
            StageRow(
                stage=index,
                rank=index % plan.num_ranks,
                layers=names,
                devices=compact_ranges(stage.devices),
                hosts=compact_ranges(stage.hosts),
                submesh="x".join(map(str, stage.submesh)),
                mesh="x".join(map(str, stage.logical_mesh)),
                recompute=stage.recompute,
                time_per_microbatch_s=stage.time_per_microbatch_s,
                memory=stage.memory,
                placements=placement_groups(stage.param_placements),
            )
        )
    return rows


def placement_groups(param_placements: Mapping[str, Sequence[str]]) -> tuple[PlacementGroup, ...]:
    """Parameters grouped by name pattern and placement, in order of first appearance."""
    counts: Counter[tuple[str, str]] = Counter()
    for fqn, placement in param_placements.items():
        counts[(name_pattern(fqn), display_placement(placement))] += 1
    return tuple(PlacementGroup(pattern, p, n) for (pattern, p), n in counts.items())


def name_pattern(fqn: str) -> str:
    """``blocks.17.attn.qkv.weight`` → ``blocks.*.attn.qkv.weight``."""
    return ".".join("*" if part.isdigit() else part for part in fqn.split("."))


def display_placement(placement: Sequence[str]) -> str:
    """``["S(0)", "R"]`` → ``"S0R"`` (Alpa's notation)."""
    return "".join(p.replace("(", "").replace(")", "") for p in placement)


def compact_ranges(values: Iterable[int]) -> str:
    """Sorted integers as runs: ``[0, 1, 2, 3, 8, 9]`` → ``"0-3, 8-9"``."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
