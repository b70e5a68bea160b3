"""ParallelPlan: JSON round trip, schema and type errors, validation, matching a graph/cluster."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from typing import Any

import pytest

from hierarchical_ap import HapError, PlanError
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.graph import OpGraph, capture
from hierarchical_ap.models import from_spec
from hierarchical_ap.plan import (
    SCHEMA_VERSION,
    MemoryBreakdown,
    ParallelPlan,
    PlanLayer,
    PlanStage,
    fingerprint,
    index_span,
    model_fingerprint,
)

CLUSTER = "1x4xA100-80GB"
GIB = 2**30
# planning layers of gpt-tiny: (name, OpGraph layers)
TINY_LAYERS = (
    ("embed+pos_embed", ("embed", "pos_embed")),
    ("blocks.0", ("blocks.0",)),
    ("blocks.1+norm+head", ("blocks.1", "norm", "head")),
)


def memory(activations: int = GIB) -> MemoryBreakdown:
    return MemoryBreakdown(
        parameters=GIB, gradients=GIB, optimizer=2 * GIB, activations=activations
    )


def stage(
    layers: tuple[int, int],
    devices: tuple[int, ...],
    *,
    devices_per_host: int = 4,
    logical_mesh: tuple[int, int] | None = None,
    placements: dict[str, tuple[str, ...]] | None = None,
) -> PlanStage:
    """A stage on `devices` (one block of whole or partial hosts) with consistent hosts/submesh."""
    hosts = tuple(sorted({d // devices_per_host for d in devices}))
    return PlanStage(
        layers=layers,
        hosts=hosts,
        devices=devices,
        submesh=(len(hosts), len(devices) // len(hosts)),
        logical_mesh=logical_mesh or (1, len(devices)),
        recompute="none",
        param_placements=placements or {},
        time_per_microbatch_s=0.01,
        memory=memory(),
    )


def plan_layers(nodes: list[tuple[str, str]] | None = None) -> tuple[PlanLayer, ...]:
    """gpt-tiny's planning layers; `nodes` gives each one's (first, last) node names."""
    nodes = nodes or [
        ("arange", "embedding_1"),
        ("layer_norm", "add_2"),
        ("layer_norm_2", "cross_entropy_loss"),
    ]
    return tuple(
        PlanLayer(name, module_layers, first, last)
        for (name, module_layers), (first, last) in zip(TINY_LAYERS, nodes, strict=True)
    )


def two_stage_plan(**changes: Any) -> ParallelPlan:
    """gpt-tiny in two stages of two devices on one 4-device host, 1F1B."""
    plan = ParallelPlan(
        model="gpt-tiny",
        model_fingerprint="0123456789abcdef",
        cluster=Cluster.from_spec(CLUSTER).to_dict(),
        global_batch=8,
        micro_batch_size=2,
        num_microbatches=4,
        schedule="1f1b",
        virtual_stages=1,
        precision="bf16",
        layers=plan_layers(),
        stages=(
            stage(
                (0, 1),
                (0, 1),
                placements={
                    "embed.weight": ("R", "S(0)"),
                    "blocks.0.attn.qkv_proj.weight": ("R", "S(0)"),
                },
            ),
            stage(
                (2, 2),
                (2, 3),
                logical_mesh=(2, 1),
                placements={"blocks.1.mlp.up_proj.weight": ("S(1)", "R")},
            ),
        ),
        predicted_step_time_s=0.05,
        predicted_peak_memory_bytes_per_device=5 * GIB,
        predicted_tflops_per_device=123.5,
        planning_time_s=1.25,
        seq_len=64,
        notes=("hand-written test plan",),
    )
    return dataclasses.replace(plan, **changes)


def interleaved_plan() -> ParallelPlan:
    """Four layers as four virtual stages on two ranks (one per host of a 2x2 cluster)."""
    layers = tuple(PlanLayer(f"l{i}", (), f"n{i}", f"n{i}") for i in range(4))
    return ParallelPlan(
        model="toy",
        model_fingerprint="fedcba9876543210",
        cluster=Cluster.from_spec("2x2xA100-80GB").to_dict(),
        global_batch=16,
        micro_batch_size=4,
        num_microbatches=4,
        schedule="interleaved",
        virtual_stages=2,
        precision="fp32",
        layers=layers,
        stages=tuple(stage((i, i), ((0, 1), (2, 3))[i % 2], devices_per_host=2) for i in range(4)),
        predicted_step_time_s=1.0,
        predicted_peak_memory_bytes_per_device=GIB,
        predicted_tflops_per_device=10.0,
    )


def with_stage(plan: ParallelPlan, index: int, **changes: Any) -> ParallelPlan:
    stages = list(plan.stages)
    stages[index] = dataclasses.replace(stages[index], **changes)
    return dataclasses.replace(plan, stages=tuple(stages))


def capture_spec(spec: str) -> OpGraph:
    bundle = from_spec(spec, batch=2)
    return capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )


@pytest.fixture(scope="module")
def tiny_graph() -> OpGraph:
    return capture_spec("gpt-tiny")


@pytest.fixture(scope="module")
def tiny_plan(tiny_graph: OpGraph) -> ParallelPlan:
    """The two-stage plan made for the captured gpt-tiny graph."""
    nodes = []
    for _, module_layers in TINY_LAYERS:
        first = tiny_graph.layer(module_layers[0]).nodes[0]
        nodes.append((first, tiny_graph.layer(module_layers[-1]).nodes[-1]))
    return two_stage_plan(
        layers=plan_layers(nodes), model_fingerprint=model_fingerprint(tiny_graph)
    )


# ------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("make", [two_stage_plan, interleaved_plan])
def test_json_round_trip_is_exact(make):
    plan = make()
    plan.validate()
    text = plan.to_json()
    assert ParallelPlan.from_json(text) == plan
    assert ParallelPlan.from_dict(json.loads(text)) == plan
    assert ParallelPlan.from_json(ParallelPlan.from_json(text).to_json()) == plan


@pytest.mark.parametrize("make", [two_stage_plan, interleaved_plan])
def test_pickle_and_copy_round_trip(make):
    plan = make()
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert pickle.loads(pickle.dumps(plan.stages[0])) == plan.stages[0]
    assert copy.deepcopy(plan) == plan


def test_save_load_round_trip(tmp_path):
    plan = two_stage_plan()
    path = plan.save(tmp_path / "plan.json")
    assert ParallelPlan.load(path) == plan
    assert ParallelPlan.load(str(path)).to_json() == plan.to_json()


def test_json_layout_uses_the_field_names():
    data = json.loads(two_stage_plan().to_json())
    assert next(iter(data)) == "schema_version"
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["cluster"]["num_hosts"] == 1
    assert data["layers"][0] == {
        "name": "embed+pos_embed",
        "module_layers": ["embed", "pos_embed"],
        "first_node": "arange",
        "last_node": "embedding_1",
    }
    s = data["stages"][1]
    assert s["layers"] == [2, 2] and s["hosts"] == [0] and s["devices"] == [2, 3]
    assert s["submesh"] == [1, 2] and s["logical_mesh"] == [2, 1] and s["recompute"] == "none"
    assert s["param_placements"] == {"blocks.1.mlp.up_proj.weight": ["S(1)", "R"]}
    assert s["memory"] == {
        "parameters": GIB,
        "gradients": GIB,
        "optimizer": 2 * GIB,
        "activations": GIB,
    }


def test_constructors_turn_lists_into_tuples():
    layer = PlanLayer("a", ["x", "y"], "n0", "n1")  # type: ignore[arg-type]
    assert layer.module_layers == ("x", "y")
    s = with_stage(two_stage_plan(), 0, devices=[0, 1], param_placements={"w": ["R", "S(0)"]})
    assert s.stages[0].devices == (0, 1)
    assert s.stages[0].param_placements["w"] == ("R", "S(0)")
    assert ParallelPlan.from_json(s.to_json()) == s


def test_plan_properties():
    plan, inter = two_stage_plan(), interleaved_plan()
    assert (plan.num_ranks, plan.num_devices) == (2, 4)
    assert (inter.num_ranks, inter.num_devices) == (2, 4)
    assert memory(activations=3).total == 4 * GIB + 3


def test_str_is_a_short_summary_and_repr_keeps_every_field():
    plan, inter = two_stage_plan(), interleaved_plan()
    lines = str(plan).splitlines()
    assert lines[0] == "gpt-tiny: 2 stage(s), schedule 1f1b, 4 micro-batches of 2, bf16"
    assert lines[1].startswith(
        f"  stage 0: {TINY_LAYERS[0][0]} … {TINY_LAYERS[1][0]} on device(s) 0-1,"
    )
    assert "mesh 2x1, recompute none, 10.00 ms per micro-batch" in lines[2]
    assert lines[-1] == "predicted step 50.00 ms, peak 5.00 GiB per device"
    assert (
        str(inter)
        .splitlines()[0]
        .endswith("schedule interleaved (v=2), 4 micro-batches of 4, fp32")
    )
    assert "param_placements" in repr(plan) and "param_placements" not in str(plan)
    assert [index_span(ids) for ids in ((3,), (0, 1, 2, 3), (0, 2))] == ["3", "0-3", "0,2"]


def test_plan_error_is_a_hap_value_error():
    assert issubclass(PlanError, HapError) and issubclass(PlanError, ValueError)
    with pytest.raises(PlanError) as info:
        two_stage_plan(global_batch=7).validate()
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, PlanError) and str(copy) == str(info.value)


# --------------------------------------------------------------------------- loading errors


def test_schema_version_mismatch():
    data = two_stage_plan().to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(PlanError, match=r"schema_version.*hap plan"):
        ParallelPlan.from_dict(data)
    del data["schema_version"]
    with pytest.raises(PlanError, match=r"no 'schema_version'.*hap plan"):
        ParallelPlan.from_dict(data)
    with pytest.raises(PlanError, match="schema_version"):
        ParallelPlan.from_json("[1, 2]")


def _edit(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set the item at `path` of nested JSON data to `value`, or delete it when `value` is `...`."""
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is ...:
        del data[last]
    else:
        data[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("stages",), ..., r"'stages' is missing"),
        (("stages", 1, "devices"), ..., r"'stages\[1\]\.devices' is missing"),
        (("stages", 0, "memory", "optimizer"), ..., r"'stages\[0\]\.memory\.optimizer' is missing"),
        (("layers", 2, "last_node"), ..., r"'layers\[2\]\.last_node' is missing"),
        (("stages", 0, "extra"), 1, r"'stages\[0\]\.extra' is not a field"),
        (("global_batch",), "8", r"'global_batch' must be an integer"),
        (("global_batch",), True, r"'global_batch' must be an integer"),
        (("predicted_step_time_s",), "fast", r"'predicted_step_time_s' must be a finite number"),
        (("planning_time_s",), [], r"'planning_time_s' must be a finite number"),
        (("layers",), {}, r"'layers' must be a list"),
        (("layers", 1), "blocks.0", r"'layers\[1\]' must be a JSON object"),
        (("layers", 0, "module_layers", 1), 3, r"'layers\[0\]\.module_layers\[1\]' must be a str"),
        (("stages", 1, "devices", 0), 2.0, r"'stages\[1\]\.devices\[0\]' must be an integer"),
        (("stages", 1, "logical_mesh"), [2, 1, 1], r"'stages\[1\]\.logical_mesh' must be two"),
        (("stages", 0, "memory", "parameters"), 1.5, r"'stages\[0\]\.memory\.parameters' must be"),
        (("stages", 0, "memory"), 5, r"'stages\[0\]\.memory' must be a JSON object"),
        (("stages", 0, "param_placements"), [], r"'stages\[0\]\.param_placements' must be a JSON"),
        (
            ("stages", 1, "param_placements", "blocks.1.mlp.up_proj.weight"),
            "S(1)",
            r"'stages\[1\]\.param_placements\['blocks\.1\.mlp\.up_proj\.weight'\]' must be a list",
        ),
        (("notes",), "a note", r"'notes' must be a list"),
        (("cluster", "num_hosts"), 0, r"'cluster' must be `Cluster\.to_dict\(\)` of a valid"),
        (("cluster",), "1x4xA100-80GB", r"'cluster' must be a JSON object"),
    ],
)
def test_malformed_plan_names_the_field(path, value, message):
    data = two_stage_plan().to_dict()
    _edit(data, path, value)
    with pytest.raises(PlanError, match=message) as info:
        ParallelPlan.from_json(json.dumps(data))
    assert "hap plan" in str(info.value)


