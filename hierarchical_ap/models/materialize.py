"""Giving a model built on the meta device real storage and initial weights.

Two contracts:

* ``materialize(model, device)``: the whole model, initialised by its own code drawing from
  torch's global RNG (seed it first with ``torch.manual_seed``).
* Keyed initialisation, what ``compile_parallel`` does with a meta-device model:
  ``init_module_weights(model, seed)`` gives the whole model the weights that
  ``init_held(model, seed, held)`` gives each worker's shards.

Keyed initialisation
--------------------
The model's own initialisation runs (the root's ``reset_parameters()``, else ``init_weights()``,
else every submodule's ``reset_parameters()``, as in ``materialize``), on CPU, with every random
draw keyed instead of taken from the global RNG:

* the ``k``-th keyed draw that writes parameter or buffer ``fqn`` (its first name: tied
  weights are one tensor) cuts the tensor along dim 0 into chunks of ``R = max(1,
  CHUNK_ELEMENTS // (elements per dim-0 row))`` rows and fills chunk ``c`` by running the draw
  on the chunk alone with a ``torch.Generator`` seeded by ``key_seed(seed, fqn, k, c)``
  (BLAKE2b). Keyed draws are the in-place random fills (``normal_``, ``uniform_``,
  ``bernoulli_``, ...: what ``nn.init.normal_``, ``uniform_``, ``kaiming_*`` and ``xavier_*``
  come down to) and ``torch.nn.init.trunc_normal_`` (a rejection sampler, run whole on each
  chunk), on the whole tensor;
* any other random op (on a temporary, or on a view of a model tensor) runs with a generator
  seeded by ``key_seed(seed, fqn, k, 0)`` for a view of ``fqn``, else ``key_seed(seed, "", j,
  0)``, ``j`` its index among such ops in the initialisation's order.

So an initial value is a pure function of ``(seed, fqn, k, global index)``: the same on any
device, mesh, sharding or stage split. Non-random ops run as written.

Shard by shard (``init_held``)
------------------------------
``held`` maps FQNs to the tensors one worker holds: DTensors (it writes their local shards) or
full tensors. Nothing else of the model is allocated:

1. *Record*: the initialisation runs once on a meta copy of the model (free: meta ops allocate
   and compute nothing) whose tensors report ``is_meta == False``, so that code that skips meta
   tensors (``torch.nn.init.orthogonal_``...) runs as it would on real ones; the in-place ops
   that write each tensor are recorded.
2. *Replay*: a held tensor written only by elementwise ops on the whole tensor (keyed draws,
   ``zero_`` / ``fill_``, pointwise ops such as ``mul_`` / ``add_`` / ``clamp_`` whose other
   arguments are numbers or tensors with data, ``copy_`` from a tensor with data) is initialised
   on its shard only: each op is replayed on the shard, a keyed draw drawing only the chunks the
   shard's rows cover, one at a time, and keeping the shard's part (a shard along dim >= 1
   draws every chunk, one at a time: the time of the whole tensor, the memory of one chunk).
3. *Whole tensor*: a held tensor written any other way (through a view, e.g. an embedding's
   padding row; from another tensor; by an op that is not elementwise, e.g. ``orthogonal_``) is
   materialised whole, with only the worker's such tensors real and the rest of the model on
   meta, by running the initialisation again; its shard is sliced from it.
4. *Whole model*: if the initialisation cannot run on meta (it reads a value), or step 3 reads
   a tensor the worker does not hold, every tensor of the model is materialised (what
   ``materialize`` allocates) and a warning is logged. The values are the same in every case.

A held tensor that the initialisation never writes raises ``InitialisationError``. Not
supported: an initialisation that tells meta tensors apart by their ``device`` (not
``is_meta``), or that draws through a ``trunc_normal_`` it imported before the call (``from
torch.nn.init import trunc_normal_``): that draw is not keyed per chunk and step 1 cannot see it.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode

from hierarchical_ap.errors import InitialisationError

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk of a keyed draw (at least one dim-0 row): part of the contract, since a
chunk is drawn whole from its own generator."""

