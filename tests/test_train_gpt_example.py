"""``examples/train_gpt.py`` end to end: plan and train a tiny GPT on 2 local Ray CPU workers.

The example runs as a child process in its own session (as ``make demo`` or a Ray job would run
it); a run past the time limit has its whole process group killed, Ray's processes included.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from tests.subprocesses import ROOT, run_in_own_session

EXAMPLE = ROOT / "examples" / "train_gpt.py"
TINY = ["--model", "gpt:layers=2,hidden=32,heads=2,vocab=64,seq=16", "--global-batch", "4"]
RUN_LIMIT_S = 150


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    """The example's exit status and output; its process group is killed if it overruns."""
    return run_in_own_session(
        [sys.executable, str(EXAMPLE), *args],
        env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120"),
        timeout_s=RUN_LIMIT_S,
        what="the example",
    )


def printed_loss(which: str, stdout: str) -> float:
    match = re.search(rf"^{which} loss: (\S+)$", stdout, re.MULTILINE)
    assert match is not None, f"no '{which} loss' line in:\n{stdout}"
    return float(match.group(1))


@pytest.mark.timeout(RUN_LIMIT_S + 30)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plans_and_trains_with_a_finite_falling_loss(precision):
    result = run_example("--cluster", "local:2", "--steps", "3", "--precision", precision, *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "schedule" in result.stdout and "predicted step" in result.stdout  # the plan table
    first, last = printed_loss("first", result.stdout), printed_loss("last", result.stdout)
    assert math.isfinite(first) and math.isfinite(last)
    # the counting task is learnable: three AdamW steps on it lower the loss
    assert last < first, (first, last)
    held_out = re.search(r"^eval loss \(held-out batch\): (\S+)$", result.stdout, re.MULTILINE)
    assert held_out is not None and math.isfinite(float(held_out.group(1))), result.stdout


@pytest.mark.timeout(120)
def test_a_bad_cluster_argument_is_a_clear_error():
    result = run_example("--cluster", "local:zero", "--steps", "1", *TINY)
    assert result.returncode == 2
    assert "local:N" in result.stderr