def test_optional_fields_may_be_left_out():
    data = two_stage_plan(planning_time_s=None, seq_len=None, notes=()).to_dict()
    for key in ("planning_time_s", "seq_len", "notes"):
        del data[key]
    assert ParallelPlan.from_dict(data) == two_stage_plan(
        planning_time_s=None, seq_len=None, notes=()
    )


def test_non_finite_numbers_and_bad_json_are_refused(tmp_path):
    text = (
        two_stage_plan()
        .to_json()
        .replace('"predicted_step_time_s": 0.05', '"predicted_step_time_s": NaN')
    )
    with pytest.raises(PlanError, match="'predicted_step_time_s' must be a finite number"):
        ParallelPlan.from_json(text)
    with pytest.raises(PlanError, match="not valid JSON"):
        ParallelPlan.from_json("{")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(PlanError, match=r"bad\.json.*not valid JSON"):
        ParallelPlan.load(bad)
    with pytest.raises(PlanError, match=r"no plan file .*missing\.json.*hap plan"):
        ParallelPlan.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------- validation


def _stage0(**changes: Any):
    return lambda plan: with_stage(plan, 0, **changes)


def _stage1(**changes: Any):
    return lambda plan: with_stage(plan, 1, **changes)


def _plan(**changes: Any):
    return lambda plan: dataclasses.replace(plan, **changes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_plan(global_batch=7), r"'global_batch' must equal micro_batch_size x num_microbatches"),
        (_plan(micro_batch_size=0, global_batch=0), r"'global_batch' must be >= 1"),
        (_plan(num_microbatches=0), r"'num_microbatches' must be >= 1"),
        (_plan(seq_len=0), r"'seq_len' must be >= 1"),
        (_plan(schedule="zero-bubble"), r"'schedule' must be one of"),
        (_plan(virtual_stages=2), r"'virtual_stages' must be 1 for the '1f1b' schedule"),
        (_plan(schedule="interleaved"), r"'virtual_stages' must be >= 2 for the interleaved"),
        (_plan(virtual_stages=0, schedule="interleaved"), r"'virtual_stages' must be >= 2"),
        (_plan(schedule="interleaved", virtual_stages=3), r"'stages' must be a positive multiple"),
        (_plan(stages=()), r"'stages' must be a positive multiple"),
        (_plan(precision="fp8"), r"'precision' must be one of"),
        (_plan(schema_version=2), r"'schema_version' must be 1"),
        (_plan(predicted_step_time_s=-1.0), r"'predicted_step_time_s' must be >= 0"),
        (_plan(predicted_peak_memory_bytes_per_device=-1), r"'predicted_peak_memory_bytes_per"),
        (_plan(planning_time_s=-0.5), r"'planning_time_s' must be >= 0"),
        (_plan(layers=()), r"'layers' must hold at least one"),
        (
            lambda p: dataclasses.replace(
                p, layers=(*p.layers[:2], dataclasses.replace(p.layers[2], name="blocks.0"))
            ),
            r"'layers\[2\]\.name' must be a unique",
        ),
        (_stage0(layers=(1, 1)), r"'stages\[0\]\.layers' must be \[first, last\] with first == 0"),
        (_stage0(layers=(0, 0)), r"'stages\[1\]\.layers' must be \[first, last\] with first == 1"),
        (_stage1(layers=(2, 1)), r"'stages\[1\]\.layers' .*last >= first"),
        (_stage1(layers=(2, 3)), r"'stages\[1\]\.layers' must end at the last layer 2"),
        (_stage1(recompute="some"), r"'stages\[1\]\.recompute' must be one of"),
        (_stage1(time_per_microbatch_s=-1.0), r"'stages\[1\]\.time_per_microbatch_s' must be >="),
        (_stage1(memory=memory(activations=-1)), r"'stages\[1\]\.memory\.activations' must be"),
        (_stage1(devices=(2, 2)), r"'stages\[1\]\.devices' must be distinct"),
        (_stage1(devices=(2, 4)), r"'stages\[1\]\.devices' must be distinct ids of .* 0\.\.3"),
        (_stage1(devices=(-1, 2)), r"'stages\[1\]\.devices' must be distinct ids"),
        (_stage1(devices=()), r"'stages\[1\]\.devices' must be distinct ids"),
        (_stage1(logical_mesh=(2, 2)), r"'stages\[1\]\.logical_mesh' must be two integers >= 1"),
        (_stage1(logical_mesh=(0, 2)), r"'stages\[1\]\.logical_mesh'"),
        (_stage1(submesh=(2, 1)), r"'stages\[1\]\.submesh' must be \(hosts, devices per host\)"),
        (_stage1(hosts=(1,)), r"'stages\[1\]\.hosts' must be the hosts of its devices, \[0\]"),
        (_stage1(devices=(1, 2)), r"'stages\[1\]\.devices' reuses device 1 of stages\[0\]"),
        (
            _stage1(devices=(2,), submesh=(1, 1), logical_mesh=(1, 1)),
            r"'stages' must use every device of the cluster; unused: \[3\]",
        ),
        (
            _stage1(param_placements={"w": ("P", "R")}),
            r"'stages\[1\]\.param_placements\['w'\]' has 'P'.*never 'P'",
        ),
        (
            _stage1(param_placements={"w": ("S(-1)", "R")}),
            r"param_placements\['w'\]' has 'S\(-1\)'",
        ),
        (_stage1(param_placements={"w": ("S(x)", "R")}), r"param_placements\['w'\]' has 'S\(x\)'"),
        (_stage1(param_placements={"w": ("R",)}), r"param_placements\['w'\]' must hold one"),
    ],
)
def test_validation_error_names_the_field(change, message):
    with pytest.raises(PlanError, match=message) as info:
        change(two_stage_plan()).validate()
    assert "hap plan" in str(info.value)