_aten = torch.ops.aten
RANDOM_FILLS = frozenset(
    {
        _aten.normal_,
        _aten.uniform_,
        _aten.bernoulli_,
        _aten.random_,
        _aten.exponential_,
        _aten.cauchy_,
        _aten.log_normal_,
        _aten.geometric_,
    }
)
"""In-place random fills: each element is drawn independently of the others."""
ELEMENTWISE_WRITES = frozenset({_aten.zero_, _aten.fill_, _aten.copy_})
"""In-place writes that are elementwise without torch's ``pointwise`` tag."""
_ANONYMOUS = ""
"""The key name of random ops on tensors that are not the model's."""
_TRUNC_NORMAL = torch.nn.init.trunc_normal_
_TRUNC_NORMAL_PARAMETERS = list(inspect.signature(_TRUNC_NORMAL).parameters)[1:]


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate `model`'s parameters and buffers on `device` and initialise them; return it.

    Zoo models re-tie and initialise through `reset_parameters()`; transformers models through
    `init_weights()` (which also recomputes rotary buffers); any other module through the
    `reset_parameters()` of each submodule that has one. Random draws come from torch's global
    RNG; `init_module_weights` is the keyed alternative that workers reproduce shard by shard.
    """
    model.to_empty(device=device)
    _forget_hf_initialisation(model)
    run_own_init(model)
    return model


def run_own_init(model: nn.Module) -> None:
    """Run the model's own initialisation on its tensors as they are (see `materialize`)."""
    if callable(getattr(model, "reset_parameters", None)):
        model.reset_parameters()
    elif callable(getattr(model, "init_weights", None)):
        model.init_weights()
    else:
        with torch.no_grad():
            for module in model.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()


def init_module_weights(
    model: nn.Module, seed: int, device: str | torch.device = "cpu"
) -> nn.Module:
    """Allocate `model`'s meta tensors (ties kept) and initialise every tensor by the model's own
    code with keyed random draws (module docstring); return it, on `device`.

    These are the weights ``compile_parallel(model, ..., init_seed=seed)`` initialises a
    meta-device model with, shard by shard on the workers: train this model in one process to
    reproduce a parallel run.
    """
    _allocate(model, None)
    _run_keyed(model, seed, record=False)
    return model.to(device)


