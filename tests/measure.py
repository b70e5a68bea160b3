"""Independent references: what a real forward/backward pass does, measured on real tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hierarchical_ap.graph import OpGraph


def measured_saved_bytes(
    model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable, targets: torch.Tensor
) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a real forward pass."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(*inputs), targets)
    del loss
    return sum(saved.values())


def measured_train_flops(
    model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable, targets: torch.Tensor
) -> int:
    """FLOPs of one real forward + backward, attention through the unfused (countable) kernel."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(*inputs), targets).backward()
    return counter.get_total_flops()


def graph_inputs(graph: OpGraph, model: nn.Module, user_inputs: Sequence[Any]) -> list[Any]:
    """The flat argument list of ``graph.graph_module``: parameters, buffers, then user inputs."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    users = iter(pytree.tree_leaves(list(user_inputs)))
    flat = []
    for spec in graph.exported.graph_signature.input_specs:
        if spec.target is not None:
            flat.append(state[spec.target.removeprefix("model.")])
        else:
            flat.append(next(users))
    return flat


class _FlopInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        return result


def measured_node_forward_flops(graph: OpGraph, flat_inputs: Sequence[Any]) -> dict[str, int]:
    """Forward FLOPs of every node, counted while the graph runs on real tensors."""
    interpreter = _FlopInterpreter(graph.graph_module)
    with torch.no_grad():
        interpreter.run(*flat_inputs)
    return interpreter.flops


class AtenCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten calls below autograd, split by when they happen."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.namespace == "aten":
            self.calls += 1
        return func(*args, **(kwargs or {}))


def measured_kernel_calls(
    model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable, targets: torch.Tensor
) -> tuple[int, int]:
    """(forward, backward) aten calls of one real eager training step of ``model``: the model
    and loss forward, then ``loss.backward()`` (gradients of leaves that had none yet)."""
    model.zero_grad(set_to_none=True)
    counter = AtenCalls()
    with counter:
        loss = loss_fn(model(*inputs), targets)
        forward = counter.calls
        loss.backward()
    return forward, counter.calls - forward
