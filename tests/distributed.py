"""Run test functions on N real processes joined by a gloo process group.

``DistributedWorkers`` spawns ``world_size`` processes once, joins them into a gloo group on a
free port of 127.0.0.1 and then runs any number of tasks on them: ``workers.run(fn, *args)``
calls ``fn(*args)`` on every rank and returns the per-rank results (picklable values) in rank
order. Spawning and importing torch costs seconds per process, so a test module shares one
group of workers across its cases (a module-scoped fixture) instead of spawning per case.

Every run has a hard deadline: when it passes, or when a rank fails and the others do not
finish within a short grace period (they may be stuck in a collective waiting for it), every
worker is killed and the next run spawns a fresh group (when every rank answers, errors
included, the group stays up). Workers also exit on their own when their parent dies, so a
killed test session leaves no process behind.

``fn`` must be importable by the spawned processes: a module-level function.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=60)
ERROR_GRACE_S = 10.0
"""How long the other ranks may still take after one rank failed."""
_PARENT_POLL_S = 1.0
_STOP = "stop"


class DistributedError(RuntimeError):
    """A task failed on some rank, or did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_when_orphaned(parent_pid: int) -> None:
    """End this worker at once when its parent is gone, even if it is stuck in a collective."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _worker(
    rank: int, world_size: int, port: int, tasks: Any, results: Any, parent_pid: int
) -> None:
    """A worker's life: join the group, run tasks until told to stop, leave."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=GLOO_TIMEOUT,
        )
    except Exception:
        results.put((rank, -1, False, traceback.format_exc()))
        return
    try:
        while (task := tasks.get()) != _STOP:
            task_id, fn, args = task
            try:
                results.put((rank, task_id, True, fn(*args)))
            except Exception:
                results.put((rank, task_id, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class DistributedWorkers:
    """``world_size`` processes in one gloo group that run module-level functions on request.

    Use as a context manager (or call ``close``): leaving it stops and joins every worker.
    """

    def __init__(self, world_size: int, *, start_timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        self.start_timeout_s = start_timeout_s
        self._context = mp.get_context("spawn")
        self._processes: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._next_task = 0

    def __enter__(self) -> DistributedWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> list[Any]:
        """``[fn(*args) on rank 0, …, on rank world_size - 1]``; raises ``DistributedError``
        with every failing rank's traceback, or when the ranks do not finish in ``timeout_s``."""
        starting = not self._processes
        if starting:
            self._start()
        task_id = self._next_task
        self._next_task += 1
        for tasks in self._tasks:
            tasks.put((task_id, fn, args))
        deadline = time.monotonic() + timeout_s + (self.start_timeout_s if starting else 0.0)
        return self._collect(task_id, getattr(fn, "__name__", str(fn)), deadline)

    def close(self) -> None:
        """Ask every worker to stop, then kill whatever has not exited shortly after."""
        for tasks in self._tasks:
            tasks.put(_STOP)
        deadline = time.monotonic() + 10.0
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()

    def _start(self) -> None:
        port = free_port()
        self._results = self._context.Queue()
        self._tasks = [self._context.Queue() for _ in range(self.world_size)]
        for rank in range(self.world_size):
            process = self._context.Process(
                target=_worker,
                args=(rank, self.world_size, port, self._tasks[rank], self._results, os.getpid()),
                daemon=True,
            )
            process.start()
            self._processes.append(process)

    def _collect(self, task_id: int, name: str, deadline: float) -> list[Any]:
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(values) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, got_id, ok, value = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if any(not p.is_alive() for p in self._processes):
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
                continue
            if got_id not in (task_id, -1):
                continue
            if ok:
                values[rank] = value
            else:
                errors[rank] = value
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        if len(values) == self.world_size:
            return [values[rank] for rank in range(self.world_size)]
        missing = sorted(set(range(self.world_size)) - set(values) - set(errors))
        if missing:  # they may be stuck in a collective: start afresh next time
            self._kill()
        report = "".join(f"\n--- rank {rank} ---\n{tb}" for rank, tb in sorted(errors.items()))
        if missing:
            report += f"\nranks {missing} did not finish in time; all workers were killed"
        raise DistributedError(f"{name} failed on {self.world_size} processes:{report}")

    def _kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5.0)
        for channel in [*self._tasks, self._results]:
            if channel is not None:
                channel.cancel_join_thread()
                channel.close()
        self._processes, self._tasks, self._results = [], [], None


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0
) -> list[Any]:
    """Spawn ``world_size`` gloo processes, run ``fn(*args)`` on each, return the results."""
    with DistributedWorkers(world_size) as workers:
        return workers.run(fn, *args, timeout_s=timeout_s)
