"""``stage_compute_means`` on hand-written traces."""

from __future__ import annotations

import pytest

from runtime.step_trace import (
    OPTIMIZER,
    SYNC_SHARED,
    WAIT_SENDS,
    StageTimes,
    TimedOp,
    stage_compute_means,
)


def _trace(stage: int, forwards, backwards, optimizer: float) -> list[TimedOp]:
    ops, clock = [], 0.0
    for mb, (f, b) in enumerate(zip(forwards, backwards, strict=True)):
        ops.append(TimedOp("recv_activation", stage, mb, clock, clock + 0.5))
        clock += 0.5
        ops.append(TimedOp("forward", stage, mb, clock, clock + f))
        clock += f
        ops.append(TimedOp("backward", stage, mb, clock, clock + b))
        clock += b
    for phase, seconds in ((WAIT_SENDS, 0.1), (SYNC_SHARED, 0.0), (OPTIMIZER, optimizer)):
        ops.append(TimedOp(phase, -1, -1, clock, clock + seconds))
        clock += seconds
    return ops


def test_means_over_micro_batches_and_the_workers_of_a_stage():
    traces = [
        _trace(0, [1.0, 3.0], [2.0, 4.0], 0.5),
        _trace(0, [2.0, 2.0], [3.0, 3.0], 1.5),  # a second worker of stage 0
        _trace(1, [4.0, 4.0], [8.0, 6.0], 2.0),
    ]
    means = stage_compute_means(traces)
    assert means == {
        0: StageTimes(forward_s=2.0, backward_s=3.0, optimizer_s=1.0),
        1: StageTimes(forward_s=4.0, backward_s=7.0, optimizer_s=2.0),
    }
    # receives and the closing waits are not compute
    assert means[0].forward_s == pytest.approx((1 + 3 + 2 + 2) / 4)