def test_constructor_type_errors_name_the_field():
    with pytest.raises(PlanError, match=r"'devices' must be a list"):
        with_stage(two_stage_plan(), 0, devices="0,1")
    with pytest.raises(PlanError, match=r"'stages\[1\]' must be a PlanStage"):
        two_stage_plan(stages=(two_stage_plan().stages[0], {"layers": [2, 2]}))
    with pytest.raises(PlanError, match=r"'predicted_tflops_per_device' must be a finite number"):
        two_stage_plan(predicted_tflops_per_device=float("inf"))


def test_multi_host_stages_use_whole_hosts():
    two_hosts = Cluster.from_spec("2x2xA100-80GB").to_dict()
    whole = stage((0, 2), (0, 1, 2, 3), devices_per_host=2, logical_mesh=(2, 2))
    two_stage_plan(cluster=two_hosts, stages=(whole,)).validate()
    # one device of each host: two hosts x 1 device is not an Alpa submesh
    split = [
        stage((0, 0), (0, 2), devices_per_host=2),
        stage((1, 2), (1, 3), devices_per_host=2),
    ]
    with pytest.raises(PlanError, match=r"'stages\[0\]\.submesh' must use whole hosts"):
        two_stage_plan(cluster=two_hosts, stages=tuple(split)).validate()


