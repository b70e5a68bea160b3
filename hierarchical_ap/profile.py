"""Symbolic profiler: FLOPs, bytes and saved activations of every node of a captured graph.

Each aten node is executed once more, in isolation, on fake tensors (``FakeTensorMode``: shapes,
dtypes and strides, no storage), forward and backward:

* forward FLOPs and backward FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` around
  the forward call and around ``torch.autograd.grad`` of its outputs. ``scaled_dot_product_attention``
  runs a fused kernel the counter does not see, so it is counted with the counter's own formula
  ``F_fwd = 2·b·h·s_q·s_k·(d_qk + d_v)`` and ``F_bwd = 2·F_fwd`` (model FLOPs: the fused kernel's
  recomputation of the score matrix is hardware FLOPs and is not counted, as in MFU).
* the tensors autograd saves for backward are caught with ``saved_tensors_hooks`` and attributed to
  the node's inputs (by storage), its outputs, or new internal buffers (masks, statistics).
* forward bytes are the bytes of the tensor inputs read plus the outputs written (zero for views);
  backward bytes are ``grad outputs + saved tensors + grad inputs``.
* forward and backward kernels count the aten calls that reach the dispatcher below autograd
  (``TorchDispatchMode``): what eager execution launches, one by one, after composite ops
  decompose (``linear`` is ``t`` + ``addmm``; its backward two ``mm``, a ``sum`` and views).
  ``CostModel`` charges each a fixed host-side time (``DeviceSpec.kernel_overhead_s``).

Nodes with identical signatures (op, shapes, strides, dtypes, constants, which inputs need grad)
share one profile, so the 96 blocks of GPT-3 are profiled once.

``optimizer_update_profile`` does the same for the optimizer step: it runs the real
``torch.optim`` optimizer on a small fp32 parameter and counts, per parameter tensor, the
kernels one step dispatches and the bytes they read and write per element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
METADATA_CHECKS = frozenset({torch.ops.aten._assert_tensor_metadata.default})
"""Ops that only check a value's metadata against capture time (device=meta): the runtime does
not execute them, so they cost nothing (an all-zero ``NodeProfile``)."""


@dataclass(frozen=True)
class TensorMeta:
    """Shape, stride and dtype of one tensor value."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor, concrete: Callable[[Any], int] = int) -> TensorMeta:
        """The meta of ``tensor``; ``concrete`` turns symbolic sizes into integers."""
        return cls(
            tuple(concrete(s) for s in tensor.shape),
            tuple(concrete(s) for s in tensor.stride()),
            tensor.dtype,
        )


@dataclass(frozen=True)
class SavedTensor:
    """One tensor autograd keeps for a node's backward.

    ``kind`` is ``"input"`` (the node's ``index``-th tensor input, or a view of it), ``"output"``
    (its ``index``-th output) or ``"internal"`` (a new buffer such as a dropout mask or the
    normalisation statistics; ``index`` is -1).
    """

    kind: str
    index: int
    nbytes: int


@dataclass(frozen=True)
class NodeProfile:
    """What one node costs, independent of where it sits in the graph."""

    forward_flops: int
    backward_flops: int
    forward_bytes: int
    backward_bytes: int
    saved: tuple[SavedTensor, ...]
    output_aliases_input: int | None
    """Index of the tensor input whose storage the (first) output shares, for views; else None."""
    forward_kernels: int = 0
    """Aten calls the forward dispatches (module docstring)."""
    backward_kernels: int = 0
    """Aten calls the backward dispatches (0 when nothing needs a gradient)."""

    @property
    def internal_saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved if s.kind == "internal")


def _fake_tensor(meta: TensorMeta, requires_grad: bool) -> torch.Tensor:
    tensor = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="cpu")
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _is_tensor_meta(value: Any) -> bool:
    return isinstance(value, TensorMeta)


class SymbolicProfiler:
    """Profiles aten calls on fake tensors, memoised by call signature."""

    def __init__(self) -> None:
        self._mode = FakeTensorMode(allow_non_fake_inputs=False)
        self._cache: dict[tuple, NodeProfile] = {}

    def profile(
        self,
        target: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        input_requires_grad: Sequence[bool],
    ) -> NodeProfile:
        """Profile ``target(*args, **kwargs)`` where tensor arguments are given as ``TensorMeta``.

        ``input_requires_grad[i]`` says whether the i-th tensor argument (in pytree order) needs a
        gradient.
        """
        if target in METADATA_CHECKS:
            return NodeProfile(0, 0, 0, 0, (), None)
        key = (target, _freeze(args), _freeze(kwargs), tuple(input_requires_grad))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._run(target, args, kwargs, input_requires_grad)
            self._cache[key] = cached
        return cached

    @property
    def distinct_signatures(self) -> int:
        return len(self._cache)

    def _run(
        self,
        target: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        input_requires_grad: Sequence[bool],
    ) -> NodeProfile:
        flat, spec = pytree.tree_flatten((list(args), dict(kwargs)))
        metas = [value for value in flat if _is_tensor_meta(value)]
        with self._mode, torch.enable_grad():
            inputs = [_fake_tensor(m, rg) for m, rg in zip(metas, input_requires_grad, strict=True)]
            it = iter(inputs)
            call_flat = [next(it) if _is_tensor_meta(v) else v for v in flat]
            call_args, call_kwargs = pytree.tree_unflatten(call_flat, spec)
            if target is _SDPA:
                call_args, call_kwargs = _sdpa_without_dropout(call_args, call_kwargs)

            saved: list[torch.Tensor] = []
            with FlopCounterMode(display=False) as forward_counter, KernelCounter() as launched:
                with torch.autograd.graph.saved_tensors_hooks(_recorder(saved), lambda t: t):
                    result = target(*call_args, **call_kwargs)
            forward_kernels = launched.count
            outputs = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
            forward_flops = forward_counter.get_total_flops()

            differentiable = [o for o in outputs if o.requires_grad]
            grad_inputs = [t for t in inputs if t.requires_grad]
            backward_flops = backward_kernels = 0
            if differentiable and grad_inputs:
                seeds = [torch.ones_like(o) for o in differentiable]
                with (
                    FlopCounterMode(display=False) as backward_counter,
                    KernelCounter() as launched,
                ):
                    torch.autograd.grad(differentiable, grad_inputs, seeds, allow_unused=True)
                backward_flops = backward_counter.get_total_flops()
                backward_kernels = launched.count
            if target is _SDPA:
                forward_flops = sdpa_flop_count(*(tuple(t.shape) for t in inputs[:3]))
                backward_flops = 2 * forward_flops if differentiable else 0

            saved_tensors = _attribute_saved(saved, inputs, outputs)
            alias = _aliased_input(outputs, inputs)

        read = sum(t.untyped_storage().nbytes() for t in inputs)
        written = sum(o.untyped_storage().nbytes() for o in outputs)
        forward_bytes = 0 if alias is not None else read + written
        backward_bytes = 0
        if differentiable:
            backward_bytes = (
                sum(_nbytes(o) for o in differentiable)
                + sum(s.nbytes for s in saved_tensors)
                + sum(_nbytes(t) for t in grad_inputs)
            )
        return NodeProfile(
            forward_flops=int(forward_flops),
            backward_flops=int(backward_flops),
            forward_bytes=int(forward_bytes),
            backward_bytes=int(backward_bytes),
            saved=tuple(saved_tensors),
            output_aliases_input=alias,
            forward_kernels=forward_kernels,
            backward_kernels=backward_kernels,
        )


