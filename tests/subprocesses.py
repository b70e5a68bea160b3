"""Run a command as a child process in its own session, killing its whole group on overrun."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_own_session(
    argv: Sequence[str], *, env: Mapping[str, str], timeout_s: float, what: str
) -> subprocess.CompletedProcess[str]:
    """``argv``'s exit status and output, run from the repository root; past ``timeout_s`` its
    process group (Ray's processes included) is killed and the test fails naming ``what``."""
    process = subprocess.Popen(
        list(argv),
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{what} ran past {timeout_s} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
