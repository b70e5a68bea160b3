"""Static per-worker instruction lists, checked without Ray or torch.distributed."""

from __future__ import annotations

import pytest

from hierarchical_ap.schedules import BACKWARD, FORWARD, build_schedule, forward_only, in_flight
from runtime.instructions import (
    FREE,
    RECV_ACTIVATION,
    RECV_GRADIENT,
    SEND_ACTIVATION,
    SEND_GRADIENT,
    Instruction,
    build_instructions,
    held_microbatches,
    receive_posting,
    simulate_messages,
)

# (schedule, pipeline ranks, micro-batches, virtual stages, workers per stage group)
CASES = [
    ("gpipe", 2, 4, 1, (2, 2)),
    ("1f1b", 2, 4, 1, (1, 3)),
    ("1f1b", 4, 8, 1, (1, 1, 1, 1)),
    ("1f1b", 4, 2, 1, (2, 1, 2, 1)),
    ("interleaved", 2, 4, 2, (2, 2)),
    ("interleaved", 2, 4, 3, (1, 2)),
    ("interleaved", 4, 8, 2, (1, 1, 1, 1)),
]


def _layout(group_sizes: tuple[int, ...], virtual_stages: int) -> list[tuple[int, ...]]:
    groups, start = [], 0
    for size in group_sizes:
        groups.append(tuple(range(start, start + size)))
        start += size
    return [groups[s % len(groups)] for s in range(len(groups) * virtual_stages)]


def _lists(name, p, m, v, sizes):
    tasks = build_schedule(name, p, m, v)
    stage_ranks = _layout(sizes, v)
    return tasks, stage_ranks, build_instructions(tasks, stage_ranks)


@pytest.mark.parametrize("name,p,m,v,sizes", CASES)
def test_lists_run_without_deadlock_and_every_send_is_received(name, p, m, v, sizes):
    _, _, lists = _lists(name, p, m, v, sizes)
    simulate_messages(lists)


@pytest.mark.parametrize("name,p,m,v,sizes", CASES)
def test_each_stage_runs_every_microbatch_once_forward_before_backward(name, p, m, v, sizes):
    _, stage_ranks, lists = _lists(name, p, m, v, sizes)
    for s, ranks in enumerate(stage_ranks):
        for worker in ranks:
            steps = [i for i in lists[worker] if i.stage == s]
            for op in (FORWARD, BACKWARD, FREE):
                assert sorted(i.microbatch for i in steps if i.op == op) == list(range(m))
            for mb in range(m):
                order = [
                    i.op for i in steps if i.microbatch == mb and i.op in (FORWARD, BACKWARD, FREE)
                ]
                assert order == [FORWARD, BACKWARD, FREE]


@pytest.mark.parametrize("name,p,m,v,sizes", CASES)
def test_held_microbatches_equal_the_schedules_in_flight_count(name, p, m, v, sizes):
    tasks, stage_ranks, lists = _lists(name, p, m, v, sizes)
    expected = in_flight(tasks)
    for r in range(p):
        for worker in stage_ranks[r]:
            assert held_microbatches(lists[worker]) == expected[r]


@pytest.mark.parametrize("name,p,m,v,sizes", CASES)
def test_workers_of_a_stage_group_run_the_same_computation(name, p, m, v, sizes):
    _, stage_ranks, lists = _lists(name, p, m, v, sizes)
    for r in range(p):
        compute = [
            [(i.op, i.stage, i.microbatch) for i in lists[w] if i.op in (FORWARD, BACKWARD)]
            for w in stage_ranks[r]
        ]
        assert all(c == compute[0] for c in compute)


@pytest.mark.parametrize("name,p,m,v,sizes", CASES)
def test_receives_are_posted_one_ahead_per_channel_in_list_order(name, p, m, v, sizes):
    _, _, lists = _lists(name, p, m, v, sizes)
    for steps in lists.values():
        posting = receive_posting(steps)
        receives = [i for i, s in enumerate(steps) if s.op in (RECV_ACTIVATION, RECV_GRADIENT)]
        # every receive is posted exactly once: at the start, or when the one before it on
        # its channel is reached
        assert sorted([*posting.at_start, *posting.after.values()]) == receives
        channel = {i: (steps[i].op, steps[i].stage, steps[i].peer_stage) for i in receives}
        assert len({channel[i] for i in posting.at_start}) == len(posting.at_start)
        for reached, posted in posting.after.items():
            assert channel[reached] == channel[posted] and reached < posted
            between = [i for i in receives if reached < i < posted]
            assert all(channel[i] != channel[posted] for i in between)