@dataclass(frozen=True)
class UpdateProfile:
    """One optimizer step on one parameter tensor of ``n`` elements dispatches ``kernels``
    kernels that move ``bytes_per_element · n`` bytes."""

    kernels: int
    bytes_per_element: float


#: ``TrainingMemory`` optimizer names → the torch optimizer and settings of the step profiled.
_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
}
_UPDATE_PROBE_NUMEL = 4096


@cache
def optimizer_update_profile(optimizer: str) -> UpdateProfile:
    """Kernels and bytes per element of one step of ``optimizer`` on one parameter tensor,
    counted on a real fp32 parameter of 4096 elements (after a first step has created the
    state, as in training). Bytes are every kernel's tensor arguments plus its outputs (an
    in-place update reads and writes its tensor); the implementation ``torch.optim`` picks for
    a CPU tensor (its per-tensor loop) is what the runtime runs on CPU workers."""
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(_OPTIMIZERS)}")
    kind, settings = _OPTIMIZERS[optimizer]
    param = torch.nn.Parameter(torch.ones(_UPDATE_PROBE_NUMEL))
    param.grad = torch.full_like(param, 0.5)
    step = kind([param], **settings)
    step.step()
    with KernelCounter(count_bytes=True) as counted:
        step.step()
    return UpdateProfile(counted.count, counted.bytes / _UPDATE_PROBE_NUMEL)


class KernelCounter(TorchDispatchMode):
    """Counts the aten calls that reach the dispatcher below autograd while it is active
    (``prim`` queries such as ``prim.device``, which fake tensors answer, are not kernels), and
    with ``count_bytes`` the bytes of their tensor arguments and outputs."""

    def __init__(self, *, count_bytes: bool = False) -> None:
        super().__init__()
        self.count_bytes = count_bytes
        self.count = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func.namespace == "aten":
            self.count += 1
            if self.count_bytes:
                for tensor in pytree.tree_leaves((args, kwargs, result)):
                    if isinstance(tensor, torch.Tensor):
                        self.bytes += tensor.numel() * tensor.element_size()
        return result


def _recorder(saved: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    return pack


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _sdpa_without_dropout(
    args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Profile attention as the fused (flash / memory-efficient) kernel does on a GPU.

    On CPU, attention dropout forces the unfused path that stores the s×s probabilities; the GPU
    kernels store only the O(s) log-sum-exp and the RNG state, so dropout is dropped here.
    """
    args, kwargs = list(args), dict(kwargs)
    if len(args) > 4:
        args[4] = 0.0
    else:
        kwargs["dropout_p"] = 0.0
    return args, kwargs


def _attribute_saved(
    saved: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
) -> list[SavedTensor]:
    """Map each distinct saved storage to an input, an output or a new internal buffer."""
    input_ids = {_storage_id(t): i for i, t in enumerate(inputs)}
    output_ids = {_storage_id(t): i for i, t in enumerate(outputs)}
    seen: set[int] = set()
    attributed: list[SavedTensor] = []
    for tensor in saved:
        sid = _storage_id(tensor)
        if sid in seen:
            continue
        seen.add(sid)
        nbytes = tensor.untyped_storage().nbytes()
        if sid in input_ids:
            attributed.append(SavedTensor("input", input_ids[sid], nbytes))
        elif sid in output_ids:
            attributed.append(SavedTensor("output", output_ids[sid], nbytes))
        else:
            attributed.append(SavedTensor("internal", -1, nbytes))
    return attributed


def _aliased_input(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> int | None:
    if not outputs:
        return None
    first = _storage_id(outputs[0])
    for index, tensor in enumerate(inputs):
        if _storage_id(tensor) == first:
            return index
    return None


def _freeze(value: Any) -> Any:
    """A hashable form of a call argument structure."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (torch.device, torch.dtype, torch.layout, torch.memory_format)):
        return str(value)
    return value
