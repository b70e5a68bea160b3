"""The plan pictures draw what the plan and the simulator's timeline say: one cell per device in
its rank's colour, one bar per timed task, bubbles exactly where a rank waits, memory bars that
add up to the stage's predicted memory, and `hap show` files that are what they claim to be."""

from __future__ import annotations

import base64
import dataclasses
import math
import re

import pytest
from matplotlib.figure import Figure

from hierarchical_ap.cli import main
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.schedules import BACKWARD, FORWARD
from hierarchical_ap.visualize import html_report, plan_figure, png_bytes, stage_rows
from hierarchical_ap.visualize.cluster_grid import DEVICES_GID, draw_cluster_grid
from hierarchical_ap.visualize.gantt import BUBBLE_GID, SYNC_GID, draw_gantt, idle_intervals
from hierarchical_ap.visualize.memory import CAPACITY_GID, COMPONENTS, draw_memory, memory_unit
from hierarchical_ap.visualize.style import rank_color
from hierarchical_ap.visualize.table import compact_ranges, display_placement, name_pattern
from hierarchical_ap.visualize.units import format_bytes, format_seconds, three_digits
from stage_partitioner.manual import ManualConfig, simulate_manual
from stage_partitioner.model_planning import capture_spec, planning_context
from stage_partitioner.planner import PlannerOptions, plan_in_context, to_parallel_plan

SPEC = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=32"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def graph():
    return capture_spec(SPEC, seq=None, precision="bf16")


@pytest.fixture(scope="module")
def planned(graph):
    """The planner's plan on one host of 4 devices."""
    cluster = Cluster.from_spec("1x4xA100-80GB")
    options = PlannerOptions(global_batch=16, workers=1, microbatch_sizes=[8])
    context = planning_context(graph, cluster, options, "bf16")
    return plan_in_context(context, model_name=SPEC, precision="bf16")


@pytest.fixture(scope="module")
def interleaved(graph):
    """A hand configuration on one host: interleaved 1F1B, 2 ranks of 2 devices, v = 2."""
    cluster = Cluster.from_spec("1x4xA100-80GB")
    context = planning_context(graph, cluster, PlannerOptions(global_batch=16, workers=1), "bf16")
    config = ManualConfig(
        tp=1, pp=2, dp=2, micro_batch_size=2, schedule="interleaved", virtual_stages=2
    )
    candidate, simulation = simulate_manual(context, config)
    plan = to_parallel_plan(
        candidate, simulation, graph, cluster, context.solver, model_name=SPEC, precision="bf16"
    )
    return plan, simulation


@pytest.fixture(scope="module")
def pipelined(graph):
    """A hand configuration over 2 hosts: 4 pipeline ranks of 2 data-parallel devices, 1F1B."""
    cluster = Cluster.from_spec("2x4xA100-80GB")
    context = planning_context(graph, cluster, PlannerOptions(global_batch=16, workers=1), "bf16")
    candidate, simulation = simulate_manual(
        context, ManualConfig(tp=1, pp=4, dp=2, micro_batch_size=2)
    )
    plan = to_parallel_plan(
        candidate, simulation, graph, cluster, context.solver, model_name=SPEC, precision="bf16"
    )
    return plan, simulation


CASES = ["planned", "pipelined", "interleaved"]


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(request.param)


def _expected_ranks(plan) -> dict[int, int]:
    """Device -> pipeline rank, straight from the stages (stage i runs on rank i % p)."""
    p = len(plan.stages) // plan.virtual_stages
    return {d: i % p for i, stage in enumerate(plan.stages) for d in stage.devices}


def _spans(collection) -> list[tuple[float, float, float]]:
    """(x start, x end, y bottom) of each rectangle of a PolyCollection, in path order."""
    spans = []
    for path in collection.get_paths():
        xs, ys = path.vertices[:, 0], path.vertices[:, 1]
        spans.append((float(xs.min()), float(xs.max()), float(ys.min())))
    return spans


def _row_rank(y: float, num_ranks: int) -> int:
    return num_ranks - 1 - math.floor(y)


def test_the_cases_cover_interleaving_and_several_hosts(interleaved, pipelined):
    assert interleaved[0].virtual_stages == 2 and interleaved[0].num_ranks == 2
    assert pipelined[0].schedule == "1f1b" and pipelined[0].num_ranks == 4
    assert pipelined[0].cluster["num_hosts"] == 2


