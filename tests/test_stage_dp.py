"""The inter-op DP (Numba and plain Python) against brute force on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stage_partitioner.dp import solve, solve_reference


def random_instance(rng: np.random.Generator, layers: int):
    submesh_devices = np.array([1, 2, 4])
    num_devices = int(rng.choice([2, 4, 6]))
    per_layer = rng.uniform(1.0, 3.0, size=layers)
    stage_time = np.full((layers, layers, len(submesh_devices)), np.inf)
    max_succ = np.zeros(stage_time.shape, dtype=np.int64)
    for k in range(layers):
        for j in range(k, layers):
            work = per_layer[k : j + 1].sum()
            for m, n in enumerate(submesh_devices):
                if rng.random() < 0.1:
                    continue  # does not fit at all
                stage_time[k, j, m] = work / n * rng.uniform(1.0, 1.3)
                max_succ[k, j, m] = rng.integers(0, layers)
    return stage_time, max_succ, submesh_devices, num_devices


def brute_force(stage_time, max_succ, submesh_devices, num_devices, num_microbatches) -> float:
    layers = stage_time.shape[0]
    best = np.inf
    for cuts in itertools.product([False, True], repeat=layers - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [layers]
        spans = [(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)]
        for meshes in itertools.product(range(len(submesh_devices)), repeat=len(spans)):
            if sum(submesh_devices[m] for m in meshes) != num_devices:
                continue
            times = []
            for position, ((k, j), m) in enumerate(zip(spans, meshes, strict=True)):
                successors = len(spans) - position - 1
                if successors > max_succ[k, j, m]:
                    break
                times.append(stage_time[k, j, m])
            else:
                best = min(best, sum(times) + (num_microbatches - 1) * max(times))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_numba_and_python_dp_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    instance = random_instance(rng, layers=int(rng.integers(2, 6)))
    microbatches = int(rng.integers(1, 9))
    expected = brute_force(*instance, microbatches)
    fast = solve(*instance, microbatches)
    reference = solve_reference(*instance, microbatches)
    if not np.isfinite(expected):
        assert fast is None and reference is None
        return
    assert fast == reference
    assert fast.step_time == pytest.approx(expected)
    stage_time, max_succ, submesh_devices, num_devices = instance
    assert sum(submesh_devices[m] for _, _, m in fast.stages) == num_devices
    assert [k for k, _, _ in fast.stages] == [0] + [j + 1 for _, j, _ in fast.stages[:-1]]
    assert fast.stages[-1][1] == stage_time.shape[0] - 1


def test_pipeline_beats_one_stage_when_micro_batches_overlap():
    # Two layers, two devices. One stage on both devices: 1.2 per micro-batch, 8 × 1.2 = 9.6.
    # Two one-layer stages on one device each: 1.0 + 1.0 + 7 × 1.0 = 9.0, the better plan.
    stage_time = np.full((2, 2, 2), np.inf)
    stage_time[0, 0, 0] = stage_time[1, 1, 0] = 1.0  # one layer on one device
    stage_time[0, 1, 1] = 1.2  # both layers on two devices (imperfect scaling)
    max_succ = np.full(stage_time.shape, 4, dtype=np.int64)
    plan = solve(stage_time, max_succ, np.array([1, 2]), 2, num_microbatches=8)
    assert plan.stages == ((0, 0, 0), (1, 1, 0))
    assert plan.step_time == pytest.approx(2.0 + 7 * 1.0)
