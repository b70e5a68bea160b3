"""The measured timeline of a worker's last training step.

Every worker times each instruction of its list (``runtime.instructions``) and the phases that
close the step, on its own ``time.perf_counter`` clock, relative to the moment its
``train_step`` began:

* one ``TimedOp`` per instruction (``forward``, ``backward``, ``recv_*`` — the wait for a
  receive posted earlier —, ``send_*`` — posting —, ``free``);
* ``WAIT_SENDS``: waiting for the step's posted sends to complete;
* ``SYNC_SHARED``: summing the gradients of parameters several stages read;
* ``CLIP_GRADIENTS``: clipping by the global gradient norm (about nothing when not asked for);
* ``OPTIMIZER``: the optimizer step on the worker's shards (and the learning-rate schedule's).

The closing phases carry ``stage = microbatch = -1``. Clocks of different workers are not
aligned (each starts at its own call), so a trace compares durations, not instants, across
workers. ``stage_compute_means`` reduces traces to what ``stage_partitioner.simulator``
predicts per stage: the mean forward and backward time of one micro-batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hierarchical_ap.schedules import BACKWARD, FORWARD

WAIT_SENDS = "wait_sends"
SYNC_SHARED = "sync_shared_gradients"
CLIP_GRADIENTS = "clip_gradients"
OPTIMIZER = "optimizer_step"
CLOSING_PHASES = (WAIT_SENDS, SYNC_SHARED, CLIP_GRADIENTS, OPTIMIZER)


@dataclass(frozen=True, slots=True)
class TimedOp:
    """One instruction or closing phase of a step, in seconds since the step began."""

    op: str
    stage: int
    microbatch: int
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class StageTimes:
    """Mean seconds of one micro-batch's forward and backward on a stage, and the mean
    optimizer step of the workers holding it."""

    forward_s: float
    backward_s: float
    optimizer_s: float


def stage_compute_means(traces: Sequence[Iterable[TimedOp]]) -> dict[int, StageTimes]:
    """Per stage, the mean forward and backward duration over its micro-batches and workers,
    and the mean ``OPTIMIZER`` phase of those workers (a worker holding several virtual stages
    counts its optimizer step for each)."""
    forward: dict[int, list[float]] = {}
    backward: dict[int, list[float]] = {}
    optimizer: dict[int, list[float]] = {}
    for trace in traces:
        ops = list(trace)
        held = {t.stage for t in ops if t.op == FORWARD}
        for timed in ops:
            if timed.op == FORWARD:
                forward.setdefault(timed.stage, []).append(timed.duration_s)
            elif timed.op == BACKWARD:
                backward.setdefault(timed.stage, []).append(timed.duration_s)
            elif timed.op == OPTIMIZER:
                for stage in held:
                    optimizer.setdefault(stage, []).append(timed.duration_s)
    return {
        stage: StageTimes(
            forward_s=statistics.fmean(forward[stage]),
            backward_s=statistics.fmean(backward.get(stage, [0.0])),
            optimizer_s=statistics.fmean(optimizer.get(stage, [0.0])),
        )
        for stage in sorted(forward)
    }
