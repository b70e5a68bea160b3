"""`hap advise` end to end: JSON and CSV for scripts, the terminal table, what-if, errors."""

from __future__ import annotations

import csv
import io
import json

import pytest

from hierarchical_ap.cli import main
from hierarchical_ap.commands.advise import CSV_COLUMNS

BASE = ["advise", "--model", "gpt-tiny", "--cluster", "1x4xA100-80GB", "--global-batch", "4"]
SMALL = ["--micro-batch-sizes", "1,2", "--top", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def advice_json():
    """One run with the planner and a what-if, shared by the JSON checks."""
    capture = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", capture)
        assert main([*BASE, *SMALL, "--what-if", "device=H100-80GB", "--json"]) == 0
    return json.loads(capture.getvalue())


def test_json_ranks_rows_and_names_the_recommendation(advice_json):
    rows = advice_json["rows"]
    steps = [r["step_time_s"] for r in rows if r["kind"] == "configuration"]
    assert steps == sorted(steps)
    assert [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)
    assert sum(r["kind"] == "planner" for r in rows) == 1
    recommended = advice_json["recommended"]
    assert recommended["reason"] and recommended["recommended"] is True
    assert sum(r["recommended"] for r in rows) == 1
    for row in rows:
        memory = row["memory_bytes"]
        parts = memory["parameters"] + memory["gradients"] + memory["optimizer"]
        assert memory["total"] == pytest.approx(parts + memory["activations"])
        assert row["tokens_per_s"] == pytest.approx(4 * 64 / row["step_time_s"])
        assert 0 < row["mfu"] < 1
    categories = {r["category"] for r in advice_json["rejected"]}
    assert {"cannot be formed", "equivalent"} <= categories
    assert advice_json["cluster"] == "1x4xA100-80GB" and advice_json["seq"] == 64


def test_json_what_if_is_the_same_advice_on_the_changed_cluster(advice_json):
    (scenario,) = advice_json["what_if"]
    assert scenario["change"] == "device=H100-80GB"
    advice = scenario["advice"]
    assert advice["cluster"] == "1x4xH100-80GB"
    assert advice["rows"] and advice["recommended"]["reason"]
    fastest = min(r["step_time_s"] for r in advice_json["rows"])
    assert min(r["step_time_s"] for r in advice["rows"]) < fastest  # H100 is faster


def test_csv_has_one_line_per_shown_row(capsys):
    assert main([*BASE, *SMALL, "--no-planner", "--csv"]) == 0
    lines = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert lines and tuple(lines[0]) == CSV_COLUMNS
    assert {line["scenario"] for line in lines} == {"baseline"}
    assert all(line["kind"] == "configuration" for line in lines)
    assert len(lines) == 4
    steps = [float(line["step_time_s"]) for line in lines]
    assert steps == sorted(steps)
    assert sum(line["recommended"] == "True" for line in lines) <= 1
    for line in lines:
        parts = sum(float(line[f"{k}_bytes"]) for k in ("parameters", "gradients", "optimizer"))
        assert float(line["total_bytes"]) == pytest.approx(parts + float(line["activations_bytes"]))


def test_table_shows_the_ranking_and_the_recommendation(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main([*BASE, *SMALL, "--no-planner", "--what-if", "inter-host-gbps=400"]) == 0
    out = capsys.readouterr().out
    assert "recommended ★" in out and "ZeRO" in out and "tokens/s" in out
    assert "what if inter-host-gbps=400" in out and "change" in out
    assert "left out, cannot be formed" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--what-if", "gpus=3"], "unknown what-if key 'gpus'"),
        (["--top", "0"], "--top must be at least 1"),
        (["--micro-batch-sizes", "a"], "--micro-batch-sizes must be positive integers"),
    ],
)
def test_bad_options_are_one_line_errors(extra, message, capsys):
    assert main([*BASE, *extra]) == 2
    assert message in capsys.readouterr().err
