"""The parallel plan: the planner's output and the input of the runtime, `hap simulate` and
`hap show`.

A `ParallelPlan` splits the captured graph into planning layers (`PlanLayer`, contiguous node
ranges in topological order), groups consecutive layers into pipeline stages (`PlanStage`), and
gives each stage a submesh of the cluster, a 2D logical mesh over its devices, a recomputation
mode and a storage placement per parameter. It also keeps the predictions the planner made
(time per micro-batch, memory per device, step time) so that a run can be compared with them.

Plans are stored as JSON only (never pickle) with a `schema_version`; `ParallelPlan.from_dict`
rejects another version, missing or unknown keys and wrongly typed values with a `PlanError`
naming the field. Constructors check types (and turn lists into tuples); `ParallelPlan.validate`
checks that the plan is consistent in itself; `ParallelPlan.check_matches` that it fits a given
captured graph and cluster.

Interleaved schedules (Megatron's layout) have `virtual_stages = v` chunks per rank: with `p =
len(stages) // v` ranks, stage `i` runs on the devices of stage `i % p`, so rank `r` holds stages
`r, r + p, r + 2p, …`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import ClusterSpecError, PlanError

if TYPE_CHECKING:
    from hierarchical_ap.graph import OpGraph

__all__ = [
    "PRECISIONS",
    "RECOMPUTE_MODES",
    "SCHEDULES",
    "SCHEMA_VERSION",
    "MemoryBreakdown",
    "ParallelPlan",
    "PlanLayer",
    "PlanStage",
    "fingerprint",
    "model_fingerprint",
]

SCHEMA_VERSION = 1
SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE_MODES = ("none", "selective", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
MESH_AXES = 2
REPLAN = "re-run `hap plan` to write a new plan"

_PLACEMENT_RE = re.compile(r"^(?:R|S\((0|[1-9][0-9]*)\))$")


class _FieldError(PlanError):
    """A PlanError about one field, so that `from_dict` can prefix the path of nested objects."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"plan field '{field}' {problem}; {REPLAN}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[_FieldError], tuple[str, str]]:
        return type(self), (self.field, self.problem)


def _join(where: str, field: str) -> str:
    return f"{where}.{field}" if where else field


@contextmanager
def _at(where: str) -> Iterator[None]:
    """Prefix the field of a `_FieldError` raised inside with `where` (the nested object's path)."""
    try:
        yield
    except _FieldError as exc:
        raise _FieldError(_join(where, exc.field), exc.problem) from None


# ------------------------------------------------------------------------------ type checks


def _int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(field, f"must be an integer, got {value!r}")
    return value


def _float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _FieldError(field, f"must be a finite number, got {value!r}")
    return float(value)


