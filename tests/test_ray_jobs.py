"""`hap submit` against a real Ray head with token authentication, as a user's cluster runs.

One head per module: `ray start --head --block` in its own session and temp dir, its dashboard
(the job server) on 127.0.0.1, every port chosen free, `RAY_AUTH_MODE=token` with a token file.
`hap submit` runs as a child process, as a user runs it (in this process where it never gets
as far as a job, or returns at once); the job's status and logs are read back
through Ray's job REST API (`/api/jobs/...`), not through hap. The head is stopped by signalling
its own processes only (never `ray stop`, which stops every Ray instance on the machine): the
`--block` process shuts its node down on SIGTERM, then anything left in its process group or
running in its temp dir (the job's driver runs in a session of its own) is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from hierarchical_ap.cli import main
from tests.subprocesses import ROOT, run_in_own_session

HEAD_CPUS = 2  # Cluster.from_ray sees one host of this many CPU workers
TINY = ["--model", "gpt:layers=2,hidden=32,heads=2,vocab=64,seq=16", "--global-batch", "4"]
HEAD_START_LIMIT_S = 90
JOB_LIMIT_S = 150
QUICK_LIMIT_S = 60
_ENV_DROPPED = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_JOB_HEADERS",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(HEAD_START_LIMIT_S + JOB_LIMIT_S + 60),
    # Ray's log streaming (aiohttp), not hap
    pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning"),
]


@dataclass(frozen=True)
class Head:
    url: str
    token_file: Path
    temp_dir: Path
    process: subprocess.Popen[bytes]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def job(self, job_id: str) -> dict:
        response = requests.get(f"{self.url}/api/jobs/{job_id}", headers=self.headers(), timeout=10)
        response.raise_for_status()
        return response.json()

    def job_logs(self, job_id: str) -> str:
        response = requests.get(
            f"{self.url}/api/jobs/{job_id}/logs", headers=self.headers(), timeout=10
        )
        response.raise_for_status()
        return response.json()["logs"]

    def job_ids(self) -> set[str]:
        response = requests.get(f"{self.url}/api/jobs/", headers=self.headers(), timeout=10)
        response.raise_for_status()
        return {job["submission_id"] for job in response.json()}

    def wait_for_job(self, job_id: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
                return job
            time.sleep(0.5)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _start_head(temp_dir: Path) -> Head:
    token_file = temp_dir / "token"
    token_file.write_text(secrets.token_hex(32))
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node, objects = (
        _free_ports(9)
    )
    env = _clean_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        # the job's `python` is the one of this environment, as on a head started from it
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1",
    )
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node), "--object-manager-port", str(objects),
        "--num-cpus", str(HEAD_CPUS), "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    with open(temp_dir / "head.log", "w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(f"http://127.0.0.1:{dashboard}", token_file, temp_dir, process)
    deadline = time.monotonic() + HEAD_START_LIMIT_S
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{head.url}/api/jobs/", headers=head.headers(), timeout=5).ok:
                return head
        time.sleep(0.5)
    _stop_head(head)
    pytest.fail(f"the Ray head did not start:\n{(temp_dir / 'head.log').read_text()}")


def _stop_head(head: Head) -> None:
    """SIGTERM to the --block process (it stops its node), then SIGKILL to what is left of
    this head only: its process group and processes working in its temp dir."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.process.pid, signal.SIGKILL)
    for pid in _processes_in(head.temp_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _processes_in(temp_dir: Path) -> list[int]:
    """Processes whose command line or working directory is under ``temp_dir``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            if str(temp_dir) in cmdline or cwd.startswith(str(temp_dir)):
                found.append(int(entry.name))
    return [pid for pid in found if pid != os.getpid()]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # a short path: Ray's unix sockets live under it (at most 107 bytes)
    temp_dir = Path(
        tempfile.mkdtemp(prefix="hapjob", dir="/tmp" if Path("/tmp").is_dir() else None)
    )
    started = _start_head(temp_dir)
    try:
        yield started
    finally:
        _stop_head(started)


def _hap_submit(*args: str, timeout_s: float = QUICK_LIMIT_S) -> subprocess.CompletedProcess[str]:
    return run_in_own_session(
        [sys.executable, "-m", "hierarchical_ap.cli", "submit", *args],
        env=_clean_env(),
        timeout_s=timeout_s,
        what="hap submit",
    )


def _hap_submit_here(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``hap submit`` in this process (no interpreter start-up): exit status, stdout, stderr."""
    for name in _ENV_DROPPED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    status = main(["submit", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _submitted_id(stderr: str) -> str:
    match = re.search(r"submitted job (\S+) to ", stderr)
    assert match is not None, stderr
    return match.group(1)


def _loss(which: str, logs: str) -> float:
    match = re.search(rf"^{which} loss: (\S+)$", logs, re.MULTILINE)
    assert match is not None, f"no '{which} loss' line in the job's logs:\n{logs}"
    return float(match.group(1))


def test_the_example_trains_as_a_job_and_its_logs_show_the_loss_falling(head):
    steps = ["--steps", "5", *TINY]
    result = _hap_submit(
        "--address", head.url, "--token-file", str(head.token_file), "--",
        "python", "examples/train_gpt.py", "--cluster", "auto", *steps,
        timeout_s=JOB_LIMIT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = _submitted_id(result.stderr)
    assert f"job {job_id} SUCCEEDED" in result.stderr
    job = head.job(job_id)
    assert job["status"] == "SUCCEEDED" and job["driver_exit_code"] == 0, job
    logs = head.job_logs(job_id)
    # the driver found the running cluster: one host of the head's CPUs
    assert f"on {HEAD_CPUS} CPU worker(s)" in logs, logs
    first, last = _loss("first", logs), _loss("last", logs)
    assert last < first, (first, last)
    # hap streamed the same logs to its stdout
    assert f"last loss: {last:.6f}" in result.stdout


def test_a_submission_without_the_token_is_rejected_with_the_fix(head, monkeypatch, capsys):
    before = head.job_ids()
    status, _, err = _hap_submit_here(monkeypatch, capsys, "--address", head.url, "--", "true")
    assert status == 2, err
    assert "requires an authentication token and none was sent" in err
    assert "--token-file" in err and "ray get-auth-token" in err
    assert head.job_ids() == before  # nothing ran


def test_a_wrong_token_is_rejected(head, monkeypatch, capsys, tmp_path):
    wrong = tmp_path / "token"
    wrong.write_text(secrets.token_hex(32))
    before = head.job_ids()
    status, _, err = _hap_submit_here(
        monkeypatch, capsys, "--address", head.url, "--token-file", str(wrong), "--", "true"
    )
    assert status == 2, err
    assert f"rejected the token from --token-file {wrong}" in err
    assert head.job_ids() == before


def test_no_wait_prints_the_job_id_and_the_job_runs(head, monkeypatch, capsys):
    status, out, err = _hap_submit_here(
        monkeypatch, capsys, "--address", head.url, "--token-file", str(head.token_file),
        "--no-wait", "--", "python", "-c", "print('ran with', 2 + 2)",
    )  # fmt: skip
    assert status == 0, err
    job_id = out.strip()
    assert job_id == _submitted_id(err)
    assert head.wait_for_job(job_id, QUICK_LIMIT_S)["status"] == "SUCCEEDED"
    assert "ran with 4" in head.job_logs(job_id)


def test_ctrl_c_stops_the_job(head):
    process = subprocess.Popen(
        [
            sys.executable, "-m", "hierarchical_ap.cli", "submit", "--address", head.url,
            "--token-file", str(head.token_file), "--",
            "python", "-c", "import time; print('started', flush=True); time.sleep(300)",
        ],
        cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    started = threading.Event()

    def watch_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == "started":
                started.set()

    watcher = threading.Thread(target=watch_stdout, daemon=True)
    watcher.start()
    try:
        assert started.wait(QUICK_LIMIT_S), "the job's output never arrived"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=QUICK_LIMIT_S) == 130
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    watcher.join(timeout=5)
    assert process.stderr is not None
    stderr = process.stderr.read()
    job_id = _submitted_id(stderr)
    assert f"job {job_id} STOPPED" in stderr
    assert head.job(job_id)["status"] == "STOPPED"


def test_a_failing_job_fails_the_command_with_its_exit_code(head, monkeypatch, capsys):
    status, out, err = _hap_submit_here(
        monkeypatch, capsys, "--address", head.url, "--token-file", str(head.token_file), "--",
        "python", "-c", "import sys; print('about to fail'); sys.exit(3)",
    )  # fmt: skip
    assert status == 1, err
    assert "about to fail" in out  # the streamed logs
    job_id = _submitted_id(err)
    assert f"job {job_id} FAILED (exit code 3)" in err
    assert head.job(job_id)["driver_exit_code"] == 3
