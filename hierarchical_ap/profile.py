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

Nodes with identical signatures (op, shapes, strides, dtypes, constants, which inputs need grad)
share one profile, so the 96 blocks of GPT-3 are profiled once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


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
            with FlopCounterMode(display=False) as forward_counter:
                with torch.autograd.graph.saved_tensors_hooks(_recorder(saved), lambda t: t):
                    result = target(*call_args, **call_kwargs)
            outputs = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
            forward_flops = forward_counter.get_total_flops()

            differentiable = [o for o in outputs if o.requires_grad]
            grad_inputs = [t for t in inputs if t.requires_grad]
            backward_flops = 0
            if differentiable and grad_inputs:
                with FlopCounterMode(display=False) as backward_counter:
                    torch.autograd.grad(
                        differentiable,
                        grad_inputs,
                        [torch.ones_like(o) for o in differentiable],
                        allow_unused=True,
                    )
                backward_flops = backward_counter.get_total_flops()
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
        )


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