def test_interleaved_stages_share_their_ranks_devices():
    plan = interleaved_plan()
    plan.validate()
    swapped = with_stage(plan, 2, devices=(2, 3), hosts=(1,))
    with pytest.raises(PlanError, match=r"'stages\[2\]\.devices' must equal those of stages\[0\]"):
        swapped.validate()
    reversed_order = with_stage(plan, 3, devices=(3, 2))
    with pytest.raises(PlanError, match=r"'stages\[3\]\.devices' must equal those of stages\[1\]"):
        reversed_order.validate()


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_is_order_independent_and_sensitive():
    shapes = {"a.weight": ((4, 8), "float32"), "b.bias": ((8,), "float32")}
    fp = fingerprint(shapes)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(dict(reversed(shapes.items()))) == fp
    assert fingerprint({**shapes, "b.bias": ((9,), "float32")}) != fp
    assert fingerprint({**shapes, "b.bias": ((8,), "bfloat16")}) != fp
    assert fingerprint({"c.weight": ((4, 8), "float32"), "b.bias": ((8,), "float32")}) != fp


def test_model_fingerprint_of_a_graph(tiny_graph):
    shapes = {
        fqn: (meta.shape, str(meta.dtype).removeprefix("torch."))
        for fqn, meta in tiny_graph.param_shapes.items()
    }
    assert model_fingerprint(tiny_graph) == fingerprint(shapes)
    assert shapes["embed.weight"] == ((512, 64), "float32")


