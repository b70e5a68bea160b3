"""Pipeline schedules as static per-worker instruction lists.

``build_instructions(tasks_per_rank, stage_ranks)`` turns a schedule (one ``Task`` list per
pipeline rank, from ``hierarchical_ap.schedules``) and the global worker ranks of every
(virtual) stage into one list of ``Instruction``s per worker. Every worker of a pipeline rank
runs that rank's tasks in the schedule's order; around each task it exchanges boundary tensors
with the workers of the neighbouring stages:

* ``forward(s, i)`` on a stage ``s > 0`` is preceded by ``recv_activation`` from stage
  ``s - 1``; on a stage ``s < S - 1`` it is followed by ``send_activation`` to stage ``s + 1``;
* ``backward(s, i)`` on a stage ``s < S - 1`` is preceded by ``recv_gradient`` from stage
  ``s + 1``; it is followed by ``free`` (the micro-batch's saved state of stage ``s`` is
  dropped) and, on a stage ``s > 0``, by ``send_gradient`` to stage ``s - 1``.

Peers. Boundary tensors travel as pieces (``runtime.boundary``, ``runtime.cross_mesh``): which
worker of the sending stage sends which piece to which worker of the receiving stage depends on
the value's shape and placements, so a transfer is treated as involving every worker of both
stages. ``peers`` of a send or a recv are all the workers of the stage on the other side; the
same holds for gradients with the roles swapped.

Sends do not block (they are posted), receives do, until the piece from every sending worker
has been posted (the most a transfer can need); ``simulate_messages`` runs the lists under
exactly that rule and reports a deadlock, so tests can check every list before a worker runs
it. A worker posts each receive earlier than its instruction (``receive_posting``: one ahead
per channel) and waits for it at the instruction; posting early never blocks, so the rule
still holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hierarchical_ap.schedules import BACKWARD, FORWARD, Task

SEND_ACTIVATION = "send_activation"
RECV_ACTIVATION = "recv_activation"
SEND_GRADIENT = "send_gradient"
RECV_GRADIENT = "recv_gradient"
FREE = "free"
OPS = (FORWARD, BACKWARD, SEND_ACTIVATION, RECV_ACTIVATION, SEND_GRADIENT, RECV_GRADIENT, FREE)


@dataclass(frozen=True, slots=True)
class Instruction:
    """One step of a worker's list.

    ``stage`` is the stage this worker runs the step for; for sends and receives ``peer_stage``
    is the stage on the other side and ``peers`` the global worker ranks it talks to.
    """

    op: str
    stage: int
    microbatch: int
    peer_stage: int | None = None
    peers: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = f"{self.op}(stage={self.stage}, mb={self.microbatch}"
        if self.peer_stage is not None:
            text += f", peer_stage={self.peer_stage}, peers={list(self.peers)}"
        return text + ")"


def pipeline_ranks(stage_ranks: Sequence[Sequence[int]], virtual_stages: int) -> int:
    """The number of pipeline ranks ``p = len(stage_ranks) // virtual_stages``; checks that
    stage ``s`` uses the workers of stage ``s mod p`` (Megatron's interleaved layout)."""
    if virtual_stages < 1 or not stage_ranks or len(stage_ranks) % virtual_stages:
        raise ValueError(
            f"{len(stage_ranks)} stages cannot be {virtual_stages} chunks per pipeline rank"
        )
    p = len(stage_ranks) // virtual_stages
    for s, ranks in enumerate(stage_ranks):
        if tuple(ranks) != tuple(stage_ranks[s % p]) or not ranks:
            raise ValueError(
                f"stage {s} runs on workers {list(ranks)} but, as chunk {s // p} of pipeline "
                f"rank {s % p}, it must run on {list(stage_ranks[s % p])}"
            )
    return p


def build_instructions(
    tasks_per_rank: Sequence[Sequence[Task]],
    stage_ranks: Sequence[Sequence[int]],
) -> dict[int, list[Instruction]]:
    """Global worker rank → its instruction list, for the schedule ``tasks_per_rank`` (task
    list of pipeline rank ``r`` at index ``r``) on stages placed as ``stage_ranks`` (stage →
    its workers' global ranks)."""
    num_stages = len(stage_ranks)
    p = len(tasks_per_rank)
    if num_stages % p:
        raise ValueError(f"{num_stages} stages do not divide into {p} pipeline ranks")
    pipeline_ranks(stage_ranks, num_stages // p)
    lists: dict[int, list[Instruction]] = {}
    for r, tasks in enumerate(tasks_per_rank):
        for worker in stage_ranks[r]:
            lists[worker] = [
                step for task in tasks for step in _expand(task, stage_ranks, num_stages, r, p)
            ]
    return lists


def _expand(
    task: Task,
    stage_ranks: Sequence[Sequence[int]],
    num_stages: int,
    rank: int,
    p: int,
) -> list[Instruction]:
    s, mb = task.stage, task.microbatch
    if s % p != rank:
        raise ValueError(f"{task} is listed on pipeline rank {rank} but stage {s} is on {s % p}")
    steps: list[Instruction] = []
    if task.kind == FORWARD:
        if s > 0:
            steps.append(Instruction(RECV_ACTIVATION, s, mb, s - 1, tuple(stage_ranks[s - 1])))
        steps.append(Instruction(FORWARD, s, mb))
        if s < num_stages - 1:
            steps.append(Instruction(SEND_ACTIVATION, s, mb, s + 1, tuple(stage_ranks[s + 1])))
    elif task.kind == BACKWARD:
        if s < num_stages - 1:
            steps.append(Instruction(RECV_GRADIENT, s, mb, s + 1, tuple(stage_ranks[s + 1])))
        steps += [Instruction(BACKWARD, s, mb), Instruction(FREE, s, mb)]
        if s > 0:
            steps.append(Instruction(SEND_GRADIENT, s, mb, s - 1, tuple(stage_ranks[s - 1])))
    else:
        raise ValueError(f"task kind must be {FORWARD!r} or {BACKWARD!r}, got {task.kind!r}")
    return steps


@dataclass(frozen=True)
class ReceivePosting:
    """When a worker posts its receives, one ahead on each channel (see ``receive_posting``).

    ``at_start``: the index of each channel's first receive, posted when the step starts;
    ``after``: receive index → the index of the next receive on the same channel, posted when
    that receive is reached (before its wait)."""

    at_start: tuple[int, ...]
    after: Mapping[int, int]


def receive_posting(steps: Sequence[Instruction]) -> ReceivePosting:
    """Post every receive of ``steps`` one receive ahead of the step that reads it, per channel
    (the kind of value, the receiving stage and the stage it comes from).

    A receive only waits where its instruction stands; posting it earlier lets the message
    arrive while the worker computes. On gloo this matters: a send does not start before its
    receiver has posted the matching receive, so a receive posted only when it is needed costs
    a notification round trip between the two workers first. One ahead per channel bounds the
    extra receive buffers to one per channel, and each channel still posts its receives in
    list order, as messages on it are matched."""
    first: dict[tuple[str, int, int | None], int] = {}
    last: dict[tuple[str, int, int | None], int] = {}
    after: dict[int, int] = {}
    for index, step in enumerate(steps):
        if step.op not in (RECV_ACTIVATION, RECV_GRADIENT):
            continue
        channel = (step.op, step.stage, step.peer_stage)
        if channel in last:
            after[last[channel]] = index
        else:
            first[channel] = index
        last[channel] = index
    return ReceivePosting(tuple(sorted(first.values())), after)


# ---------------------------------------------------------------------------- checking


_Message = tuple[str, int, int, int, int]
"""(kind, micro-batch, from stage, sending worker, receiving worker)."""


def simulate_messages(lists: Mapping[int, Sequence[Instruction]]) -> None:
    """Run every worker's list with non-blocking sends and blocking receives; raise
    ``RuntimeError`` naming the stuck workers when they deadlock, or ``ValueError`` when a
    receive has no matching send or a send no matching receive."""
    posted: set[_Message] = set()
    pointer = dict.fromkeys(lists, 0)
    progress = True
    while progress:
        progress = False
        for worker, steps in lists.items():
            while pointer[worker] < len(steps):
                step = steps[pointer[worker]]
                if step.op in (SEND_ACTIVATION, SEND_GRADIENT):
                    posted.update(_message(step, worker, peer) for peer in step.peers)
                elif step.op in (RECV_ACTIVATION, RECV_GRADIENT):
                    wanted = {_message(step, peer, worker) for peer in step.peers}
                    if not wanted <= posted:
                        break
                    posted -= wanted
                pointer[worker] += 1
                progress = True
    stuck = [f"worker {w} at {lists[w][i]}" for w, i in pointer.items() if i < len(lists[w])]
    if stuck:
        raise RuntimeError("instruction lists deadlock: " + "; ".join(stuck))
    if posted:
        raise ValueError(f"{len(posted)} sends are never received, e.g. {sorted(posted)[0]}")


def _message(step: Instruction, sender: int, receiver: int) -> _Message:
    kind = "activation" if step.op in (SEND_ACTIVATION, RECV_ACTIVATION) else "gradient"
    from_stage = step.stage if step.op in (SEND_ACTIVATION, SEND_GRADIENT) else step.peer_stage
    assert from_stage is not None
    return (kind, step.microbatch, from_stage, sender, receiver)


def held_microbatches(steps: Sequence[Instruction]) -> int:
    """The most micro-batch-chunks whose forward ran and whose state is not yet freed."""
    held = peak = 0
    for step in steps:
        if step.op == FORWARD:
            held += 1
            peak = max(peak, held)
        elif step.op == FREE:
            held -= 1
    return peak
