"""The inter-operator dynamic program (Alpa, OSDI'22, §5.2, Eq. 2–4), over plain arrays.

Layers ``0..L-1`` are cut into contiguous stages; stage ``i`` runs on a submesh of ``n_i``
devices and takes ``t_i`` per micro-batch (forward + backward). With ``B`` micro-batches a
synchronous pipeline (GPipe or 1F1B) takes

    T = Σ_i t_i + (B − 1) · max_i t_i                                          (Eq. 2)

and the submeshes must use the cluster's ``D`` devices exactly. For a fixed bound ``t_max`` on
the slowest stage, ``F(s, k, d)`` is the least ``Σ t_i`` of cutting layers ``k..L-1`` into
``s`` stages on ``d`` devices:

    F(0, L, 0) = 0
    F(s, k, d) = min over k ≤ j < L and submesh m with n_m ≤ d,
                 t[k, j, m] ≤ t_max and s − 1 ≤ max_succ[k, j, m] of
                 t[k, j, m] + F(s − 1, j + 1, d − n_m)                         (Eq. 3)

    T*(t_max) = min_s F(s, 0, D) + (B − 1) · t_max                             (Eq. 4)

``t[k, j, m]`` is the stage time of layers ``k..j`` on submesh choice ``m`` (``inf`` where it
does not fit at all) and ``max_succ[k, j, m]`` the most stages that may follow it before the
activations of the micro-batches in flight overflow its memory (1F1B keeps ``s`` micro-batches
alive on a stage with ``s − 1`` stages after it). ``t_max`` runs over the distinct stage times
in increasing order and stops once ``B · t_max`` cannot beat the best plan found (Alpa's
pruning); candidates closer than ``epsilon`` to the previous one are skipped.

``solve_reference`` is the same recurrence in plain Python, kept to test the Numba kernel.
With ``relative_epsilon`` the candidates closer than that fraction of the previous one are
skipped too, which bounds the loss by ``B · relative_epsilon · t_max`` and keeps the number of
kernel runs small when the table has many distinct stage times. ``num_stages`` fixes the
number of stages (``hap plan --pp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

INFINITY = np.inf


@dataclass(frozen=True)
class StagePlan:
    """The DP's answer: stages as (first layer, last layer, submesh choice), and the step time."""

    stages: tuple[tuple[int, int, int], ...]
    step_time: float
    max_stage_time: float


@njit(cache=True)
def _stage_dp_kernel(
    stage_time, max_succ, submesh_devices, num_devices, t_max
):  # pragma: no cover - compiled
    """F(s, k, d) for every s, k, d under ``t_max`` (Eq. 3), with the argmin for backtracking."""
    num_layers = stage_time.shape[0]
    num_submeshes = submesh_devices.shape[0]
    f = np.full((num_layers + 1, num_layers + 1, num_devices + 1), np.inf)
    choice_end = np.full((num_layers + 1, num_layers + 1, num_devices + 1), -1, np.int64)
    choice_mesh = np.full((num_layers + 1, num_layers + 1, num_devices + 1), -1, np.int64)
    f[0, num_layers, 0] = 0.0
    for s in range(1, num_layers + 1):
        for k in range(num_layers - 1, -1, -1):
            for d in range(1, num_devices + 1):
                best = np.inf
                for j in range(k, num_layers):
                    for m in range(num_submeshes):
                        n = submesh_devices[m]
                        if n > d:
                            continue
                        t = stage_time[k, j, m]
                        if t > t_max or s - 1 > max_succ[k, j, m]:
                            continue
                        rest = f[s - 1, j + 1, d - n]
                        if t + rest < best:
                            best = t + rest
                            choice_end[s, k, d] = j
                            choice_mesh[s, k, d] = m
                f[s, k, d] = best
    return f, choice_end, choice_mesh