def test_cluster_grid_has_one_cell_per_device_in_its_ranks_colour(case):
    plan, _ = case
    ax = Figure().add_subplot()
    grid = draw_cluster_grid(ax, plan)
    assert grid.get_gid() == DEVICES_GID
    assert [c for c in ax.collections if c.get_gid() == DEVICES_GID] == [grid]
    expected = _expected_ranks(plan)
    num_devices = plan.cluster["num_hosts"] * plan.cluster["devices_per_host"]
    assert sorted(expected) == list(range(num_devices))
    colors = grid.get_facecolors()
    assert len(grid.get_paths()) == len(colors) == num_devices
    for device, rank in expected.items():
        assert tuple(colors[device]) == pytest.approx(rank_color(rank, plan.num_ranks))
    distinct = {tuple(rank_color(r, plan.num_ranks)) for r in range(plan.num_ranks)}
    assert len(distinct) == plan.num_ranks
    # the cells of one host share a row, and no two cells overlap
    cells = _spans(grid)
    per_host = plan.cluster["devices_per_host"]
    for device, (x0, _, y0) in enumerate(cells):
        host_start = cells[device - device % per_host]
        assert y0 == host_start[2]
        assert x0 == pytest.approx(host_start[0] + device % per_host)
    assert len({(round(x0, 6), y0) for x0, _, y0 in cells}) == num_devices


def test_rank_colours_stay_distinct_for_many_ranks():
    for num_ranks in (3, 12, 20, 64):
        colours = {rank_color(r, num_ranks) for r in range(num_ranks)}
        assert len(colours) == num_ranks
    with pytest.raises(ValueError, match="rank 4 is not in 0..3"):
        rank_color(4, 4)


def test_gantt_bars_are_the_timeline_tasks(case):
    plan, simulation = case
    timeline = simulation.timeline
    drawn = draw_gantt(Figure().add_subplot(), timeline, plan.num_ranks)
    expected_count = 2 * plan.num_microbatches * len(plan.stages)
    assert len(timeline.tasks) == expected_count
    total = 0
    for kind in (FORWARD, BACKWARD):
        bars = drawn[kind]
        assert bars.get_gid() == kind
        got = sorted((_row_rank(y, plan.num_ranks), a, b) for a, b, y in _spans(bars))
        want = sorted((t.rank, t.start, t.end) for t in timeline.tasks if t.task.kind == kind)
        assert len(got) == len(want) == plan.num_microbatches * len(plan.stages)
        assert got == want  # the very floats of the timeline
        total += len(got)
    assert total == expected_count


def test_bubbles_are_the_idle_intervals_and_the_chart_ends_at_the_step(case):
    plan, simulation = case
    p = plan.num_ranks
    # the work that closes a rank's step: its gradient sync and its optimizer step
    sync = [
        sum(s.gradient_sync_s + s.optimizer_s for s in simulation.stages[r::p]) for r in range(p)
    ]
    drawn = draw_gantt(Figure().add_subplot(), simulation.timeline, p, gradient_sync_s=sync)
    step = simulation.step_time_s
    assert step == pytest.approx(plan.predicted_step_time_s)
    bubbles = [[] for _ in range(p)]
    for a, b, y in _spans(drawn[BUBBLE_GID]):
        bubbles[_row_rank(y, p)].append((a, b))
    syncs = {_row_rank(y, p): (a, b) for a, b, y in _spans(drawn[SYNC_GID])}
    assert bubbles == idle_intervals(simulation.timeline, p, sync)
    for rank in range(p):
        tasks = [(t.start, t.end) for t in simulation.timeline.tasks if t.rank == rank]
        last_end = max(end for _, end in tasks)
        assert syncs[rank] == (last_end, last_end + sync[rank])
        # tasks, sync and bubbles tile [0, step) without overlap
        pieces = sorted(tasks + [syncs[rank]] + bubbles[rank])
        clock = 0.0
        for start, end in pieces:
            assert start == pytest.approx(clock, abs=1e-12)
            clock = end
        assert clock == pytest.approx(step)
        idle = step - sum(b - a for a, b in tasks) - sync[rank]
        assert sum(b - a for a, b in bubbles[rank]) == pytest.approx(idle, abs=1e-12)
    # a pipeline of several ranks waits somewhere: its bubbles are drawn
    assert len(drawn[BUBBLE_GID].get_paths()) > 0


def test_memory_bars_add_up_to_each_stages_predicted_memory(case):
    plan, _ = case
    bars = draw_memory(Figure().add_subplot(), plan)
    assert tuple(bars) == COMPONENTS == ("parameters", "gradients", "optimizer", "activations")
    _, size = memory_unit(plan)
    for index, stage in enumerate(plan.stages):
        rank = index % plan.num_ranks
        heights = {name: bars[name].patches[rank].get_height() * size for name in COMPONENTS}
        for name in COMPONENTS:
            assert heights[name] == pytest.approx(getattr(stage.memory, name), rel=1e-9)
        assert sum(heights.values()) == pytest.approx(stage.memory.total, rel=1e-9)
        # stacked: each component starts where the one below ends
        bottom = 0.0
        for name in COMPONENTS:
            assert bars[name].patches[rank].get_y() * size == pytest.approx(bottom, abs=1)
            bottom += heights[name]