def _str(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _FieldError(field, f"must be a string, got {value!r}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda field, value: None if value is None else check(field, value)


def _items(field: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _FieldError(field, f"must be a list, got {value!r}")
    return tuple(value)


def _ints(field: str, value: Any) -> tuple[int, ...]:
    return tuple(_int(f"{field}[{i}]", v) for i, v in enumerate(_items(field, value)))


def _strs(field: str, value: Any) -> tuple[str, ...]:
    return tuple(_str(f"{field}[{i}]", v) for i, v in enumerate(_items(field, value)))


def _pair(field: str, value: Any) -> tuple[int, int]:
    pair = _ints(field, value)
    if len(pair) != 2:
        raise _FieldError(field, f"must be two integers, got {value!r}")
    return pair[0], pair[1]


def _mapping(field: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _FieldError(field, f"must be a JSON object, got {value!r}")
    return value


def _placements(field: str, value: Any) -> Mapping[str, tuple[str, ...]]:
    placements = {
        _str(f"{field} key", fqn): _strs(f"{field}[{fqn!r}]", p)
        for fqn, p in _mapping(field, value).items()
    }
    return MappingProxyType(placements)


def _cluster(field: str, value: Any) -> Mapping[str, Any]:
    """The canonical `Cluster.to_dict()` form of a cluster description."""
    data = _mapping(field, value)
    try:
        canonical = Cluster.from_dict(data).to_dict()
    except ClusterSpecError as exc:
        raise _FieldError(field, f"must be `Cluster.to_dict()` of a valid cluster: {exc}") from None
    return MappingProxyType(canonical)


def _instance(cls: type) -> Callable[[str, Any], Any]:
    def check(field: str, value: Any) -> Any:
        if not isinstance(value, cls):
            raise _FieldError(field, f"must be a {cls.__name__}, got {value!r}")
        return value

    return check


def _instances(cls: type) -> Callable[[str, Any], tuple[Any, ...]]:
    check = _instance(cls)
    return lambda field, value: tuple(
        check(f"{field}[{i}]", v) for i, v in enumerate(_items(field, value))
    )


def _coerce(obj: Any, checks: Mapping[str, Callable[[str, Any], Any]]) -> None:
    """Check the type of each field of the frozen dataclass `obj` and store the coerced value."""
    for name, check in checks.items():
        object.__setattr__(obj, name, check(name, getattr(obj, name)))


# ------------------------------------------------------------------------------ fingerprints


def fingerprint(param_shapes: Mapping[str, tuple[Sequence[int], str]]) -> str:
    """First 16 hex digits of the sha256 of the sorted (parameter FQN, shape, dtype) list."""
    entries = sorted(
        [fqn, [int(s) for s in shape], str(dtype)] for fqn, (shape, dtype) in param_shapes.items()
    )
    text = json.dumps(entries, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(graph: OpGraph) -> str:
    """`fingerprint` of a captured graph's parameters (dtypes as "float32", "bfloat16", …)."""
    return fingerprint(
        {
            fqn: (meta.shape, str(meta.dtype).removeprefix("torch."))
            for fqn, meta in graph.param_shapes.items()
        }
    )


# ------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class PlanLayer:
    """A planning layer: a contiguous range of the captured graph's nodes (topological order)."""

    name: str
    """E.g. "blocks.0-3" or "embed+blocks.0"."""
    module_layers: tuple[str, ...]
    """Names of the OpGraph layers inside (may be empty for clustered op ranges)."""
    first_node: str
    last_node: str

    def __post_init__(self) -> None:
        _coerce(self, {"name": _str, "module_layers": _strs, "first_node": _str, "last_node": _str})


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak memory of one device, in bytes."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int

    def __post_init__(self) -> None:
        _coerce(self, {f.name: _int for f in fields(self)})

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class PlanStage:
    """One pipeline stage: a range of planning layers on a submesh viewed as a logical mesh."""

    layers: tuple[int, int]
    """[first, last] indices into `ParallelPlan.layers`, inclusive."""
    hosts: tuple[int, ...]
    """Host indices the submesh covers, increasing."""
    devices: tuple[int, ...]
    """Global device ids (host * devices_per_host + local), row-major over the logical mesh."""
    submesh: tuple[int, int]
    """(hosts, devices per host): the Alpa submesh shape."""
    logical_mesh: tuple[int, int]
    """(rows, cols) with rows * cols == len(devices)."""
    recompute: str
    """One of `RECOMPUTE_MODES`."""
    param_placements: Mapping[str, tuple[str, ...]]
    """Parameter FQN -> storage placement per logical mesh axis: "R" or "S(dim)"."""
    time_per_microbatch_s: float
    """Predicted forward + backward seconds per micro-batch."""
    memory: MemoryBreakdown
    """Predicted peak per device of this stage."""

    def __post_init__(self) -> None:
        _coerce(
            self,
            {
                "layers": _pair,
                "hosts": _ints,
                "devices": _ints,
                "submesh": _pair,
                "logical_mesh": _pair,
                "recompute": _str,
                "param_placements": _placements,
                "time_per_microbatch_s": _float,
                "memory": _instance(MemoryBreakdown),
            },
        )

    def __reduce__(self) -> tuple[Callable[..., PlanStage], tuple[Any, ...]]:
        """Pickle (e.g. to Ray actors) through the JSON form: mapping proxies do not pickle."""
        return PlanStage.from_dict, (_plain(self),)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> PlanStage:
        """The stage of `to_dict` output; `where` prefixes field names in errors."""
        kwargs = _fields_of(cls, data, where)
        kwargs["memory"] = _build(MemoryBreakdown, kwargs["memory"], _join(where, "memory"))
        with _at(where):
            return cls(**kwargs)


def index_span(indices: Sequence[int]) -> str:
    """Host or device indices for people: ``3``, ``0-3`` for a contiguous run, else ``0,2``."""
    if len(indices) == 1:
        return str(indices[0])
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return ",".join(map(str, indices))


@dataclass(frozen=True)
class ParallelPlan:
    """A complete parallel plan: layers, stages, schedule and the planner's predictions."""

    model: str
    """The model name or spec as the user gave it."""
    model_fingerprint: str
    """`model_fingerprint` of the captured graph the plan was made for."""
    cluster: Mapping[str, Any]
    """`Cluster.to_dict()` of the cluster the plan was made for."""
    global_batch: int
    micro_batch_size: int
    """Sequences per micro-batch over the whole pipeline."""
    num_microbatches: int
    schedule: str
    """One of `SCHEDULES`."""
    virtual_stages: int
    """Model chunks per rank: 1 unless the schedule is interleaved."""
    precision: str
    """One of `PRECISIONS`."""
    layers: tuple[PlanLayer, ...]
    stages: tuple[PlanStage, ...]
    predicted_step_time_s: float
    predicted_peak_memory_bytes_per_device: int
    predicted_tflops_per_device: float
    planning_time_s: float | None = None
    seq_len: int | None = None
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _coerce(
            self,
            {
                "model": _str,
                "model_fingerprint": _str,
                "cluster": _cluster,
                "global_batch": _int,
                "micro_batch_size": _int,
                "num_microbatches": _int,
                "schedule": _str,
                "virtual_stages": _int,
                "precision": _str,
                "layers": _instances(PlanLayer),
                "stages": _instances(PlanStage),
                "predicted_step_time_s": _float,
                "predicted_peak_memory_bytes_per_device": _int,
                "predicted_tflops_per_device": _float,
                "planning_time_s": _optional(_float),
                "seq_len": _optional(_int),
                "notes": _strs,
                "schema_version": _int,
            },
        )

    # ----------------------------------------------------------------------------- shape

    @property
    def num_ranks(self) -> int:
        """Number of distinct device groups (pipeline ranks): len(stages) // virtual_stages."""
        return len(self.stages) // self.virtual_stages

    @property
    def num_devices(self) -> int:
        """Number of distinct devices the stages use."""
        return len({d for stage in self.stages for d in stage.devices})

    def stage_layer_names(self, index: int) -> str:
        """The layers stage ``index`` runs: one name, or "first … last"."""
        first, last = self.stages[index].layers
        if first == last:
            return self.layers[first].name
        return f"{self.layers[first].name} … {self.layers[last].name}"

    def __str__(self) -> str:
        """A few lines for people (``repr`` keeps every field): the schedule, each stage's
        layers, devices, mesh, recomputation and predicted time, and the predicted step."""
        chunks = f" (v={self.virtual_stages})" if self.virtual_stages > 1 else ""
        lines = [
            f"{self.model}: {len(self.stages)} stage(s), schedule {self.schedule}{chunks}, "
            f"{self.num_microbatches} micro-batches of {self.micro_batch_size}, {self.precision}"
        ]
        for index, stage in enumerate(self.stages):
            lines.append(
                f"  stage {index}: {self.stage_layer_names(index)} on device(s) "
                f"{index_span(stage.devices)}, mesh "
                f"{'x'.join(map(str, stage.logical_mesh))}, recompute {stage.recompute}, "
                f"{stage.time_per_microbatch_s * 1e3:.2f} ms per micro-batch"
            )
        lines.append(
            f"predicted step {self.predicted_step_time_s * 1e3:.2f} ms, peak "
            f"{self.predicted_peak_memory_bytes_per_device / 2**30:.2f} GiB per device"
        )
        return "\n".join(lines)

    # -------------------------------------------------------------------------- JSON I/O

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (schema_version first); `from_dict(plan.to_dict()) == plan`."""
        data = _plain(self)
        return {"schema_version": data.pop("schema_version"), **data}

    def __reduce__(self) -> tuple[Callable[..., ParallelPlan], tuple[Any, ...]]:
        """Pickle (e.g. to Ray actors) through the JSON form: mapping proxies do not pickle."""
        return ParallelPlan.from_dict, (self.to_dict(),)

    @classmethod
    def from_dict(cls, data: Any) -> ParallelPlan:
        """The plan of `to_dict` output. Raises PlanError for another schema version, missing or
        unknown keys and wrongly typed values. Does not `validate`."""
        _check_schema_version(data)
        kwargs = _fields_of(cls, data, "")
        kwargs["layers"] = tuple(
            _build(PlanLayer, item, f"layers[{i}]")
            for i, item in enumerate(_items("layers", kwargs["layers"]))
        )
        kwargs["stages"] = tuple(
            PlanStage.from_dict(item, f"stages[{i}]")
            for i, item in enumerate(_items("stages", kwargs["stages"]))
        )
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ParallelPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"the plan is not valid JSON ({exc}); {REPLAN}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_json()` to `path`; returns the path."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ParallelPlan:
        """Read a plan written by `save`; errors name the file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PlanError(f"no plan file {str(path)!r}; write one with `hap plan`") from None
        try:
            return cls.from_json(text)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check that the plan is consistent in itself; raises PlanError naming the field."""
        if self.schema_version != SCHEMA_VERSION:
            raise _FieldError("schema_version", f"must be {SCHEMA_VERSION}")
        self._validate_batch()
        self._validate_schedule()
        self._validate_layers()
        self._validate_layer_coverage()
        for i, stage in enumerate(self.stages):
            with _at(f"stages[{i}]"):
                _validate_stage(stage, self.cluster)
        self._validate_device_groups()
        for name in ("predicted_step_time_s", "predicted_tflops_per_device", "planning_time_s"):
            _check_non_negative(name, getattr(self, name))
        _check_non_negative(
            "predicted_peak_memory_bytes_per_device", self.predicted_peak_memory_bytes_per_device
        )

    def _validate_batch(self) -> None:
        for name in ("global_batch", "micro_batch_size", "num_microbatches"):
            if getattr(self, name) < 1:
                raise _FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size * self.num_microbatches != self.global_batch:
            raise _FieldError(
                "global_batch",
                f"must equal micro_batch_size x num_microbatches = {self.micro_batch_size} x "
                f"{self.num_microbatches}, got {self.global_batch}",
            )
        if self.seq_len is not None and self.seq_len < 1:
            raise _FieldError("seq_len", f"must be >= 1, got {self.seq_len}")
        if self.precision not in PRECISIONS:
            raise _FieldError("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")

    def _validate_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise _FieldError("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        v = self.virtual_stages
        if self.schedule == "interleaved" and v < 2:
            raise _FieldError(
                "virtual_stages",
                f"must be >= 2 for the interleaved schedule, got {v} (use '1f1b' for 1)",
            )
        if self.schedule != "interleaved" and v != 1:
            raise _FieldError(
                "virtual_stages", f"must be 1 for the {self.schedule!r} schedule, got {v}"
            )
        if not self.stages or len(self.stages) % v:
            raise _FieldError(
                "stages",
                f"must be a positive multiple of virtual_stages={v} in number, got "
                f"{len(self.stages)}",
            )

    def _validate_layers(self) -> None:
        if not self.layers:
            raise _FieldError("layers", "must hold at least one planning layer")
        seen: set[str] = set()
        for i, layer in enumerate(self.layers):
            if not layer.name or layer.name in seen:
                raise _FieldError(
                    f"layers[{i}].name", f"must be a unique non-empty name, got {layer.name!r}"
                )
            seen.add(layer.name)

    def _validate_layer_coverage(self) -> None:
        expected = 0
        for i, stage in enumerate(self.stages):
            first, last = stage.layers
            if first != expected or last < first:
                raise _FieldError(
                    f"stages[{i}].layers",
                    f"must be [first, last] with first == {expected} (stages cover the layers "
                    f"in order without gaps) and last >= first, got {list(stage.layers)}",
                )
            expected = last + 1
        if expected != len(self.layers):
            raise _FieldError(
                f"stages[{len(self.stages) - 1}].layers",
                f"must end at the last layer {len(self.layers) - 1}, got "
                f"{list(self.stages[-1].layers)}",
            )

    def _validate_device_groups(self) -> None:
        """Ranks use disjoint devices covering the cluster; stage i runs on rank i % p's."""
        p = self.num_ranks
        owner: dict[int, int] = {}
        for i, stage in enumerate(self.stages[:p]):
            for d in stage.devices:
                if d in owner:
                    raise _FieldError(
                        f"stages[{i}].devices", f"reuses device {d} of stages[{owner[d]}]"
                    )
                owner[d] = i
        for i, stage in enumerate(self.stages[p:], start=p):
            if stage.devices != self.stages[i % p].devices:
                raise _FieldError(
                    f"stages[{i}].devices",
                    f"must equal those of stages[{i % p}] (virtual stage {i // p} of rank "
                    f"{i % p}), got {list(stage.devices)}",
                )
        unused = sorted(set(range(_cluster_devices(self.cluster))) - owner.keys())
        if unused:
            raise _FieldError("stages", f"must use every device of the cluster; unused: {unused}")

    # ------------------------------------------------------------------------ matching

    def check_matches(self, graph: OpGraph, cluster: Cluster) -> None:
        """Check that the plan is valid and was made for this graph's model and this cluster;
        raises PlanError naming the difference."""
        self.validate()
        self._check_model(graph)
        self._check_cluster(cluster)
        self._check_layers_in(graph)
        for i, stage in enumerate(self.stages):
            with _at(f"stages[{i}]"):
                _check_params_in(stage, graph)

    def _check_model(self, graph: OpGraph) -> None:
        actual = model_fingerprint(graph)
        if actual != self.model_fingerprint:
            raise PlanError(
                f"plan was made for a different model: {self.model!r} has fingerprint "
                f"{self.model_fingerprint} but the captured model's parameters give {actual}; "
                "re-plan with `hap plan` for this model"
            )

    def _check_cluster(self, cluster: Cluster) -> None:
        planned = _cluster_shape(self.cluster)
        actual = _cluster_shape(cluster.to_dict())
        if planned != actual:
            raise PlanError(
                f"plan was made for a {_shape_text(planned)} cluster but this cluster is "
                f"{_shape_text(actual)}; re-plan with `hap plan` for this cluster"
            )

    def _check_layers_in(self, graph: OpGraph) -> None:
        module_layers = {layer.name for layer in graph.layers}
        for i, layer in enumerate(self.layers):
            for field in ("first_node", "last_node"):
                node = getattr(layer, field)
                if node not in graph.nodes:
                    raise _FieldError(
                        f"layers[{i}].{field}", f"names node {node!r}, which the graph lacks"
                    )
            missing = [m for m in layer.module_layers if m not in module_layers]
            if missing:
                raise _FieldError(
                    f"layers[{i}].module_layers", f"names layers the graph lacks: {missing}"
                )


# --------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """JSON data of a plan value: dataclasses and mappings become dicts, tuples lists."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _fields_of(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The dataclass `cls`'s keyword arguments from the JSON object `data`, checking keys."""
    data = _mapping(where or "plan", data)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise _FieldError(_join(where, str(unknown[0])), "is not a field of the plan format")
    for f in fields(cls):
        if f.default is MISSING and f.name not in data:
            raise _FieldError(_join(where, f.name), "is missing")
    return {name: data[name] for name in names if name in data}


def _build(cls: type, data: Any, where: str) -> Any:
    """An instance of the flat dataclass `cls` from the JSON object `data` at path `where`."""
    kwargs = _fields_of(cls, data, where)
    with _at(where):
        return cls(**kwargs)


def _check_schema_version(data: Any) -> None:
    if not isinstance(data, Mapping) or "schema_version" not in data:
        raise PlanError(
            "the plan has no 'schema_version' (it is not a JSON object written by "
            f"`hap plan`); {REPLAN}"
        )
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise PlanError(
            f"plan field 'schema_version' is {version!r} but this hierarchical-ap reads version "
            f"{SCHEMA_VERSION}; {REPLAN} with this version"
        )


def _check_non_negative(field: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise _FieldError(field, f"must be >= 0, got {value}")


def _validate_stage(stage: PlanStage, cluster: Mapping[str, Any]) -> None:
    """Recompute mode, predictions, mesh shapes, device/host consistency and placements."""
    if stage.recompute not in RECOMPUTE_MODES:
        raise _FieldError("recompute", f"must be one of {RECOMPUTE_MODES}, got {stage.recompute!r}")
    _check_non_negative("time_per_microbatch_s", stage.time_per_microbatch_s)
    for f in fields(stage.memory):
        _check_non_negative(f"memory.{f.name}", getattr(stage.memory, f.name))
    _validate_stage_devices(stage, cluster)
    for fqn, placement in stage.param_placements.items():
        _validate_placement(f"param_placements[{fqn!r}]", placement)


def _validate_stage_devices(stage: PlanStage, cluster: Mapping[str, Any]) -> None:
    devices, total = stage.devices, _cluster_devices(cluster)
    devices_per_host = cluster["devices_per_host"]
    if (
        not devices
        or len(set(devices)) != len(devices)
        or not 0 <= min(devices) <= max(devices) < total
    ):
        raise _FieldError(
            "devices",
            f"must be distinct ids of the cluster's devices 0..{total - 1}, got {list(devices)}",
        )
    for field in ("logical_mesh", "submesh"):
        rows, cols = getattr(stage, field)
        if rows < 1 or cols < 1 or rows * cols != len(devices):
            raise _FieldError(
                field,
                f"must be two integers >= 1 whose product is the stage's {len(devices)} "
                f"devices, got {list(getattr(stage, field))}",
            )
    per_host = Counter(d // devices_per_host for d in devices)
    if list(stage.hosts) != sorted(per_host):
        raise _FieldError(
            "hosts",
            f"must be the hosts of its devices, {sorted(per_host)}, got {list(stage.hosts)}",
        )
    num_hosts, local = stage.submesh
    if num_hosts != len(per_host) or set(per_host.values()) != {local}:
        raise _FieldError(
            "submesh",
            f"must be (hosts, devices per host) of its devices, got {list(stage.submesh)} for "
            f"devices {list(devices)}",
        )
    if num_hosts > 1 and local != devices_per_host:
        raise _FieldError(
            "submesh",
            f"must use whole hosts ({devices_per_host} devices each) when it spans "
            f"{num_hosts} hosts, got {local} per host",
        )


def _validate_placement(field: str, placement: tuple[str, ...]) -> None:
    if len(placement) != MESH_AXES:
        raise _FieldError(
            field, f"must hold one placement per logical mesh axis (2), got {list(placement)}"
        )
    for p in placement:
        if not _PLACEMENT_RE.match(p):
            raise _FieldError(
                field,
                f"has {p!r}; a storage placement is 'R' (replicated) or 'S(d)' (sharded on "
                "dimension d >= 0), never 'P' (partial)",
            )


def _shard_dims(placement: tuple[str, ...]) -> list[int]:
    return [int(m.group(1)) for p in placement if (m := _PLACEMENT_RE.match(p)) and m.group(1)]


def _check_params_in(stage: PlanStage, graph: OpGraph) -> None:
    for fqn, placement in stage.param_placements.items():
        field = f"param_placements[{fqn!r}]"
        meta = graph.param_shapes.get(fqn)
        if meta is None:
            raise _FieldError(field, "names a parameter the model does not have")
        too_high = [d for d in _shard_dims(placement) if d >= len(meta.shape)]
        if too_high:
            raise _FieldError(
                field,
                f"shards dimension {too_high[0]} of a parameter of shape {list(meta.shape)}",
            )


def _cluster_devices(cluster: Mapping[str, Any]) -> int:
    return cluster["num_hosts"] * cluster["devices_per_host"]


def _cluster_shape(cluster: Mapping[str, Any]) -> tuple[int, int, str]:
    return cluster["num_hosts"], cluster["devices_per_host"], cluster["device"]["name"]


def _shape_text(shape: tuple[int, int, str]) -> str:
    return "x".join(str(s) for s in shape)