def solve(
    stage_time: np.ndarray,
    max_succ: np.ndarray,
    submesh_devices: np.ndarray,
    num_devices: int,
    num_microbatches: int,
    *,
    epsilon: float = 1e-9,
    relative_epsilon: float = 0.0,
    num_stages: int | None = None,
) -> StagePlan | None:
    """Minimise Eq. 2 with the Numba kernel; ``None`` when no slicing fits."""
    return _search(
        stage_time,
        max_succ,
        submesh_devices,
        num_devices,
        num_microbatches,
        epsilon,
        _stage_dp_kernel,
        relative_epsilon,
        num_stages,
    )


def solve_reference(
    stage_time: np.ndarray,
    max_succ: np.ndarray,
    submesh_devices: np.ndarray,
    num_devices: int,
    num_microbatches: int,
    *,
    epsilon: float = 1e-9,
    relative_epsilon: float = 0.0,
    num_stages: int | None = None,
) -> StagePlan | None:
    """The same search with the recurrence in plain Python (for tests)."""
    return _search(
        stage_time,
        max_succ,
        submesh_devices,
        num_devices,
        num_microbatches,
        epsilon,
        _stage_dp_python,
        relative_epsilon,
        num_stages,
    )


def _search(
    stage_time,
    max_succ,
    submesh_devices,
    num_devices,
    num_microbatches,
    epsilon,
    kernel,
    relative_epsilon=0.0,
    num_stages=None,
):
    stage_time = np.asarray(stage_time, dtype=np.float64)
    max_succ = np.asarray(max_succ, dtype=np.int64)
    submesh_devices = np.asarray(submesh_devices, dtype=np.int64)
    finite = np.unique(stage_time[np.isfinite(stage_time)])
    best: StagePlan | None = None
    previous = -np.inf
    for t_max in finite:
        if best is not None and num_microbatches * t_max >= best.step_time:
            break
        if t_max - previous < max(epsilon, relative_epsilon * previous):
            continue
        previous = t_max
        f, ends, meshes = kernel(stage_time, max_succ, submesh_devices, num_devices, float(t_max))
        column = f[:, 0, num_devices]
        s = int(np.argmin(column)) if num_stages is None else num_stages
        if s >= len(column):
            return None
        if not np.isfinite(column[s]):
            continue
        stages = _backtrack(ends, meshes, s, num_devices, submesh_devices)
        slowest = max(stage_time[k, j, m] for k, j, m in stages)
        step = float(column[s]) + (num_microbatches - 1) * float(slowest)
        if best is None or step < best.step_time:
            best = StagePlan(stages, step, float(slowest))
    return best


def _backtrack(ends, meshes, s, d, submesh_devices) -> tuple[tuple[int, int, int], ...]:
    stages = []
    k = 0
    while s > 0:
        j, m = int(ends[s, k, d]), int(meshes[s, k, d])
        stages.append((k, j, m))
        d -= int(submesh_devices[m])
        k, s = j + 1, s - 1
    return tuple(stages)


def _stage_dp_python(stage_time, max_succ, submesh_devices, num_devices, t_max):
    """Eq. 3 written out in Python; identical to the Numba kernel."""
    num_layers = stage_time.shape[0]
    shape = (num_layers + 1, num_layers + 1, num_devices + 1)
    f = np.full(shape, np.inf)
    ends = np.full(shape, -1, np.int64)
    meshes = np.full(shape, -1, np.int64)
    f[0, num_layers, 0] = 0.0
    for s in range(1, num_layers + 1):
        for k in range(num_layers - 1, -1, -1):
            for d in range(1, num_devices + 1):
                for j in range(k, num_layers):
                    for m, n in enumerate(submesh_devices):
                        t = stage_time[k, j, m]
                        if n > d or t > t_max or s - 1 > max_succ[k, j, m]:
                            continue
                        if t + f[s - 1, j + 1, d - n] < f[s, k, d]:
                            f[s, k, d] = t + f[s - 1, j + 1, d - n]
                            ends[s, k, d], meshes[s, k, d] = j, m
    return f, ends, meshes