def test_memory_chart_draws_the_device_capacity_when_it_is_in_view(planned):
    plan, _ = planned
    far = Figure().add_subplot()
    draw_memory(far, plan)
    assert not [line for line in far.get_lines() if line.get_gid() == CAPACITY_GID]
    assert "device capacity 80.0 GiB, off the scale" in far.get_title()

    device = dict(
        plan.cluster["device"], memory_bytes=2 * plan.predicted_peak_memory_bytes_per_device
    )
    small = dataclasses.replace(plan, cluster=dict(plan.cluster, device=device))
    near = Figure().add_subplot()
    draw_memory(near, small)
    (line,) = [line for line in near.get_lines() if line.get_gid() == CAPACITY_GID]
    _, size = memory_unit(small)
    assert line.get_ydata()[0] * size == pytest.approx(device["memory_bytes"])


def test_stage_rows_name_layers_devices_and_every_placement(case):
    plan, _ = case
    rows = stage_rows(plan)
    assert [r.stage for r in rows] == list(range(len(plan.stages)))
    for row, stage in zip(rows, plan.stages, strict=True):
        assert row.rank == row.stage % plan.num_ranks
        assert plan.layers[stage.layers[0]].name in row.layers
        assert plan.layers[stage.layers[1]].name in row.layers
        assert row.mesh == "x".join(map(str, stage.logical_mesh))
        assert sum(g.count for g in row.placements) == len(stage.param_placements)
        placements = {display_placement(p) for p in stage.param_placements.values()}
        assert {g.placement for g in row.placements} == placements


def test_units_keep_three_significant_digits():
    assert [three_digits(v) for v in (1, 14, 9.996, 886.4, 1234, 0.0123, 0)] == [
        "1.00",
        "14.0",
        "10.0",
        "886",
        "1230",
        "0.0123",
        "0",
    ]
    assert format_bytes(3 * 2**30) == "3.00 GiB" and format_bytes(512) == "512 B"
    assert format_seconds(0.0143) == "14.3 ms" and format_seconds(2.5e-6) == "2.50 µs"


def test_table_helpers():
    assert name_pattern("blocks.17.attn.qkv.weight") == "blocks.*.attn.qkv.weight"
    assert display_placement(["S(0)", "R"]) == "S0R"
    assert display_placement(["R", "S(12)"]) == "RS12"
    assert compact_ranges([9, 0, 1, 2, 3, 8]) == "0-3, 8-9"
    assert compact_ranges([5]) == "5"


def test_plan_figure_renders_to_png(planned):
    plan, simulation = planned
    data = png_bytes(plan_figure(plan, simulation))
    assert data.startswith(PNG_MAGIC)
    assert png_bytes(plan_figure(plan)).startswith(PNG_MAGIC)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_hap_show_writes_a_png_and_a_self_contained_html(planned, tmp_path, capsys):
    plan, _ = planned
    path = plan.save(tmp_path / "plan.json")
    png, page = tmp_path / "plan.png", tmp_path / "plan.html"
    assert main(["show", str(path), "--png", str(png), "--html", str(page)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    images = _images(text)
    assert len(images) == 3  # cluster, schedule, memory
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing to fetch
    table = text[text.index('<table class="stages">') :]
    assert table.count("<tr>") == 1 + len(plan.stages)
    for layer in plan.layers:
        assert layer.name in table
    for fqn in next(iter(plan.stages)).param_placements:
        assert name_pattern(fqn) in table


def test_hap_show_without_a_simulation_still_draws_the_rest(planned, tmp_path, capsys):
    plan, _ = planned
    path = dataclasses.replace(plan, model="my_model").save(tmp_path / "plan.json")
    page = tmp_path / "plan.html"
    assert main(["show", str(path), "--html", str(page)]) == 0
    err = capsys.readouterr().err
    assert "could not be simulated again" in err and "my_model" in err
    text = page.read_text(encoding="utf-8")
    assert len(_images(text)) == 2  # cluster, memory
    assert "the schedule is not drawn" in text


def test_hap_show_prints_the_stage_and_memory_tables(pipelined, tmp_path, capsys):
    plan, _ = pipelined
    path = plan.save(tmp_path / "plan.json")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stages" in out and "memory per device (capacity 80.0 GiB)" in out
    for row in stage_rows(plan):
        assert re.search(rf"│ {row.stage} +│ {re.escape(row.layers[:8])}", out)
    assert "1f1b" in out


def test_hap_show_errors_name_the_cause(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing.json")]) == 2
    assert "no plan file" in capsys.readouterr().err
    (tmp_path / "plan.json").write_text("{}")
    assert main(["show", str(tmp_path / "plan.json")]) == 2
    assert "schema_version" in capsys.readouterr().err


def test_hap_show_refuses_an_output_directory_that_does_not_exist(planned, tmp_path, capsys):
    path = planned[0].save(tmp_path / "plan.json")
    assert main(["show", str(path), "--png", str(tmp_path / "no" / "plan.png")]) == 2
    err = capsys.readouterr().err
    assert f"directory {tmp_path / 'no'} does not exist" in err
    assert not (tmp_path / "no").exists()


def test_html_report_escapes_the_model_name(planned):
    plan, _ = planned
    text = html_report(dataclasses.replace(plan, model="<b>m</b>"), None, "no run")
    assert "<b>m</b>" not in text and "&lt;b&gt;m&lt;/b&gt;" in text