def meta_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` on the meta device that keeps tied parameters tied (``Module.to``
    would give each use of a tied parameter its own copy), its floating parameters and
    buffers in ``dtype`` when given (``model.to(dtype)`` on the copy)."""
    return _meta_copy(model, dtype, looks_real=False)


# ---------------------------------------------------------------------------- shard by shard


@dataclass(frozen=True)
class Region:
    """The box of a tensor that one holder keeps: its global offset and local shape."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Region:
        return cls((0,) * len(shape), tuple(shape))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape, strict=True))


@dataclass(frozen=True)
class InitReport:
    """What ``init_held`` materialised on this process."""

    replayed: dict[str, int]
    """FQN → elements initialised shard by shard (the sum of its held shards)."""
    whole: dict[str, int]
    """FQN → elements of a tensor materialised whole (step 3 or 4) to slice shards from."""
    whole_model: bool
    """Whether the whole model was materialised (step 4)."""
    held_bytes: int
    """Bytes of the held shards."""
    largest_allocation_bytes: int
    """The largest tensor the initialisation allocated (a chunk, a whole tensor, ...)."""
    allocated_bytes: int
    """Bytes of every tensor the initialisation allocated, summed (freed ones included)."""


def init_held(
    model: nn.Module, seed: int, held: Mapping[str, Sequence[torch.Tensor]]
) -> InitReport:
    """Initialise the tensors in ``held`` (FQN → the DTensors or full tensors holding that
    parameter or buffer) in place with the values ``init_module_weights(model, seed)`` gives
    them, materialising as little of ``model`` as it can (module docstring). ``model`` is only
    read: its structure and initialisation code (its values, if any, are not used)."""
    return init_regions(
        model, seed, {name: [_local_region(t) for t in tensors] for name, tensors in held.items()}
    )


def init_regions(
    model: nn.Module, seed: int, held: Mapping[str, Sequence[tuple[torch.Tensor, Region]]]
) -> InitReport:
    """``init_held`` on plain tensors: FQN → (tensor, the region of the parameter or buffer it
    holds) pairs; each tensor gets the values of its region."""
    table = _tensor_table(meta_copy(model))
    targets: dict[str, list[tuple[torch.Tensor, Region]]] = {}
    for name, pairs in held.items():
        if name not in table.canonical:
            raise InitialisationError(
                f"'{name}' is neither a parameter nor a buffer of {type(model).__name__}; "
                "pass tensors keyed by the model's state_dict names"
            )
        for local, region in pairs:
            if tuple(local.shape) != region.shape:
                raise InitialisationError(
                    f"a tensor of shape {tuple(local.shape)} cannot hold the region "
                    f"{region.shape} of '{name}'; pass a tensor of the region's shape"
                )
        targets.setdefault(table.canonical[name], []).extend(pairs)
    with torch.no_grad(), _AllocationMeter() as meter:
        report = _initialise(model, seed, targets)
    held_bytes = sum(
        local.numel() * local.element_size() for pairs in targets.values() for local, _ in pairs
    )
    return InitReport(
        **report,
        held_bytes=held_bytes,
        largest_allocation_bytes=meter.largest,
        allocated_bytes=meter.total,
    )


_Targets = Mapping[str, list[tuple[torch.Tensor, Region]]]


def _initialise(model: nn.Module, seed: int, targets: _Targets) -> dict[str, Any]:
    """Steps 1 to 4 of the module docstring; the report's first three fields."""
    try:
        recording = _record(model, seed)
    except Exception as exc:  # the initialisation reads a value, which it cannot on meta
        logger.warning(
            "the initialisation of %s cannot run on the meta device (%s); materialising the "
            "whole model to initialise its shards",
            type(model).__name__,
            exc,
        )
        return _from_whole_model(model, seed, targets)
    unwritten = sorted(f for f in targets if f not in recording.writes)
    if unwritten:
        raise InitialisationError(
            f"{unwritten} of the meta-device {type(model).__name__} are not written by its "
            "initialisation (reset_parameters / init_weights); initialise them there, or pass "
            "a model with real weights"
        )
    whole = sorted(f for f in targets if f in recording.opaque)
    replayed: dict[str, int] = {}
    for fqn in sorted(set(targets) - set(whole)):
        meta = recording.table.tensors[fqn]
        for local, region in targets[fqn]:
            _replay(recording.writes[fqn], tuple(meta.shape), meta.dtype, region, local, seed)
            replayed[fqn] = replayed.get(fqn, 0) + local.numel()
    if whole:
        try:
            values = _run_with_real(model, seed, whole)
        except Exception as exc:  # it reads a tensor left on meta (_ReadsUnheld, or torch's)
            logger.warning(
                "initialising %s reads tensors this worker does not hold (%s); materialising "
                "the whole model to initialise its shards",
                whole,
                exc,
            )
            return _from_whole_model(model, seed, targets)
        _slice_into(values, {f: targets[f] for f in whole})
    return {
        "replayed": replayed,
        "whole": {f: recording.table.tensors[f].numel() for f in whole},
        "whole_model": False,
    }


def _from_whole_model(model: nn.Module, seed: int, targets: _Targets) -> dict[str, Any]:
    values = _run_with_real(model, seed, None)
    _slice_into(values, targets)
    return {"replayed": {}, "whole": {f: values[f].numel() for f in targets}, "whole_model": True}


def _slice_into(values: Mapping[str, torch.Tensor], targets: _Targets) -> None:
    for fqn, pairs in targets.items():
        for local, region in pairs:
            local.copy_(values[fqn][region.slices()])


def _local_region(tensor: torch.Tensor) -> tuple[torch.Tensor, Region]:
    """The local tensor a holder writes and the box of the global tensor it holds."""
    if not isinstance(tensor, DTensor):
        return tensor, Region.whole(tensor.shape)
    if not all(type(p) is Shard or isinstance(p, Replicate) for p in tensor.placements):
        raise InitialisationError(
            f"a held DTensor is placed {tensor.placements}; shard-by-shard initialisation "
            "takes Shard and Replicate placements only: store parameters so"
        )
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return tensor.to_local(), Region(tuple(offset), tuple(shape))


# ---------------------------------------------------------------------------- keyed draws


def key_seed(seed: int, name: str, index: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of the ``index``-th keyed draw of ``name``."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}\0{chunk}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def _generator(seed: int, key: tuple[str, int], chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, key[0], key[1], chunk))


def chunk_rows(shape: Sequence[int]) -> int:
    """Rows (dim-0 slices) per chunk of a keyed draw into a tensor of ``shape``."""
    row = math.prod(shape[1:]) if shape else 1
    return max(1, CHUNK_ELEMENTS // max(1, row))


def draw_into(
    out: torch.Tensor,
    draw: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    shape: Sequence[int],
    region: Region,
    seed: int,
    key: tuple[str, int],
) -> None:
    """Write into ``out`` (``region`` of a tensor of ``shape``) the values that the keyed draw
    ``draw(tensor, *args, **kwargs)`` gives those elements: the chunks ``region``'s rows cover
    are drawn one at a time, on CPU, in ``out``'s dtype."""
    if not shape:
        chunk = torch.empty((), dtype=out.dtype)
        draw(chunk, *args, **{**kwargs, "generator": _generator(seed, key, 0)})
        out.copy_(chunk)
        return
    rows = chunk_rows(shape)
    start, stop = region.offset[0], region.offset[0] + region.shape[0]
    rest = region.slices()[1:]
    for c in range(start // rows, -(-stop // rows)):
        first, last = c * rows, min((c + 1) * rows, shape[0])
        chunk = torch.empty((last - first, *shape[1:]), dtype=out.dtype)
        draw(chunk, *args, **{**kwargs, "generator": _generator(seed, key, c)})
        lo, hi = max(first, start), min(last, stop)
        out[lo - start : hi - start].copy_(chunk[(slice(lo - first, hi - first), *rest)])


@dataclass(frozen=True)
class _Write:
    """One recorded in-place op on a model tensor: ``func(tensor, *args, **kwargs)``, a keyed
    draw when ``key`` is set."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: tuple[str, int] | None


def _replay(
    writes: Sequence[_Write],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    region: Region,
    local: torch.Tensor,
    seed: int,
) -> None:
    """Run a tensor's recorded writes on the ``region`` of it that ``local`` holds."""
    in_place = local.device.type == "cpu" and local.dtype == dtype and local.is_contiguous()
    work = local if in_place else torch.empty(region.shape, dtype=dtype)
    slices = region.slices()
    for write in writes:
        if write.key is not None:
            draw_into(work, write.func, write.args, write.kwargs, shape, region, seed, write.key)
            continue
        args = [a.expand(shape)[slices] if isinstance(a, torch.Tensor) else a for a in write.args]
        write.func(work, *args, **write.kwargs)
    if not in_place:
        local.copy_(work)


# ---------------------------------------------------------------------------- model tensors


class _LooksReal(torch.Tensor):
    """A meta tensor whose ``is_meta`` is False, so that initialisation code that skips meta
    tensors runs on it as on a real one (its ops still run on meta)."""

    @property
    def is_meta(self) -> bool:  # type: ignore[override]
        return False


def _on_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


def _meta_copy(model: nn.Module, dtype: torch.dtype | None, *, looks_real: bool) -> nn.Module:
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        meta = torch.empty_like(tensor, device="meta", dtype=cast)
        if looks_real:
            meta = meta.as_subclass(_LooksReal)
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class _TensorTable:
    """A model's parameters and buffers by their first names."""

    canonical: dict[str, str]
    """Every name (tied aliases too) → the first name of its tensor."""
    tensors: dict[str, torch.Tensor]
    """First name → tensor."""
    by_storage: dict[int, str]
    """Storage → first name of the tensor using it."""


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _tensor_table(model: nn.Module) -> _TensorTable:
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        head = first.setdefault(id(tensor), name)
        canonical[name] = head
        tensors.setdefault(head, tensor)
    return _TensorTable(canonical, tensors, {_storage(t): n for n, t in tensors.items()})


def _allocate(model: nn.Module, names: Collection[str] | None) -> None:
    """Give the meta tensors of ``model`` named in ``names`` (first names; ``None``: all)
    uninitialised CPU storage, one tensor per tie group."""
    table = _tensor_table(model)
    memo: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for local, tensor in store.items():
                if tensor is None or not _on_meta(tensor):
                    continue
                name = f"{prefix}.{local}" if prefix else local
                if names is not None and table.canonical[name] not in names:
                    continue
                if id(tensor) not in memo:
                    real = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
                    if isinstance(tensor, nn.Parameter):
                        real = nn.Parameter(real, requires_grad=tensor.requires_grad)
                    memo[id(tensor)] = real
                store[local] = memo[id(tensor)]


def _forget_hf_initialisation(model: nn.Module) -> None:
    """Clear transformers' "already initialised" marks, so its ``init_weights`` writes every
    tensor."""
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.__dict__.pop("_is_hf_initialized", None)


def _run_keyed(model: nn.Module, seed: int, *, record: bool) -> _KeyedInit:
    """Run the model's own initialisation with keyed draws (``torch.nn.init.trunc_normal_``
    included); returns the mode, holding the recording when ``record``."""
    _forget_hf_initialisation(model)
    mode = _KeyedInit(seed, _tensor_table(model), record=record)
    original = torch.nn.init.trunc_normal_

    def trunc_normal_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        named = dict(zip(_TRUNC_NORMAL_PARAMETERS, args, strict=False)) | kwargs
        return mode.keyed_call(_TRUNC_NORMAL, tensor, named)

    torch.nn.init.trunc_normal_ = trunc_normal_
    try:
        with torch.no_grad(), mode:
            run_own_init(model)
    finally:
        torch.nn.init.trunc_normal_ = original
    return mode


@dataclass(frozen=True)
class _Recording:
    table: _TensorTable
    writes: dict[str, list[_Write]]
    """First name → the in-place ops writing it, in order (opaque tensors included)."""
    opaque: set[str]
    """Tensors that some write makes impossible to replay on a region."""


def _record(model: nn.Module, seed: int) -> _Recording:
    """Run the initialisation on a meta copy of ``model``, recording each tensor's writes."""
    copied = _meta_copy(model, None, looks_real=True)
    table = _tensor_table(copied)
    mode = _run_keyed(copied, seed, record=True)
    after = _tensor_table(copied)
    replaced = {
        f
        for f, t in table.tensors.items()
        if after.tensors.get(f) is not t or _storage(t) != _storage(after.tensors[f])
    }
    for fqn in replaced:
        mode.writes.setdefault(fqn, [])
    return _Recording(table, mode.writes, mode.opaque | replaced)


class _ReadsUnheld(RuntimeError):
    """An initialisation computed a real value from a meta one (a tensor not materialised)."""


def _run_with_real(
    model: nn.Module, seed: int, names: Collection[str] | None
) -> dict[str, torch.Tensor]:
    """Run the initialisation on a meta copy of ``model`` whose tensors ``names`` (``None``:
    all) are real; return them (first name → CPU tensor). Raises ``_ReadsUnheld`` when their
    values depend on a tensor left on meta."""
    copied = _meta_copy(model, None, looks_real=True)
    _allocate(copied, names)
    _run_keyed(copied, seed, record=False)
    after = _tensor_table(copied).tensors
    values = {f: t for f, t in after.items() if names is None or f in names}
    left = sorted(f for f, t in values.items() if _on_meta(t))
    if left:
        raise _ReadsUnheld(f"{left} ended on meta")
    return values


def _tensors_in(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _written(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensor arguments ``func`` writes in place (``self``, ``out``...)."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        written.extend(_tensors_in(value))
    return written


def _takes_generator(func: Any) -> bool:
    return any(a.name == "generator" for a in func._schema.arguments)


class _KeyedInit(TorchDispatchMode):
    """Runs an initialisation with keyed draws (module docstring). ``record=True`` (every model
    tensor on meta): also record each model tensor's writes and which are opaque. Either way, a
    real value computed from a meta input raises ``_ReadsUnheld``."""

    def __init__(self, seed: int, table: _TensorTable, *, record: bool) -> None:
        super().__init__()
        self.seed = seed
        self.table = table
        self.record = record
        self.counts: dict[str, int] = {}
        self.writes: dict[str, list[_Write]] = {}
        self.opaque: set[str] = set()
        self._inside_draw = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if self._inside_draw:  # the ops of a keyed draw on a chunk
            return func(*args, **kwargs)
        written = _written(func, args, kwargs)
        owners = [self.table.by_storage.get(_storage(t)) for t in written]
        if func.overloadpacket in RANDOM_FILLS and len(written) == 1 and written[0] is args[0]:
            rest = {k: v for k, v in kwargs.items() if k != "generator"}
            if not _tensors_in((args[1:], rest)):
                return self.keyed_call(func, args[0], rest, args[1:])
        inputs = _tensors_in((args, kwargs))
        if torch.Tag.nondeterministic_seeded in func.tags:
            out = self._seeded(func, args, kwargs, next((o for o in owners if o), None))
        else:
            out = func(*args, **kwargs)
        if any(_on_meta(t) for t in inputs) and any(
            not _on_meta(t) for t in [*written, *_tensors_in(out)]
        ):
            raise _ReadsUnheld(f"{func} computed a real tensor from a meta one")
        if self.record:
            for tensor, fqn in zip(written, owners, strict=True):
                if fqn is not None:
                    self._record_write(fqn, tensor, func, args, kwargs)
        return out

    def _next(self, name: str) -> tuple[str, int]:
        index = self.counts.get(name, 0)
        self.counts[name] = index + 1
        return name, index

    def keyed_call(
        self,
        draw: Callable[..., Any],
        target: torch.Tensor,
        kwargs: Mapping[str, Any],
        args: Sequence[Any] = (),
    ) -> torch.Tensor:
        """A keyed draw ``draw(target, *args, **kwargs)`` (a random fill, or
        ``trunc_normal_``): chunk by chunk when ``target`` is a whole model tensor, else with
        one generator keyed by the tensor ``target`` views (or by its index among anonymous
        draws)."""
        kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        fqn = self.table.by_storage.get(_storage(target))
        whole = fqn is not None and _is_whole_alias(target, self.table.tensors[fqn])
        key = self._next(_ANONYMOUS if fqn is None else fqn)
        if self.record and fqn is not None:
            if whole:
                self.writes.setdefault(fqn, []).append(_Write(draw, tuple(args), kwargs, key))
            else:
                self.writes.setdefault(fqn, [])
                self.opaque.add(fqn)
        if _on_meta(target):
            return target
        self._inside_draw = True
        try:
            if whole:
                shape = tuple(target.shape)
                draw_into(target, draw, args, kwargs, shape, Region.whole(shape), self.seed, key)
            else:
                draw(target, *args, **kwargs, generator=_generator(self.seed, key, 0))
        finally:
            self._inside_draw = False
        return target

    def _seeded(self, func, args, kwargs, fqn):  # noqa: ANN001, ANN202
        """Any other random op, keyed by the model tensor it writes, else anonymously."""
        key = self._next(_ANONYMOUS if fqn is None else fqn)
        if _takes_generator(func):
            return func(*args, **{**kwargs, "generator": _generator(self.seed, key, 0)})
        with _default_generator_seeded(key_seed(self.seed, *key, 0)):
            return func(*args, **kwargs)

    def _record_write(self, fqn, tensor, func, args, kwargs) -> None:  # noqa: ANN001
        self.writes.setdefault(fqn, [])
        others = _tensors_in(args[1:])
        base = self.table.tensors[fqn]
        elementwise = func.overloadpacket in ELEMENTWISE_WRITES or torch.Tag.pointwise in func.tags
        replayable = (
            elementwise
            and torch.Tag.nondeterministic_seeded not in func.tags
            and tensor is args[0]
            and _is_whole_alias(tensor, base)
            and not _tensors_in(kwargs)
            and all(not _on_meta(t) and _broadcasts(t, base.shape) for t in others)
        )
        if replayable:
            self.writes[fqn].append(_Write(func, tuple(args[1:]), kwargs, None))
        else:
            self.opaque.add(fqn)


def _is_whole_alias(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    return (
        tensor.shape == base.shape
        and tensor.stride() == base.stride()
        and tensor.storage_offset() == base.storage_offset()
        and tensor.dtype == base.dtype
    )


def _broadcasts(tensor: torch.Tensor, shape: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(tensor.shape, shape) == shape
    except RuntimeError:
        return False


@contextmanager
def _default_generator_seeded(value: int) -> Iterator[None]:
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(value)
    try:
        yield
    finally:
        generator.set_state(state)


class _AllocationMeter(TorchDispatchMode):
    """Counts the tensors the ops run under it allocate (outputs sharing no input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in _tensors_in((args, kwargs)) if not _on_meta(t)}
        for tensor in _tensors_in(out):
            if _on_meta(tensor) or _storage(tensor) in inputs:
                continue
            size = tensor.untyped_storage().nbytes()
            self.largest = max(self.largest, size)
            self.total += size
        return out
