"""Pipeline schedules as data: GPipe, 1F1B and interleaved 1F1B, their timelines and memory.

Layout. A pipeline has `p = num_ranks` ranks (device groups) and `m = num_microbatches`
micro-batches. With `v = virtual_stages` model chunks per rank the model is cut into `p * v`
stages; rank `r` holds stages `r, r + p, r + 2p, ...` (Megatron-LM's interleaved layout), so stage
`s` lives on rank `s % p` and is that rank's chunk `s // p`. For `v = 1` the stage index is the
rank.

A schedule is one list of `Task`s per rank, in execution order. Every `(microbatch, stage)` pair
has one forward and one backward task. The schedules:

* `gpipe`: all `m` forwards, then all `m` backwards, both in micro-batch order `0..m-1` (as
  `torch.distributed.pipelining.ScheduleGPipe`).
* `1f1b` (PipeDream-Flush): rank `r` runs `w = min(p - r - 1, m)` warm-up forwards, then
  alternates one forward and one backward, then the `w` remaining backwards.
* `interleaved` (Megatron-LM interleaved 1F1B, Narayanan et al. SC21 §2.2): the same warm-up /
  steady / cool-down shape over the rank's `m * v` chunk-micro-batches, with
  `w = min(2 (p - r - 1) + (v - 1) p, m v)` warm-up forwards. A rank visits its chunks in groups
  of `p` micro-batches: forward number `k` is chunk `(k mod pv) // p` on micro-batch
  `(k // pv) p + k mod p`; backward number `k` is the same with the chunk order reversed. It needs
  `m % p == 0`; with `v = 1` it is plain 1F1B.

Idealised bubble (equal stage times, free communication; SC21 eqs. 1 and 2): the idle time over
the ideal time is `(p - 1) / m` for GPipe and 1F1B and `(p - 1) / (v m)` for interleaved 1F1B.
With per-stage forward and backward times `t_f`, `t_b` the simulator reproduces it exactly: GPipe
and 1F1B take `(m + p - 1)(t_f + t_b)`, interleaved 1F1B with per-chunk times `t_f / v`,
`t_b / v` takes `(m + (p - 1) / v)(t_f + t_b)` (the tests check a grid of `p, m, v`).

Activations in flight (micro-batch-chunks whose forward ran and whose backward has not): GPipe
holds `m` on every rank, 1F1B holds `min(p - r, m)` on rank `r`, interleaved 1F1B holds
`min(w + 1, m v)`, i.e. `min(2 (p - 1) + (v - 1) p + 1, m v)` chunk activations on rank 0, each
`1 / v` of a stage's.

`simulate` turns a schedule and per-stage times into a `Timeline`: every rank runs its list
strictly in order; a forward waits for the previous stage's forward plus the send time, a backward
for its own forward and the next stage's backward plus the send time. Sends never block the
sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

FORWARD = "forward"
BACKWARD = "backward"
SCHEDULES = ("gpipe", "1f1b", "interleaved")

_Key = tuple[bool, int, int]  # (is backward, micro-batch, stage)


class Task(NamedTuple):
    """One forward or backward pass of one micro-batch through one (virtual) stage.

    A named tuple rather than a frozen dataclass: schedules of large pipelines hold hundreds
    of thousands of tasks, and a tuple is several times cheaper to create."""

    kind: str
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}(mb={self.microbatch}, stage={self.stage})"


class TimedTask(NamedTuple):
    """A task placed on the timeline of a rank: it runs in `[start, end)`."""

    rank: int
    task: Task
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Timeline:
    """The simulated run of a schedule: all timed tasks, rank by rank in execution order."""

    tasks: tuple[TimedTask, ...]
    makespan: float

    def per_rank(self) -> list[list[TimedTask]]:
        """The timed tasks of each rank, in execution order."""
        ranks: list[list[TimedTask]] = [
            [] for _ in range(1 + max((t.rank for t in self.tasks), default=-1))
        ]
        for timed in self.tasks:
            ranks[timed.rank].append(timed)
        return ranks

    def busy_time(self, rank: int) -> float:
        """Seconds `rank` spends computing (the makespan minus its idle time)."""
        return sum(t.end - t.start for t in self.tasks if t.rank == rank)


# ----------------------------------------------------------------------------------- schedules


def gpipe(num_ranks: int, num_microbatches: int) -> list[list[Task]]:
    """GPipe: every rank runs all forwards, then all backwards, both in order 0..m-1."""
    _check_counts(num_ranks, num_microbatches, 1)
    m = num_microbatches
    return [
        [Task(FORWARD, i, r) for i in range(m)] + [Task(BACKWARD, i, r) for i in range(m)]
        for r in range(num_ranks)
    ]


def one_f_one_b(num_ranks: int, num_microbatches: int) -> list[list[Task]]:
    """PipeDream-Flush 1F1B: `min(p - r - 1, m)` warm-up forwards, 1F1B, cool-down backwards."""
    _check_counts(num_ranks, num_microbatches, 1)
    m = num_microbatches
    return [
        _warmup_steady_cooldown(
            [Task(FORWARD, i, r) for i in range(m)],
            [Task(BACKWARD, i, r) for i in range(m)],
            min(num_ranks - r - 1, m),
        )
        for r in range(num_ranks)
    ]


def interleaved_one_f_one_b(
    num_ranks: int, num_microbatches: int, virtual_stages: int
) -> list[list[Task]]:
    """Megatron-LM interleaved 1F1B over `virtual_stages` chunks per rank (1F1B when it is 1).

    Raises ValueError unless `num_microbatches` is a multiple of `num_ranks` (for `v > 1`).
    """
    _check_counts(num_ranks, num_microbatches, virtual_stages)
    if virtual_stages == 1:
        return one_f_one_b(num_ranks, num_microbatches)
    _check_divisible(num_ranks, num_microbatches)
    return [
        _interleaved_rank(r, num_ranks, num_microbatches, virtual_stages) for r in range(num_ranks)
    ]


def forward_only(
    num_ranks: int, num_microbatches: int, virtual_stages: int = 1
) -> list[list[Task]]:
    """Evaluation: rank r runs the forwards of its chunks (stages ``r + c·p``), chunk by
    chunk, each over micro-batches 0..m-1, and no backward; a chunk's forwards follow those of
    the chunk before on every rank, so the activations they wait for are already sent."""
    _check_counts(num_ranks, num_microbatches, virtual_stages)
    return [
        [
            Task(FORWARD, i, r + c * num_ranks)
            for c in range(virtual_stages)
            for i in range(num_microbatches)
        ]
        for r in range(num_ranks)
    ]


def build_schedule(
    name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1
) -> list[list[Task]]:
    """The schedule `name` (one of `SCHEDULES`), one task list per rank."""
    _check_schedule_args(name, num_ranks, num_microbatches, virtual_stages)
    if name == "gpipe":
        return gpipe(num_ranks, num_microbatches)
    if name == "1f1b":
        return one_f_one_b(num_ranks, num_microbatches)
    return interleaved_one_f_one_b(num_ranks, num_microbatches, virtual_stages)


def bubble_fraction(
    name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1
) -> float:
    """The idealised bubble over ideal time (SC21): `(p-1)/m`, interleaved `(p-1)/(v m)`.

    It assumes equal stage times and free communication; `simulate` gives the real timeline.
    """
    _check_schedule_args(name, num_ranks, num_microbatches, virtual_stages)
    return (num_ranks - 1) / (virtual_stages * num_microbatches)


def _interleaved_rank(rank: int, p: int, m: int, v: int) -> list[Task]:
    total = m * v
    forwards = [
        Task(FORWARD, _chunk_microbatch(k, p, v), _chunk(k, p, v) * p + rank) for k in range(total)
    ]
    backwards = [
        Task(BACKWARD, _chunk_microbatch(k, p, v), (v - 1 - _chunk(k, p, v)) * p + rank)
        for k in range(total)
    ]
    return _warmup_steady_cooldown(
        forwards, backwards, min(2 * (p - rank - 1) + (v - 1) * p, total)
    )


def _chunk(k: int, p: int, v: int) -> int:
    """The chunk of a rank's `k`-th forward (Megatron's `get_model_chunk_id`)."""
    return (k % (p * v)) // p


def _chunk_microbatch(k: int, p: int, v: int) -> int:
    """The micro-batch of a rank's `k`-th forward (or backward) pass."""
    return (k // (p * v)) * p + k % p


def _warmup_steady_cooldown(forwards: list[Task], backwards: list[Task], warmup: int) -> list[Task]:
    """`warmup` forwards, then forward / backward pairs, then the remaining backwards."""
    steady = len(forwards) - warmup
    order = forwards[:warmup]
    for f, b in zip(forwards[warmup:], backwards[:steady], strict=True):
        order += (f, b)
    return order + backwards[steady:]


def _check_counts(num_ranks: int, num_microbatches: int, virtual_stages: int) -> None:
    for name, value in (
        ("num_ranks", num_ranks),
        ("num_microbatches", num_microbatches),
        ("virtual_stages", virtual_stages),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_schedule_args(
    name: str, num_ranks: int, num_microbatches: int, virtual_stages: int
) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    _check_counts(num_ranks, num_microbatches, virtual_stages)
    if name != "interleaved" and virtual_stages != 1:
        raise ValueError(
            f"schedule {name!r} runs one stage per rank, got virtual_stages={virtual_stages}: "
            "use virtual_stages=1 or the 'interleaved' schedule"
        )
    if name == "interleaved" and virtual_stages > 1:
        _check_divisible(num_ranks, num_microbatches)


def _check_divisible(num_ranks: int, num_microbatches: int) -> None:
    if num_microbatches % num_ranks:
        raise ValueError(
            f"interleaved 1F1B needs num_microbatches to be a multiple of num_ranks, got "
            f"{num_microbatches} micro-batches on {num_ranks} ranks: use a multiple of "
            f"{num_ranks} micro-batches, or virtual_stages=1"
        )


# ---------------------------------------------------------------------------------- validation


def validate_schedule(
    tasks_per_rank: Sequence[Sequence[Task]],
    num_ranks: int,
    num_microbatches: int,
    virtual_stages: int = 1,
) -> None:
    """Raise ValueError unless every (kind, micro-batch, stage) runs exactly once on its rank.

    Also checks that on each rank the backward of a (micro-batch, stage) follows its forward.
    Dependencies across ranks are `simulate`'s business: a bad order deadlocks there.
    """
    _check_counts(num_ranks, num_microbatches, virtual_stages)
    if len(tasks_per_rank) != num_ranks:
        raise ValueError(f"schedule has {len(tasks_per_rank)} ranks, expected {num_ranks}")
    num_stages = num_ranks * virtual_stages
    seen: set[_Key] = set()
    for rank, tasks in enumerate(tasks_per_rank):
        for task in tasks:
            _check_task(task, rank, num_ranks, num_microbatches, num_stages)
            key = _key(task)
            if key in seen:
                raise ValueError(f"rank {rank} runs {task} twice")
            if key[0] and (False, key[1], key[2]) not in seen:
                raise ValueError(f"rank {rank} runs {task} before its forward")
            seen.add(key)
    expected = 2 * num_microbatches * num_stages
    if len(seen) != expected:
        missing = next(
            Task(BACKWARD if backward else FORWARD, mb, s)
            for backward in (False, True)
            for mb in range(num_microbatches)
            for s in range(num_stages)
            if (backward, mb, s) not in seen
        )
        raise ValueError(f"schedule misses {expected - len(seen)} tasks, e.g. {missing}")


def _check_task(
    task: Task, rank: int, num_ranks: int, num_microbatches: int, num_stages: int
) -> None:
    if task.kind not in (FORWARD, BACKWARD):
        raise ValueError(f"task kind must be {FORWARD!r} or {BACKWARD!r}, got {task.kind!r}")
    if not 0 <= task.microbatch < num_microbatches:
        raise ValueError(
            f"{task} on rank {rank}: micro-batch out of range 0..{num_microbatches - 1}"
        )
    if not 0 <= task.stage < num_stages:
        raise ValueError(f"{task} on rank {rank}: stage out of range 0..{num_stages - 1}")
    if task.stage % num_ranks != rank:
        raise ValueError(
            f"{task} is on rank {rank}, but stage {task.stage} lives on rank {task.stage % num_ranks}"
        )


def _key(task: Task) -> _Key:
    return (task.kind == BACKWARD, task.microbatch, task.stage)


# ------------------------------------------------------------------------------------ timeline


def simulate(
    tasks_per_rank: Sequence[Sequence[Task]],
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    *,
    send_time: Sequence[float] | None = None,
    virtual_stages: int = 1,
) -> Timeline:
    """The timeline of a schedule with per-stage, per-micro-batch times in seconds.

    `forward_time[s]` and `backward_time[s]` are given for each of the `len(tasks_per_rank) *
    virtual_stages` stages; `send_time[s]` moves stage `s`'s activation to stage `s + 1` and the
    gradient back (length `num_stages - 1`, or `num_stages` with the last entry unused; default
    zeros). Each rank runs its list in order, a task starting once the rank is free and its
    inputs have arrived. Check the schedule with `validate_schedule` first; a schedule whose
    orders wait on each other in a cycle raises RuntimeError naming the stuck tasks.
    """
    if not tasks_per_rank:
        raise ValueError("schedule has no ranks: pass one task list per pipeline rank")
    _check_counts(len(tasks_per_rank), 1, virtual_stages)
    num_stages = len(tasks_per_rank) * virtual_stages
    fwd, bwd, send = _durations(forward_time, backward_time, send_time, num_stages)
    ends: dict[_Key, float] = {}
    waiting: dict[_Key, list[int]] = {}
    pointer = [0] * len(tasks_per_rank)
    free = [0.0] * len(tasks_per_rank)
    timed: list[list[TimedTask]] = [[] for _ in tasks_per_rank]
    runnable = list(range(len(tasks_per_rank)))
    while runnable:
        rank = runnable.pop()
        tasks = tasks_per_rank[rank]
        while pointer[rank] < len(tasks):
            task = tasks[pointer[rank]]
            start = free[rank]
            blocked = None
            for dep, delay in _dependencies(task, send, num_stages):
                if dep not in ends:
                    blocked = dep
                    break
                start = max(start, ends[dep] + delay)
            if blocked is not None:
                waiting.setdefault(blocked, []).append(rank)
                break
            end = start + (bwd if task.kind == BACKWARD else fwd)[task.stage]
            key = _key(task)
            ends[key] = end
            free[rank] = end
            timed[rank].append(TimedTask(rank, task, start, end))
            pointer[rank] += 1
            runnable.extend(waiting.pop(key, ()))
    _raise_if_stuck(tasks_per_rank, pointer, ends, send, num_stages)
    return Timeline(tuple(t for rank in timed for t in rank), max(free, default=0.0))


def _durations(
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    send_time: Sequence[float] | None,
    num_stages: int,
) -> tuple[list[float], list[float], list[float]]:
    fwd = [float(t) for t in forward_time]
    bwd = [float(t) for t in backward_time]
    send = [0.0] * num_stages if send_time is None else [float(t) for t in send_time]
    if len(fwd) != num_stages or len(bwd) != num_stages:
        raise ValueError(
            f"forward_time and backward_time need one entry per stage ({num_stages} = ranks x "
            f"virtual_stages), got {len(fwd)} and {len(bwd)}"
        )
    if len(send) not in (num_stages - 1, num_stages):
        raise ValueError(
            f"send_time needs {max(num_stages - 1, 0)} entries (one per stage boundary), got {len(send)}"
        )
    if min(fwd + bwd + send, default=0.0) < 0:
        raise ValueError("forward, backward and send times must be >= 0")
    return fwd, bwd, send


def _dependencies(task: Task, send: list[float], num_stages: int) -> list[tuple[_Key, float]]:
    """The tasks `task` waits for, each with the delay from its end to `task`'s start."""
    mb, s = task.microbatch, task.stage
    if not 0 <= s < num_stages:
        raise ValueError(f"{task}: stage out of range 0..{num_stages - 1}")
    if task.kind == FORWARD:
        return [((False, mb, s - 1), send[s - 1])] if s > 0 else []
    if task.kind != BACKWARD:
        raise ValueError(f"task kind must be {FORWARD!r} or {BACKWARD!r}, got {task.kind!r}")
    deps = [((False, mb, s), 0.0)]
    if s < num_stages - 1:
        deps.append(((True, mb, s + 1), send[s]))
    return deps


def _raise_if_stuck(
    tasks_per_rank: Sequence[Sequence[Task]],
    pointer: list[int],
    ends: dict[_Key, float],
    send: list[float],
    num_stages: int,
) -> None:
    stuck = []
    for rank, tasks in enumerate(tasks_per_rank):
        if pointer[rank] < len(tasks):
            task = tasks[pointer[rank]]
            dep = next(d for d, _ in _dependencies(task, send, num_stages) if d not in ends)
            needed = Task(BACKWARD if dep[0] else FORWARD, dep[1], dep[2])
            stuck.append(f"rank {rank} at {task} waits for {needed}")
    if stuck:
        raise RuntimeError(
            "pipeline schedule deadlocks (each rank waits for a task that never runs): "
            + "; ".join(stuck)
        )


def makespan_lower_bound(
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    num_microbatches: int,
    virtual_stages: int = 1,
) -> float:
    """A lower bound on the makespan of GPipe, 1F1B and interleaved 1F1B with these per-stage
    times (sends only add to it), without building the schedule:

        T ≥ max_r ( Σ_{s<r} f_s  +  m · Σ_{s on r} (f_s + b_s)  +  Σ_{s<r} b_s )

    Rank `r`'s first stage is stage `r`, so it cannot start before micro-batch 0 has gone
    forward through stages `0..r-1`; it then has `m` forwards and backwards of each of its
    stages to run; and its last task, in all three schedules, is a backward of stage `r`,
    after which that micro-batch still goes backward through stages `r-1..0`.
    """
    num_ranks = len(forward_time) // virtual_stages
    _check_counts(num_ranks, num_microbatches, virtual_stages)
    fwd, bwd, _ = _durations(forward_time, backward_time, None, num_ranks * virtual_stages)
    bound = 0.0
    for rank in range(num_ranks):
        work = sum(fwd[s] + bwd[s] for s in range(rank, len(fwd), num_ranks))
        fill = sum(fwd[:rank]) + sum(bwd[:rank])
        bound = max(bound, fill + num_microbatches * work)
    return bound


# -------------------------------------------------------------------------------------- memory


def in_flight(tasks_per_rank: Sequence[Sequence[Task]]) -> list[int]:
    """Per rank, the most micro-batch-chunks held at once: forward run, backward not yet run."""
    peaks = []
    for tasks in tasks_per_rank:
        held = peak = 0
        for task in tasks:
            held += 1 if task.kind == FORWARD else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks
