"""Applying sharding solutions with DTensor on real gloo processes, checked against one process.

Every case captures a model on the meta device, builds the same weights and batch on every rank
(fixed seeds), runs the sharded program forward and backward on a 1×4 or 2×2 CPU mesh and
compares the loss and every parameter gradient with plain single-process training.

Most solutions are built by hand: parameters and inputs are placed as a scenario says
(replicated, data parallel, ZeRO-3, Megatron tensor parallel or combinations) and
``propagate_solution`` records the node placements DTensor picks from there; the "forced"
scenarios then overwrite node placements to exercise the redistribution path. A few come from
the intra-op ILP under a tight memory budget. The four worker processes are spawned once for
the module and run every case.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hierarchical_ap import capture
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.models import from_spec, materialize
from intra_op import solve_sharding
from intra_op.apply import (
    InvalidSolutionError,
    ShardingExecutionError,
    apply,
    full_value,
    propagate_solution,
    validate_solution,
)
from intra_op.placement import Placements, Replicate, Shard
from intra_op.solution import ShardingSolution
from tests.distributed import DistributedWorkers
from tests.reference_models import MLP, SmallCNN, class_loss

WORLD = 4
TOLERANCE = 1e-5
BATCH, SEQ = 4, 8
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class ModelCase:
    """How to build a model (on any device) with a batch, and which linears are row-parallel."""

    build: Callable[[str], tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Callable]]
    row_parallel: str
    """Regex on parameter FQNs of the second linear of each Megatron pair."""


def _zoo(spec: str) -> Callable[[str], Any]:
    def build(device: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Callable]:
        bundle = from_spec(spec, batch=BATCH, seq=SEQ, device=device)
        model = bundle.model
        if device != "meta" and any(p.is_meta for p in model.parameters()):
            materialize(model)
        return model, bundle.example_inputs, bundle.targets, bundle.loss_fn

    return build


def _reference(model_cls: type[nn.Module], input_shape: tuple[int, ...]) -> Callable[[str], Any]:
    def build(device: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Callable]:
        with torch.device(device):
            model = model_cls()
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(input_shape, generator=generator).to(device)
        y = torch.randint(10, (input_shape[0],), generator=generator).to(device)
        return model, (x,), y, class_loss

    return build


MODELS = {
    "mlp": ModelCase(_reference(MLP, (BATCH, 32)), r"net\.2\.|^out\."),
    "cnn": ModelCase(_reference(SmallCNN, (BATCH, 3, 8, 8)), r"^$"),
    "gpt": ModelCase(_zoo("gpt-tiny"), r"o_proj|down_proj"),
    "llama": ModelCase(_zoo("llama-tiny"), r"o_proj|down_proj"),
    "hf-gpt2": ModelCase(
        _zoo("hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=256,n_positions=64"), r"c_proj"
    ),
    "hf-llama": ModelCase(
        _zoo(
            "hf:llama:num_hidden_layers=2,hidden_size=64,intermediate_size=128,"
            "num_attention_heads=4,num_key_value_heads=2,vocab_size=256"
        ),
        r"o_proj|down_proj",
    ),
}


# ---------------------------------------------------------------- solutions built by hand


def _axis_placements(mesh_ndim: int, axis: int, placement: Any) -> Placements:
    return tuple(placement if a == axis else Replicate() for a in range(mesh_ndim))


_LINEARS = {"aten.linear.default": (1, 2, False), "aten.addmm.default": (2, 0, True)}
"""Linear-like op → (weight input, bias input, whether the weight is stored (in, out))."""


def _megatron_params(graph: OpGraph, row_parallel: str) -> dict[str, Any]:
    """Megatron's tensor-parallel placement of each parameter on one mesh axis.

    Column-parallel linears split their output features (and bias), row-parallel ones their
    input features; embeddings are vocabulary-parallel; everything else is replicated.
    ``transformers``' GPT-2 ``Conv1D`` (``addmm`` with a (in, out) weight) is transposed.
    """
    placements: dict[str, Any] = dict.fromkeys(graph.param_shapes, Replicate())
    for node in graph.nodes.values():
        params = [graph.value_to_param.get(v) for v in node.inputs]
        if node.target == "aten.embedding.default" and params[0]:
            placements[params[0]] = Shard(0)
        elif node.target in _LINEARS and len(params) > _LINEARS[node.target][0]:
            weight_index, bias_index, transposed = _LINEARS[node.target]
            weight = params[weight_index]
            if weight is None:
                continue
            row = re.search(row_parallel, weight) is not None
            placements[weight] = Shard(int(row != transposed))
            bias = params[bias_index] if bias_index < len(params) else None
            if bias is not None and not row:
                placements[bias] = Shard(0)
    return placements


def _zero(graph: OpGraph, solution: ShardingSolution, axis: int, mesh_shape: tuple) -> None:
    """Store every parameter ZeRO-3 style: also split along ``axis`` (dim 0, where it divides),
    keeping the node placements, so it is gathered where it is used."""
    for fqn, placements in solution.param_placements.items():
        shape = graph.param_shapes[fqn].shape
        pieces = mesh_shape[axis] * math.prod(
            mesh_shape[a] for a, p in enumerate(placements) if p == Shard(0)
        )
        if shape[0] % pieces == 0:
            solution.param_placements[fqn] = tuple(
                Shard(0) if a == axis else p for a, p in enumerate(placements)
            )


def _force(solution: ShardingSolution, graph: OpGraph, data_axis: int) -> int:
    """Make every matmul-like node gather its activation input (Replicate) and then split its
    output along the batch on the data axis (replicated elsewhere): redistributions the
    natural plan lacks."""
    forced = 0
    for name, node in graph.nodes.items():
        if node.target not in ("aten.linear.default", "aten.conv2d.default"):
            continue
        inputs = list(solution.node_inputs[name])
        natural = inputs[0]
        inputs[0] = tuple(Replicate() for _ in natural)
        if inputs[0] != natural:
            forced += 1
        solution.node_inputs[name] = tuple(inputs)
        solution.node_outputs[name] = _axis_placements(len(natural), data_axis, Shard(0))
    return forced


def replicated_solution(graph: OpGraph, mesh_shape: tuple[int, int]) -> ShardingSolution:
    """Everything replicated on every axis, written out node by node (no DTensor involved)."""
    everywhere = (Replicate(),) * len(mesh_shape)
    return ShardingSolution(
        mesh_shape=mesh_shape,
        param_placements=dict.fromkeys(graph.param_shapes, everywhere),
        input_placements=dict.fromkeys(graph.model_inputs + graph.target_inputs, everywhere),
        node_inputs={name: (everywhere,) * len(n.inputs) for name, n in graph.nodes.items()},
        node_outputs=dict.fromkeys(graph.nodes, everywhere),
    )


def build_solution(
    scenario: str,
    graph: OpGraph,
    mesh: DeviceMesh,
    row_parallel: str,
    inputs: list[torch.Tensor],
    state: dict[str, torch.Tensor],
) -> ShardingSolution:
    """A solution for ``scenario``: '+'-joined parts among ``dp`` (batch split on the data
    axis), ``tp`` (Megatron on the last axis), ``zero`` (parameters also split on the data
    axis) and ``forced`` (extra redistributions); ``replicate`` alone replicates everything.
    The data axis is the first axis larger than 1."""
    parts = set(scenario.split("+"))
    ndim = mesh.ndim
    mesh_shape = tuple(mesh.shape)
    if parts == {"replicate"}:
        return replicated_solution(graph, mesh_shape)
    data_axis = next(a for a, size in enumerate(mesh_shape) if size > 1)
    model_axis = ndim - 1
    tp = _megatron_params(graph, row_parallel) if "tp" in parts else {}
    params = {
        fqn: _axis_placements(ndim, model_axis, tp.get(fqn, Replicate()))
        for fqn in graph.param_shapes
    }
    batch = Shard(0) if "dp" in parts else Replicate()
    user_inputs = {
        v: _axis_placements(ndim, data_axis, batch)
        for v in graph.model_inputs + graph.target_inputs
    }
    solution = propagate_solution(graph, mesh, params, user_inputs, inputs, state)
    if "zero" in parts:
        _zero(graph, solution, data_axis, mesh_shape)
    if "forced" in parts:
        assert _force(solution, graph, data_axis) > 0
    return solution


# ---------------------------------------------------------------- what each rank runs

_CACHE: dict[Any, Any] = {}


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _graph(name: str) -> OpGraph:
    model, inputs, targets, loss_fn = MODELS[name].build("meta")
    return capture(model, inputs, loss_fn=loss_fn, targets=targets)


@dataclass
class Reference:
    """A seeded model's initial state and batch, and what one single-process step gives."""

    state: dict[str, torch.Tensor]
    """Parameters and buffers (non-persistent ones too) before the step, by FQN."""
    inputs: list[torch.Tensor]
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    """Buffers after the step (batch-norm statistics move)."""
    state_dict_keys: set[str]


def _reference_step(name: str) -> Reference:
    torch.manual_seed(0)
    model, inputs, targets, loss_fn = MODELS[name].build("cpu")
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    state = {fqn: t.detach().clone() for fqn, t in named}
    loss = loss_fn(model(*inputs), targets)
    loss.backward()
    return Reference(
        state=state,
        inputs=[*inputs, targets],
        loss=loss.detach(),
        grads={fqn: p.grad for fqn, p in model.named_parameters()},
        buffers={fqn: b.clone() for fqn, b in model.named_buffers()},
        state_dict_keys=set(model.state_dict()),
    )


def _mesh(shape: tuple[int, int]) -> DeviceMesh:
    return _cached(("mesh", shape), lambda: init_device_mesh("cpu", shape))


def _mismatch(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest excess of |actual - expected| over TOLERANCE·(1 + |expected|) (≤ 0: close)."""
    excess = (actual - expected).abs() - TOLERANCE * (1 + expected.abs())
    return excess.max().item()


def run_case(name: str, mesh_shape: tuple[int, int], scenario: str, load_later: bool) -> dict:
    """On one rank: apply the scenario's solution, train one step, compare with one process."""
    graph = _cached(("graph", name), lambda: _graph(name))
    ref = _cached(("reference", name), lambda: _reference_step(name))
    mesh = _mesh(mesh_shape)
    row_parallel = MODELS[name].row_parallel
    solution = build_solution(scenario, graph, mesh, row_parallel, ref.inputs, ref.state)
    return _train_step_report(graph, solution, mesh, ref, load_later)


def run_solution(name: str, solution: ShardingSolution) -> dict:
    """On one rank: like ``run_case`` for a solution made elsewhere (by the ILP)."""
    graph = _cached(("graph", name), lambda: _graph(name))
    ref = _cached(("reference", name), lambda: _reference_step(name))
    mesh = _mesh(solution.mesh_shape)
    return _train_step_report(graph, solution, mesh, ref, load_later=False)


def _train_step_report(
    graph: OpGraph, solution: ShardingSolution, mesh: DeviceMesh, ref: Reference, load_later: bool
) -> dict:
    if load_later:
        program = apply(graph, solution, mesh)
        program.load_full_state_dict(ref.state)
    else:
        program = apply(graph, solution, mesh, ref.state)
    loss = program(*ref.inputs)
    loss.backward()
    report: dict[str, Any] = {"loss": _mismatch(full_value(loss), ref.loss), "values": {}}
    for fqn, param in program.named_parameters():
        report["values"][f"grad {fqn}"] = _mismatch(param.grad.full_tensor(), ref.grads[fqn])
    for fqn, buffer in program.named_buffers():
        report["values"][f"buffer {fqn}"] = _mismatch(full_value(buffer), ref.buffers[fqn])
    torch.optim.SGD(program.parameters(), lr=LEARNING_RATE).step()
    for fqn, param in program.named_parameters():
        stepped = ref.state[fqn] - LEARNING_RATE * ref.grads[fqn]
        report["values"][f"after SGD {fqn}"] = _mismatch(param.full_tensor(), stepped)
    report["misplaced_grads"] = [
        fqn
        for fqn, param in program.named_parameters()
        if tuple(param.grad.placements) != tuple(solution.param_placements[fqn])
    ]
    report["same_state_dict_keys"] = set(program.state_dict()) == ref.state_dict_keys
    report["sharded_params"] = sum(
        any(p.is_shard() for p in placements) for placements in solution.param_placements.values()
    )
    return report


CASES = [
    ("mlp", (1, 4), "replicate", False),
    ("mlp", (1, 4), "dp+forced", False),
    ("cnn", (1, 4), "dp", False),
    ("gpt", (1, 4), "dp", False),
    ("llama", (1, 4), "tp", False),
    ("hf-gpt2", (1, 4), "dp+zero", False),
    ("hf-llama", (1, 4), "dp", True),
    ("mlp", (2, 2), "dp+tp+zero", False),
    ("cnn", (2, 2), "dp+zero", True),
    ("gpt", (2, 2), "dp+tp+zero", False),
    ("llama", (2, 2), "dp+tp+forced", False),
    ("hf-gpt2", (2, 2), "dp+tp", False),
    ("hf-llama", (2, 2), "dp+tp+zero", False),
]
ILP_CASES = ["mlp", "gpt", "llama", "hf-gpt2"]


def assert_like_single_process(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        assert report["loss"] <= 0, f"rank {rank}: the loss differs"
        bad = {what: err for what, err in report["values"].items() if err > 0}
        assert not bad, f"rank {rank}: beyond {TOLERANCE} (excess shown): {bad}"
        assert not report["misplaced_grads"], "gradients not in their parameter's placement"
        assert report["same_state_dict_keys"]


@pytest.fixture(scope="module")
def workers() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(WORLD) as group:
        yield group


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "name,mesh_shape,scenario,load_later",
    CASES,
    ids=[f"{n}-{m[0]}x{m[1]}-{s}" for n, m, s, _ in CASES],
)
def test_sharded_training_step_matches_single_process(
    workers, name, mesh_shape, scenario, load_later
):
    reports = workers.run(run_case, name, mesh_shape, scenario, load_later, timeout_s=150)
    assert_like_single_process(reports)
    if "zero" in scenario or "tp" in scenario:
        assert reports[0]["sharded_params"] > 0


def ilp_solution(name: str, mesh_shape: tuple[int, int]) -> ShardingSolution:
    """The intra-op ILP's solution on an A100 mesh, squeezed to 30 % of the memory a replicated
    step needs so that it shards (tensor parallel, ZeRO, partial sums, 2-D placements)."""
    graph = _graph(name)
    cluster = Cluster.from_spec(f"{mesh_shape[0]}x{mesh_shape[1]}xA100-80GB")
    mesh = cluster.logical_mesh(mesh_shape)
    replicated_bytes = solve_sharding(graph, mesh, cluster).memory_bytes_per_device
    return solve_sharding(graph, mesh, cluster, memory_budget_bytes=0.3 * replicated_bytes)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ILP_CASES)
