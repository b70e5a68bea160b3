"""Pipeline schedules, their simulated timelines and activation memory against hand references."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hierarchical_ap.schedules import (
    SCHEDULES,
    Task,
    Timeline,
    bubble_fraction,
    build_schedule,
    gpipe,
    in_flight,
    interleaved_one_f_one_b,
    makespan_lower_bound,
    one_f_one_b,
    simulate,
    validate_schedule,
)


def F(mb: int, stage: int) -> Task:
    return Task("forward", mb, stage)


def B(mb: int, stage: int) -> Task:
    return Task("backward", mb, stage)


def grid() -> list[tuple[str, int, int, int]]:
    """(schedule, p, m, v) cases, interleaved only where m % p == 0."""
    cases = []
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 3, 4, 8, 16):
            cases += [(name, p, m, 1) for name in SCHEDULES]
            cases += [("interleaved", p, m, v) for v in (2, 3) if m % p == 0]
    return cases


def assert_asap_timeline(
    timeline: Timeline,
    schedule: list[list[Task]],
    fwd: list[float],
    bwd: list[float],
    send: list[float],
) -> None:
    """Each rank runs its list in order, one task at a time, each task starting as soon as the
    rank is free and its inputs have arrived; no overlap and every dependency respected."""
    num_stages = len(fwd)
    end = {(t.task.kind, t.task.microbatch, t.task.stage): t.end for t in timeline.tasks}
    assert len(end) == len(timeline.tasks) == sum(map(len, schedule))
    per_rank = timeline.per_rank()
    assert [[t.task for t in timed] for timed in per_rank] == schedule
    for rank, timed in enumerate(per_rank):
        free = 0.0
        for t in timed:
            mb, s = t.task.microbatch, t.task.stage
            assert t.rank == rank
            if t.task.kind == "forward":
                assert t.end - t.start == pytest.approx(fwd[s])
                deps = [end["forward", mb, s - 1] + send[s - 1]] if s > 0 else []
            else:
                assert t.end - t.start == pytest.approx(bwd[s])
                deps = [end["forward", mb, s]]
                if s < num_stages - 1:
                    deps.append(end["backward", mb, s + 1] + send[s])
            assert t.start >= free  # no overlap on the rank
            assert all(t.start >= d for d in deps)
            assert t.start == pytest.approx(max([free, *deps]))  # as soon as possible
            free = t.end
    assert timeline.makespan == max(t.end for t in timeline.tasks)


# ----------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("name", "p", "m", "v"), grid())
def test_every_schedule_is_valid_and_simulates_as_soon_as_possible(name, p, m, v):
    schedule = build_schedule(name, p, m, v)
    validate_schedule(schedule, p, m, v)
    rng = random.Random(f"{name}{p}{m}{v}")
    fwd = [rng.uniform(0.5, 2.0) for _ in range(p * v)]
    bwd = [rng.uniform(1.0, 4.0) for _ in range(p * v)]
    send = [rng.uniform(0.0, 0.5) for _ in range(p * v - 1)]
    timeline = simulate(schedule, fwd, bwd, send_time=send, virtual_stages=v)
    assert_asap_timeline(timeline, schedule, fwd, bwd, send)
    # lower bounds: one micro-batch's path through all stages, and the busiest rank's work
    path = sum(fwd) + sum(bwd) + 2 * sum(send)
    assert timeline.makespan >= path - 1e-9
    assert timeline.makespan >= max(timeline.busy_time(r) for r in range(p)) - 1e-9


def test_hand_written_orders():
    assert gpipe(2, 2) == [
        [F(0, 0), F(1, 0), B(0, 0), B(1, 0)],
        [F(0, 1), F(1, 1), B(0, 1), B(1, 1)],
    ]
    assert one_f_one_b(3, 4) == [
        [F(0, 0), F(1, 0), F(2, 0), B(0, 0), F(3, 0), B(1, 0), B(2, 0), B(3, 0)],
        [F(0, 1), F(1, 1), B(0, 1), F(2, 1), B(1, 1), F(3, 1), B(2, 1), B(3, 1)],
        [F(0, 2), B(0, 2), F(1, 2), B(1, 2), F(2, 2), B(2, 2), F(3, 2), B(3, 2)],
    ]
    # warm-up longer than m: all forwards first
    assert one_f_one_b(4, 2)[0] == [F(0, 0), F(1, 0), B(0, 0), B(1, 0)]


# p=2, m=4, v=2: rank 0 holds stages 0, 2 and rank 1 stages 1, 3. Warm-up forwards: rank 0
# 2*(2-0-1) + (2-1)*2 = 4, rank 1 0 + 2 = 2. Forward k visits chunk (k % 4) // 2 on micro-batch
# (k // 4) * 2 + k % 2: mb 0, 1 on chunk 0, mb 0, 1 on chunk 1, mb 2, 3 on chunk 0, ...; backward k
# visits the chunks in reverse order.
INTERLEAVED_2_4_2 = [
    [F(0, 0), F(1, 0), F(0, 2), F(1, 2), F(2, 0), B(0, 2), F(3, 0), B(1, 2)]
    + [F(2, 2), B(0, 0), F(3, 2), B(1, 0), B(2, 2), B(3, 2), B(2, 0), B(3, 0)],
    [F(0, 1), F(1, 1), F(0, 3), B(0, 3), F(1, 3), B(1, 3), F(2, 1), B(0, 1)]
    + [F(3, 1), B(1, 1), F(2, 3), B(2, 3), F(3, 3), B(3, 3), B(2, 1), B(3, 1)],
]


def test_interleaved_order_by_hand():
    assert interleaved_one_f_one_b(2, 4, 2) == INTERLEAVED_2_4_2
    assert build_schedule("interleaved", 2, 4, 2) == INTERLEAVED_2_4_2


def test_interleaved_with_one_chunk_is_1f1b():
    for p, m in ((1, 1), (2, 3), (4, 8), (3, 2)):
        assert build_schedule("interleaved", p, m) == one_f_one_b(p, m)
        assert interleaved_one_f_one_b(p, m, 1) == one_f_one_b(p, m)


# ------------------------------------------------------------------------------------ makespan


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(1, 1), (1, 5), (2, 1), (2, 4), (4, 3), (4, 8), (8, 16)])
@pytest.mark.parametrize(("tf", "tb"), [(1.0, 2.0), (1.0, 1.0), (2.0, 1.0), (0.25, 3.0)])
def test_uniform_stages_reach_the_bubble_formula(name, p, m, tf, tb):
    timeline = simulate(build_schedule(name, p, m), [tf] * p, [tb] * p)
    assert timeline.makespan == (m + p - 1) * (tf + tb)
    ideal = m * (tf + tb)
    assert (timeline.makespan - ideal) / ideal == pytest.approx(bubble_fraction(name, p, m))


@pytest.mark.parametrize(("p", "m", "v"), [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 3), (3, 9, 4)])
@pytest.mark.parametrize(("f", "b"), [(1.0, 2.0), (1.0, 1.0), (2.0, 1.0)])
def test_interleaved_uniform_chunks_reach_the_bubble_formula(p, m, v, f, b):
    # per-chunk times f, b: ideal m * v * (f + b) plus a bubble of (p - 1) chunk passes
    timeline = simulate(
        build_schedule("interleaved", p, m, v), [f] * (p * v), [b] * (p * v), virtual_stages=v
    )
    assert timeline.makespan == (m * v + p - 1) * (f + b)
    ideal = m * v * (f + b)
    bubble = (timeline.makespan - ideal) / ideal
    assert bubble == pytest.approx(bubble_fraction("interleaved", p, m, v))


def test_interleaved_timeline_by_hand():
    # p=2, m=4, v=2, every chunk f=1, b=2 (orders in INTERLEAVED_2_4_2). Walking the lists:
    #   rank 0: F0s0 0-1, F1s0 1-2, F0s2 2-3 (after F0s1 1-2), F1s2 3-4 (after F1s1 2-3), F2s0 4-5,
    #           B0s2 6-8 (after B0s3 4-6), F3s0 8-9, B1s2 9-11 (after B1s3 7-9), F2s2 11-12,
    #           B0s0 12-14 (after B0s1 10-12), F3s2 14-15, B1s0 15-17 (after B1s1 13-15),
    #           B2s2 18-20 (after B2s3 16-18), B3s2 21-23 (after B3s3 19-21),
    #           B2s0 23-25 (after B2s1 21-23), B3s0 25-27 (after B3s1 23-25).
    #   rank 1: F0s1 1, F1s1 2, F0s3 3, B0s3 4, F1s3 6, B1s3 7, F2s1 9, B0s1 10, F3s1 12,
    #           B1s1 13, F2s3 15, B2s3 16, F3s3 18, B3s3 19, B2s1 21, B3s1 23-25.
    # Makespan 27 = (m v + p - 1)(f + b) = 9 * 3: the bubble is (p - 1) chunk passes.
    timeline = simulate(INTERLEAVED_2_4_2, [1.0] * 4, [2.0] * 4, virtual_stages=2)
    starts = [[t.start for t in timed] for timed in timeline.per_rank()]
    assert starts == [
        [0, 1, 2, 3, 4, 6, 8, 9, 11, 12, 14, 15, 18, 21, 23, 25],
        [1, 2, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 23],
    ]
    assert timeline.makespan == 27.0
    # the same work as 1F1B with two stages of f=2, b=4 takes (m + p - 1)(2 + 4) = 30
    one_f_one_b_time = simulate(one_f_one_b(2, 4), [2.0, 2.0], [4.0, 4.0]).makespan
    assert one_f_one_b_time == 30.0
    assert timeline.makespan < one_f_one_b_time


def gpipe_reference(fwd: list[float], bwd: list[float], m: int) -> float:
    """The classic GPipe recurrence: forward i of stage s ends at
    max(forward i-1 of s, forward i of s-1) + f_s; backward i of stage s (after all forwards of
    the stage, in order 0..m-1) at max(backward i-1 of s, backward i of s+1) + b_s."""
    p = len(fwd)
    fe = [[0.0] * p for _ in range(m)]
    for i in range(m):
        for s in range(p):
            fe[i][s] = max(fe[i - 1][s] if i else 0.0, fe[i][s - 1] if s else 0.0) + fwd[s]
    be = [[0.0] * p for _ in range(m)]
    for i in range(m):
        for s in reversed(range(p)):
            prev = be[i - 1][s] if i else fe[m - 1][s]
            be[i][s] = max(prev, be[i][s + 1] if s < p - 1 else 0.0) + bwd[s]
    return be[m - 1][0]


@pytest.mark.parametrize(("p", "m"), [(2, 3), (3, 5), (5, 4), (6, 12)])
def test_gpipe_unequal_stages_match_the_recurrence(p, m):
    rng = random.Random(p * 100 + m)
    fwd = [float(rng.randint(1, 9)) for _ in range(p)]
    bwd = [float(rng.randint(1, 9)) for _ in range(p)]
    assert simulate(gpipe(p, m), fwd, bwd).makespan == gpipe_reference(fwd, bwd, m)


def test_1f1b_unequal_stages_by_hand():
    # p=2, m=2, f=(1, 2), b=(3, 4). Rank 0: F0 F1 B0 B1, rank 1: F0 B0 F1 B1.
    #   rank 1: F0 1-3, B0 3-7, F1 7-9, B1 9-13; rank 0: F0 0-1, F1 1-2, B0 7-10, B1 13-16.
    timeline = simulate(one_f_one_b(2, 2), [1.0, 2.0], [3.0, 4.0])
    assert [[(t.start, t.end) for t in timed] for timed in timeline.per_rank()] == [
        [(0, 1), (1, 2), (7, 10), (13, 16)],
        [(1, 3), (3, 7), (7, 9), (9, 13)],
    ]
    assert timeline.makespan == 16.0
    assert timeline.busy_time(0) == 8.0
    assert timeline.busy_time(1) == 12.0


def test_send_time_shifts_the_makespan():
    # p=2, m=1: F(s0) -> send -> F(s1) -> B(s1) -> send -> B(s0)
    f, b, s = [1.0, 2.0], [3.0, 4.0], 0.5
    for name in ("gpipe", "1f1b"):
        schedule = build_schedule(name, 2, 1)
        assert simulate(schedule, f, b).makespan == 1 + 2 + 4 + 3
        assert simulate(schedule, f, b, send_time=[s]).makespan == 1 + s + 2 + 4 + s + 3
        # a per-stage array of length p is accepted, its last entry unused
        assert simulate(schedule, f, b, send_time=[s, 99.0]).makespan == 1 + s + 2 + 4 + s + 3
    # uniform GPipe: forward i of stage s ends at (i + s + 1) t_f + s * send, so each of the
    # (p - 1) hops down and (p - 1) hops back adds one send to the critical path
    p, m = 4, 8
    timeline = simulate(gpipe(p, m), [1.0] * p, [2.0] * p, send_time=[0.25] * (p - 1))
    assert timeline.makespan == (m + p - 1) * 3.0 + 2 * (p - 1) * 0.25


@pytest.mark.parametrize(("name", "p", "m", "v"), grid())
def test_makespan_lower_bound_holds_and_is_tight_for_equal_stages(name, p, m, v):
    rng = random.Random(hash((name, p, m, v)) % 1000)
    stages = p * v
    fwd = [float(rng.randint(1, 9)) for _ in range(stages)]
    bwd = [float(rng.randint(1, 9)) for _ in range(stages)]
    schedule = build_schedule(name, p, m, v)
    for f, b in ((fwd, bwd), ([1.0] * stages, [2.0] * stages)):
        bound = makespan_lower_bound(f, b, m, v)
        assert bound <= simulate(schedule, f, b, virtual_stages=v).makespan + 1e-9
    # equal chunks of f + b = 3: the bound is the exact makespan, (m v + p - 1) chunk times
    assert bound == pytest.approx(simulate(schedule, f, b, virtual_stages=v).makespan)
    assert bound == pytest.approx((m * v + p - 1) * 3.0)


def test_large_pipeline_follows_the_bubble_formula():
    """64 ranks × 512 micro-batches × 2 chunks: the timeline stays exact at scale (its speed
    is measured by benchmarks/planner_speed.py, not here)."""
    schedule = build_schedule("interleaved", 64, 512, 2)
    timeline = simulate(schedule, [0.5] * 128, [1.0] * 128, virtual_stages=2)
    assert timeline.makespan == (512 * 2 + 63) * 1.5
    assert len(timeline.tasks) == 2 * 512 * 128


# -------------------------------------------------------------------------------------- memory


def test_in_flight_counts():
    for p, m in ((1, 1), (2, 1), (4, 2), (4, 8), (8, 16)):
        assert in_flight(one_f_one_b(p, m)) == [min(p - r, m) for r in range(p)]
        assert in_flight(gpipe(p, m)) == [m] * p
    for p, m, v in ((2, 4, 2), (4, 4, 2), (4, 8, 2), (4, 16, 4), (8, 8, 3), (1, 3, 2)):
        # Megatron: warm-up 2 (p - r - 1) + (v - 1) p forwards, then one more before the first
        # steady backward, all m v chunk-micro-batches at most
        megatron = [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) for r in range(p)]
        assert in_flight(interleaved_one_f_one_b(p, m, v)) == megatron
    assert in_flight(INTERLEAVED_2_4_2) == [5, 3]


def test_bubble_fraction_formulas():
    assert bubble_fraction("gpipe", 4, 8) == 3 / 8
    assert bubble_fraction("1f1b", 4, 8) == 3 / 8
    assert bubble_fraction("interleaved", 4, 8, 2) == 3 / 16
    assert bubble_fraction("interleaved", 4, 6) == 3 / 6


# --------------------------------------------------------------------------------- bad inputs


def test_bad_counts_and_names_raise():
    with pytest.raises(ValueError, match="multiple of num_ranks.*6 micro-batches on 4 ranks"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        interleaved_one_f_one_b(4, 6, 2)
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        bubble_fraction("interleaved", 4, 6, 2)
    with pytest.raises(
        ValueError, match="unknown pipeline schedule 'zb'.*gpipe, 1f1b, interleaved"
    ):
        build_schedule("zb", 2, 2)
    with pytest.raises(ValueError, match="num_ranks must be a positive int, got 0"):
        build_schedule("1f1b", 0, 4)
    with pytest.raises(ValueError, match="num_microbatches must be a positive int"):
        gpipe(2, 0)
    with pytest.raises(ValueError, match="virtual_stages must be a positive int"):
        interleaved_one_f_one_b(2, 2, 0)
    with pytest.raises(ValueError, match="num_ranks must be a positive int, got True"):
        one_f_one_b(True, 2)
    with pytest.raises(ValueError, match="num_microbatches must be a positive int, got 2.0"):
        one_f_one_b(2, 2.0)
    assert one_f_one_b(np.int64(2), np.int64(3)) == one_f_one_b(2, 3)  # numpy counts are fine
    with pytest.raises(ValueError, match="'gpipe' runs one stage per rank.*'interleaved'"):
        build_schedule("gpipe", 2, 2, 2)


def test_bad_simulation_inputs_raise():
    schedule = one_f_one_b(2, 2)
    with pytest.raises(ValueError, match="one entry per stage \\(2 = ranks x virtual_stages\\)"):
        simulate(schedule, [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per stage \\(4"):
        simulate(schedule, [1.0, 1.0], [1.0, 1.0], virtual_stages=2)
    with pytest.raises(ValueError, match="send_time needs 1 entries"):
        simulate(schedule, [1.0, 1.0], [1.0, 1.0], send_time=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        simulate(schedule, [1.0, -1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="no ranks"):
        simulate([], [], [])


def test_deadlock_names_the_stuck_tasks():
    # rank 1 runs micro-batch 1 before 0 while rank 0 waits for micro-batch 0's gradient first
    schedule = [[F(0, 0), B(0, 0), F(1, 0), B(1, 0)], [F(1, 1), B(1, 1), F(0, 1), B(0, 1)]]
    validate_schedule(schedule, 2, 2)  # every rank's own order is fine
    with pytest.raises(RuntimeError, match="deadlocks") as info:
        simulate(schedule, [1.0, 1.0], [1.0, 1.0])
    message = str(info.value)
    assert "rank 0 at backward(mb=0, stage=0) waits for backward(mb=0, stage=1)" in message
    assert "rank 1 at forward(mb=1, stage=1) waits for forward(mb=1, stage=0)" in message


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ([[F(0, 0), B(0, 0)]], "schedule has 1 ranks, expected 2"),
        ([[F(0, 0)], [F(0, 1), B(0, 1)]], "misses 1 tasks, e.g. backward\\(mb=0, stage=0\\)"),
        (
            [[F(0, 0), F(0, 0), B(0, 0)], [F(0, 1), B(0, 1)]],
            "runs forward\\(mb=0, stage=0\\) twice",
        ),
        ([[F(0, 1), B(0, 0)], [F(0, 0), B(0, 1)]], "on rank 0, but stage 1 lives on rank 1"),
        (
            [[B(0, 0), F(0, 0)], [F(0, 1), B(0, 1)]],
            "runs backward\\(mb=0, stage=0\\) before its forward",
        ),
        ([[F(1, 0), B(0, 0)], [F(0, 1), B(0, 1)]], "micro-batch out of range 0..0"),
        ([[F(0, 2), B(0, 0)], [F(0, 1), B(0, 1)]], "stage out of range 0..1"),
        ([[Task("recompute", 0, 0)], [F(0, 1), B(0, 1)]], "kind must be 'forward' or 'backward'"),
    ],
)
def test_validate_schedule_rejects(schedule, match):
    with pytest.raises(ValueError, match=match):
        validate_schedule(schedule, 2, 1)
