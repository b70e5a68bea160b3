"""From a stage cost table to the DP's arrays, and back to stages.

The DP (``stage_partitioner.dp``) wants, per layer range ``k..j`` and submesh choice ``m``,
one stage time and the most stages that may follow it (``max_succ``). A table has several
options per submesh (logical meshes, memory levels of the shardings, recomputation), whose time and
memory trade off. Which option is best depends on how many stages follow (memory of the
micro-batches in flight), so each submesh keeps its *Pareto front*: options sorted by time,
each kept only if it allows more following stages than every faster one. The DP's choice axis
is ``(submesh, rank on the front)``.

Memory of a stage with ``s`` stages from it to the last (itself included) under 1F1B, which
keeps ``min(s, B)`` micro-batches in flight on it:

    state + min(s, B) · act + extra ≤ budget
    ⇔ s − 1 ≤ max_succ = ⌊(budget − state − extra) / act⌋ − 1        (∞ once min(s, B) = B)

GPipe keeps all ``B`` micro-batches: ``max_succ = ∞`` if ``state + B·act + extra ≤ budget``,
else the stage cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stage_partitioner.stage_costs import StageCostTable

UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class DpArrays:
    """The DP's inputs and the option behind every choice."""

    stage_time: np.ndarray
    """[L, L, C] seconds per micro-batch (``inf``: not allowed)."""
    max_succ: np.ndarray
    """[L, L, C] the most stages that may follow."""
    choice_devices: np.ndarray
    """[C] devices of each choice, in DP device units."""
    option_index: np.ndarray
    """[L, L, C] index into ``table.options`` (−1 for padding)."""


def max_successors(
    state: np.ndarray,
    activation: np.ndarray,
    extra: np.ndarray,
    budget: float,
    num_microbatches: int,
    schedule: str = "1f1b",
) -> np.ndarray:
    """``max_succ`` per entry (see the module docstring); −1 where nothing fits."""
    free = budget - state - extra
    with np.errstate(divide="ignore", invalid="ignore"):
        if schedule == "gpipe":
            fits = free >= num_microbatches * activation
            return np.where(fits, UNBOUNDED, -1).astype(np.int64)
        in_flight = np.where(activation > 0, np.floor(free / activation), UNBOUNDED)
    in_flight = np.where(np.isfinite(free) & (free >= 0), in_flight, -1)
    in_flight = np.minimum(in_flight, UNBOUNDED)
    result = np.where(in_flight >= num_microbatches, UNBOUNDED, in_flight - 1)
    return np.where(in_flight < 1, -1, result).astype(np.int64)


def dp_arrays(
    table: StageCostTable,
    budget: float,
    num_microbatches: int,
    device_unit: int,
    schedule: str = "1f1b",
) -> DpArrays:
    """Pareto-reduced DP arrays of ``table`` (see the module docstring)."""
    time = table.range_sum(table.time)
    state = table.range_state()
    activation = table.range_sum(table.activation)
    extra = table.range_max(table.peak_extra)
    succ = max_successors(state, activation, extra, budget, num_microbatches, schedule)
    time = np.where(succ < 0, np.inf, time)

    submeshes = sorted({o.mesh.submesh for o in table.options})
    groups = [[q for q, o in enumerate(table.options) if o.mesh.submesh == s] for s in submeshes]
    fronts = [_pareto_front(time[:, :, g], succ[:, :, g]) for g in groups]
    width = max(f.shape[2] for f in fronts)
    num_layers = time.shape[0]
    shape = (num_layers, num_layers, len(submeshes) * width)
    out_time = np.full(shape, np.inf)
    out_succ = np.full(shape, -1, dtype=np.int64)
    out_option = np.full(shape, -1, dtype=np.int64)
    devices = np.zeros(len(submeshes) * width, dtype=np.int64)
    for index, (submesh, group, front) in enumerate(zip(submeshes, groups, fronts, strict=True)):
        columns = slice(index * width, index * width + front.shape[2])
        local = front
        option = np.where(local >= 0, np.asarray(group)[np.maximum(local, 0)], -1)
        picked_time = np.take_along_axis(time, np.maximum(option, 0), axis=2)
        picked_succ = np.take_along_axis(succ, np.maximum(option, 0), axis=2)
        out_time[:, :, columns] = np.where(option >= 0, picked_time, np.inf)
        out_succ[:, :, columns] = np.where(option >= 0, picked_succ, -1)
        out_option[:, :, columns] = option
        devices[index * width : (index + 1) * width] = submesh[0] * submesh[1] // device_unit
    return DpArrays(out_time, out_succ, devices, out_option)


def _pareto_front(time: np.ndarray, succ: np.ndarray) -> np.ndarray:
    """[L, L, F] local option indices of each range's front, fastest first (−1 padding)."""
    order = np.argsort(time, axis=2, kind="stable")
    sorted_time = np.take_along_axis(time, order, axis=2)
    sorted_succ = np.take_along_axis(succ, order, axis=2)
    best_before = np.maximum.accumulate(sorted_succ, axis=2)
    best_before = np.concatenate(
        [np.full(best_before.shape[:2] + (1,), -2), best_before[:, :, :-1]], axis=2
    )
    keep = (sorted_succ > best_before) & np.isfinite(sorted_time)
    width = max(1, int(keep.sum(axis=2).max()))
    front = np.full(time.shape[:2] + (width,), -1, dtype=np.int64)
    slot = np.cumsum(keep, axis=2) - 1
    k_index, j_index, position = np.nonzero(keep)
    front[k_index, j_index, slot[k_index, j_index, position]] = order[k_index, j_index, position]
    return front