def test_ilp_solution_trains_like_a_single_process(workers, name):
    solution = ilp_solution(name, (2, 2))
    assert any(p != (Replicate(), Replicate()) for p in solution.param_placements.values())
    assert_like_single_process(workers.run(run_solution, name, solution, timeout_s=150))


# ---------------------------------------------------------------- outputs and errors


def run_logits(mesh_shape: tuple[int, int]) -> dict:
    """On one rank: a program without a loss returns its (batch-sharded) output."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(BATCH, 32)
    graph = capture(MLP().to("meta"), (torch.empty(BATCH, 32, device="meta"),))
    mesh = _mesh(mesh_shape)
    data_axis = mesh.ndim - 1
    params = dict.fromkeys(graph.param_shapes, (Replicate(),) * mesh.ndim)
    inputs = {v: _axis_placements(mesh.ndim, data_axis, Shard(0)) for v in graph.model_inputs}
    solution = propagate_solution(graph, mesh, params, inputs, [x], model)
    output = apply(graph, solution, mesh, model)(x)
    return {
        "placements": tuple(output.placements),
        "mismatch": _mismatch(full_value(output), model(x).detach()),
    }


@torch.library.custom_op("hap_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    """An op DTensor has no sharding rule for."""
    return x * 2


@twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


twice.register_autograd(lambda ctx, grad: grad * 2)


class CustomOpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twice(self.fc(x))


def _sum_loss(output: torch.Tensor) -> torch.Tensor:
    return output.sum()


def _error_message(run: Callable[[], Any]) -> str:
    try:
        run()
    except ShardingExecutionError as exc:
        return str(exc)
    return "no error"


def run_unsupported() -> list[str]:
    """On one rank: the messages of what DTensor cannot run (every rank fails alike)."""
    mesh = _mesh((1, 4))
    meta_input = torch.empty(4, 8, device="meta")
    graph = capture(CustomOpModel().to("meta"), (meta_input,), loss_fn=_sum_loss)
    model = CustomOpModel()
    program = apply(graph, replicated_solution(graph, (1, 4)), mesh, model)
    messages = [_error_message(lambda: program(torch.randn(4, 8)))]

    cnn = _cached(("graph", "cnn"), lambda: _graph("cnn"))
    ref = _cached(("reference", "cnn"), lambda: _reference_step("cnn"))
    solution = replicated_solution(cnn, (1, 4))
    solution.node_inputs["conv2d"] = ((Replicate(), Shard(1)), *solution.node_inputs["conv2d"][1:])
    program = apply(cnn, solution, mesh, ref.state)
    messages.append(_error_message(lambda: program(*ref.inputs)))

    solution = replicated_solution(cnn, (1, 4))
    solution.input_placements["b_model_bn1_running_mean"] = (Replicate(), Shard(0))
    program = apply(cnn, solution, mesh, ref.state)
    messages.append(_error_message(lambda: program(*ref.inputs)))
    return messages


@pytest.mark.timeout(120)
def test_program_without_loss_returns_sharded_output(workers):
    for report in workers.run(run_logits, (1, 4), timeout_s=90):
        assert report["placements"] == (Replicate(), Shard(0))
        assert report["mismatch"] <= 0


@pytest.mark.timeout(120)
def test_unsupported_placements_raise_a_clear_error_on_every_rank(workers):
    for custom_op, convolution, batch_norm in workers.run(run_unsupported, timeout_s=90):
        assert "node 'twice'" in custom_op and "hap_test.twice" in custom_op
        assert "['RR']" in custom_op and "sharding strategy" in custom_op
        assert "node 'conv2d'" in convolution and "RS1" in convolution
        assert "place the input so in the solution" in convolution
        assert "node 'batch_norm'" in batch_norm and "writes into input 3" in batch_norm


def test_validate_solution_names_what_is_missing_or_misfit():
    graph = _graph("mlp")
    validate_solution(graph, replicated_solution(graph, (1, 4)), (1, 4))
    with pytest.raises(InvalidSolutionError, match=r"\(1, 4\) mesh .* device mesh is \(2, 2\)"):
        validate_solution(graph, replicated_solution(graph, (1, 4)), (2, 2))

    solution = replicated_solution(graph, (1, 4))
    del solution.node_outputs["relu"]
    with pytest.raises(InvalidSolutionError, match="node 'relu'"):
        validate_solution(graph, solution, (1, 4))

    solution = replicated_solution(graph, (1, 4))
    solution.node_inputs["linear"] = solution.node_inputs["linear"][:1]
    with pytest.raises(InvalidSolutionError, match="'linear' .* 3 tensor inputs"):
        validate_solution(graph, solution, (1, 4))

    solution = replicated_solution(graph, (1, 4))
    solution.param_placements["out.bias"] = (Replicate(), Shard(1))
    with pytest.raises(InvalidSolutionError, match="'out.bias' .* only 1 dims"):
        validate_solution(graph, solution, (1, 4))

    solution = replicated_solution(graph, (1, 4))
    del solution.param_placements["net.0.weight"]
    with pytest.raises(ValueError, match="parameter 'net.0.weight'"):
        validate_solution(graph, solution, (1, 4))