# ---------------------------------------------------------------------------- check_matches


def test_check_matches_the_right_graph_and_cluster(tiny_plan, tiny_graph):
    tiny_plan.check_matches(tiny_graph, Cluster.from_spec(CLUSTER))


def test_check_matches_refuses_another_model(tiny_plan):
    other = capture_spec("gpt-tiny:hidden=32")
    with pytest.raises(PlanError, match=r"different model: 'gpt-tiny'.*re-plan with `hap plan`"):
        tiny_plan.check_matches(other, Cluster.from_spec(CLUSTER))


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("1x4xH100-80GB", "1x4xH100-80GB"),
        ("2x4xA100-80GB", "2x4xA100-80GB"),
        ("1x8xA100-80GB", "1x8xA100-80GB"),
    ],
)
def test_check_matches_refuses_another_cluster(tiny_plan, tiny_graph, spec, shown):
    with pytest.raises(
        PlanError, match=rf"made for a 1x4xA100-80GB cluster but this cluster is {shown}; re-plan"
    ):
        tiny_plan.check_matches(tiny_graph, Cluster.from_spec(spec))


def test_check_matches_ignores_link_details(tiny_plan, tiny_graph):
    data = Cluster.from_spec(CLUSTER).to_dict()
    data["inter_host_link"]["bandwidth"] *= 2
    tiny_plan.check_matches(tiny_graph, Cluster.from_dict(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: dataclasses.replace(
                p, layers=(dataclasses.replace(p.layers[0], first_node="nope"), *p.layers[1:])
            ),
            r"'layers\[0\]\.first_node' names node 'nope', which the graph lacks",
        ),
        (
            lambda p: dataclasses.replace(
                p, layers=(*p.layers[:2], dataclasses.replace(p.layers[2], last_node="nope"))
            ),
            r"'layers\[2\]\.last_node' names node 'nope'",
        ),
        (
            lambda p: dataclasses.replace(
                p, layers=(dataclasses.replace(p.layers[0], module_layers=("wte",)), *p.layers[1:])
            ),
            r"'layers\[0\]\.module_layers' names layers the graph lacks: \['wte'\]",
        ),
        (
            _stage1(param_placements={"blocks.9.mlp.up_proj.weight": ("R", "R")}),
            r"'stages\[1\]\.param_placements\['blocks\.9\.mlp\.up_proj\.weight'\]' names a param",
        ),
        (
            _stage0(param_placements={"blocks.0.attn_norm.weight": ("S(1)", "R")}),
            r"'stages\[0\]\.param_placements\['blocks\.0\.attn_norm\.weight'\]' shards dimension 1",
        ),
        (_plan(global_batch=3), r"'global_batch' must equal"),
    ],
)
def test_check_matches_refuses_unknown_nodes_and_params(tiny_plan, tiny_graph, change, message):
    with pytest.raises(PlanError, match=message):
        change(tiny_plan).check_matches(tiny_graph, Cluster.from_spec(CLUSTER))