def test_a_stage_posts_its_first_receives_at_the_start_and_the_next_at_each_receive():
    lists = build_instructions(build_schedule("1f1b", 2, 2, 1), [(0,), (1,)])
    # worker 0: forward 0 and 1, then gradients 0 and 1 from stage 1
    steps = lists[0]
    gradients = [i for i, s in enumerate(steps) if s.op == RECV_GRADIENT]
    posting = receive_posting(steps)
    assert posting.at_start == (gradients[0],)
    assert dict(posting.after) == {gradients[0]: gradients[1]}


def test_boundary_steps_name_every_worker_of_the_stage_on_the_other_side():
    # stage 0 on workers (0, 1), stage 1 on (2, 3, 4): a transfer may involve any pair
    _, _, lists = _lists("1f1b", 2, 2, 1, (2, 3))
    for w in (0, 1):
        assert {i.peers for i in lists[w] if i.op in (SEND_ACTIVATION, RECV_GRADIENT)} == {
            (2, 3, 4)
        }
    for w in (2, 3, 4):
        assert {i.peers for i in lists[w] if i.op in (RECV_ACTIVATION, SEND_GRADIENT)} == {(0, 1)}


def test_a_receive_waits_for_every_sending_worker():
    # stage 0 on (0, 1), stage 1 on (2,): worker 1 posting its send late stalls worker 2
    _, _, lists = _lists("gpipe", 2, 1, 1, (2, 1))
    late = [i for i in lists[1] if i.op == SEND_ACTIVATION]
    lists[1] = [
        Instruction(RECV_GRADIENT, 0, 0, 1, (2,)),
        *[i for i in lists[1] if i.op not in (SEND_ACTIVATION, RECV_GRADIENT)],
        *late,
    ]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate_messages(lists)


def test_a_reordered_list_deadlocks_in_simulation():
    _, _, lists = _lists("1f1b", 2, 2, 1, (1, 1))
    # worker 1 (last stage) waits for a gradient nobody sends before it sends its own
    lists[1] = [Instruction(RECV_GRADIENT, 1, 0, 0, (0,)), *lists[1]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate_messages(lists)


def test_a_send_without_receive_is_reported():
    _, _, lists = _lists("gpipe", 2, 1, 1, (1, 1))
    lists[0].append(Instruction(SEND_ACTIVATION, 0, 0, 1, (1,)))
    with pytest.raises(ValueError, match="never received"):
        simulate_messages(lists)


def test_stages_placed_against_the_interleaved_layout_are_refused():
    tasks = build_schedule("interleaved", 2, 2, 2)
    with pytest.raises(ValueError, match="must run on"):
        build_instructions(tasks, [(0,), (1,), (1,), (0,)])


@pytest.mark.parametrize(
    "name,p,m,v,sizes", [*CASES, ("any", 2, 3, 2, (1, 2)), ("any", 4, 1, 1, (1, 1, 1, 1))]
)
def test_forward_only_lists_run_every_forward_once_without_deadlock(name, p, m, v, sizes):
    """Evaluation lists: forwards and activation transfers only, each micro-batch once per
    stage, and no deadlock (also across the chunks of interleaved layouts)."""
    stage_ranks = _layout(sizes, v)
    lists = build_instructions(forward_only(p, m, v), stage_ranks)
    simulate_messages(lists)
    for s, ranks in enumerate(stage_ranks):
        for worker in ranks:
            steps = [i for i in lists[worker] if i.stage == s]
            assert {i.op for i in steps} <= {FORWARD, SEND_ACTIVATION, RECV_ACTIVATION}
            assert [i.microbatch for i in steps if i.op == FORWARD] == list(range(m))
