"""Checkpoints: sharded parameters and optimizer state with ``torch.distributed.checkpoint``.

A checkpoint is a directory that holds

* DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per worker): every worker saves the
  local shards of the DTensors it owns, keyed plan-independently — a parameter or persistent
  buffer at its ``model.state_dict()`` key (a tied parameter at its first name), an optimizer
  state entry at ``optimizer/<key>/<state name>`` (Adam's ``exp_avg`` and ``exp_avg_sq`` are
  DTensors in their parameter's placement, its ``step`` a scalar);
  The learning-rate schedule's ``state_dict`` (the same on every worker) is one more entry,
  ``lr_scheduler``, saved by rank 0 as bytes (``scheduler_entry``);
* ``hap_checkpoint.json``: the step count, the model's fingerprint and tensor list, the plan's
  fingerprint, the optimizer's class and the schedule's class (``null``: none).

Because DCP records each shard by its offset in the full tensor, loading into an executable of
another plan or number of workers reshards: every worker reads the pieces of the saved shards
that overlap its own. A tensor that several stages hold (a tied embedding, possibly on meshes
with different placements) is saved once, by its lowest stage, since DCP refuses overlapping
chunks of one key; on load every copy reads it.

Nothing is half-written: workers save into a hidden staging directory next to the target, the
metadata file is written last, and only then is the staging directory renamed into place
(replacing an older checkpoint there). With several hosts, the path must be on a file system
they share.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from hierarchical_ap.errors import CheckpointError
from hierarchical_ap.plan import ParallelPlan

logger = logging.getLogger(__name__)

FORMAT = "hierarchical-ap checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "hap_checkpoint.json"
OPTIMIZER_PREFIX = "optimizer/"
LR_SCHEDULER_KEY = "lr_scheduler"

TensorListing = dict[str, tuple[tuple[int, ...], str]]
"""State key → (shape, dtype name) of a model's full tensors."""


# ----------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class CheckpointMetadata:
    """What ``hap_checkpoint.json`` records besides the shards."""

    steps: int
    model: str
    model_fingerprint: str
    plan_fingerprint: str
    tensors: TensorListing
    optimizer: str
    workers: int
    lr_scheduler: str | None = None
    """The learning-rate schedule's class; ``None``: trained without one."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "steps": self.steps,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "plan_fingerprint": self.plan_fingerprint,
            "tensors": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.tensors.items()},
            "optimizer": self.optimizer,
            "workers": self.workers,
            "lr_scheduler": self.lr_scheduler,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: Path) -> CheckpointMetadata:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where} is not a {FORMAT} of version {FORMAT_VERSION} (found "
                f"{data.get('format')!r} version {data.get('format_version')!r}); pass a "
                "directory written by ParallelExecutable.save_checkpoint of this version"
            )
        try:
            return cls(
                steps=int(data["steps"]),
                model=str(data["model"]),
                model_fingerprint=str(data["model_fingerprint"]),
                plan_fingerprint=str(data["plan_fingerprint"]),
                tensors={
                    k: (tuple(int(s) for s in v["shape"]), str(v["dtype"]))
                    for k, v in data["tensors"].items()
                },
                optimizer=str(data["optimizer"]),
                workers=int(data["workers"]),
                lr_scheduler=_optional_str(data.get("lr_scheduler")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{where} is damaged ({type(exc).__name__}: {exc}); use another checkpoint"
            ) from exc


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def plan_fingerprint(plan: ParallelPlan) -> str:
    """First 16 hex digits of the sha256 of the plan's compact JSON."""
    return hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()[:16]


def tensor_listing(state: Mapping[str, torch.Tensor]) -> TensorListing:
    """(shape, dtype name) of each tensor of a (meta or real) state dict."""
    return {
        key: (tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))
        for key, t in state.items()
    }


def read_metadata(path: str | os.PathLike[str]) -> CheckpointMetadata:
    """The metadata of the checkpoint at ``path``; ``CheckpointError`` if there is none."""
    directory = Path(path)
    file = directory / METADATA_FILE
    if not file.is_file():
        what = "does not exist" if not directory.exists() else f"has no {METADATA_FILE}"
        raise CheckpointError(
            f"no checkpoint at {directory}: it {what}; pass a directory written by "
            "ParallelExecutable.save_checkpoint (an interrupted save leaves none behind)"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not JSON ({exc}); use another checkpoint") from exc
    return CheckpointMetadata.from_dict(data, directory)


def check_compatible(
    saved: CheckpointMetadata,
    *,
    model_fingerprint: str,
    tensors: TensorListing,
    optimizer: str,
    lr_scheduler: str | None,
    where: Path,
) -> None:
    """Raise ``CheckpointError`` unless the checkpoint was saved from the same model (same
    parameter and buffer keys, shapes and dtypes) trained with the same optimizer class, and
    with the same learning-rate schedule class if it was saved with one (a schedule may start
    on a checkpoint saved without one); the plan and the number of workers may differ."""
    if saved.model_fingerprint != model_fingerprint or saved.tensors != tensors:
        raise CheckpointError(
            f"the checkpoint at {where} was saved from another model ({saved.model!r}, "
            f"fingerprint {saved.model_fingerprint}, not {model_fingerprint}): "
            f"{describe_difference(saved.tensors, tensors)}; load it into an executable "
            "compiled for the model it was saved from"
        )
    if saved.optimizer != optimizer:
        raise CheckpointError(
            f"the checkpoint at {where} holds {saved.optimizer} state but this executable's "
            f"optimizer is a {optimizer}; compile with an optimizer_fn that builds a "
            f"{saved.optimizer}"
        )
    if saved.lr_scheduler is not None and saved.lr_scheduler != lr_scheduler:
        have = "none" if lr_scheduler is None else f"a {lr_scheduler}"
        raise CheckpointError(
            f"the checkpoint at {where} holds the state of a {saved.lr_scheduler} learning-rate "
            f"schedule but this executable has {have}; compile with an lr_scheduler_fn that "
            f"builds a {saved.lr_scheduler}"
        )


def describe_difference(saved: TensorListing, current: TensorListing, limit: int = 3) -> str:
    """A short account of how two tensor listings differ."""
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    parts = []
    if only_saved:
        parts.append(f"it has {_some(only_saved, limit)} which this model lacks")
    if only_current:
        parts.append(f"it lacks {_some(only_current, limit)}")
    for key in changed[:limit]:
        (s_shape, s_dtype), (c_shape, c_dtype) = saved[key], current[key]
        parts.append(f"'{key}' is {list(s_shape)} {s_dtype} there, {list(c_shape)} {c_dtype} here")
    return "; ".join(parts) or "the tensors agree but the parameter fingerprints differ"


def _some(keys: list[str], limit: int) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --------------------------------------------------------------------- directory handling


def staging_directory(path: str | os.PathLike[str]) -> Path:
    """A fresh hidden directory name next to ``path`` to write a checkpoint into."""
    target = Path(path).absolute()
    if target.exists() and not (target / METADATA_FILE).is_file():
        raise CheckpointError(
            f"{target} exists and is not a checkpoint; pass a new path or a previous "
            "checkpoint's directory (which is then replaced)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"


def publish(staging: Path, path: str | os.PathLike[str], metadata: CheckpointMetadata) -> Path:
    """Write the metadata into ``staging`` and rename it to ``path`` (an older checkpoint at
    ``path`` is moved aside first and deleted after)."""
    target = Path(path).absolute()
    (staging / METADATA_FILE).write_text(json.dumps(metadata.to_dict(), indent=1))
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint of step %d written to %s", metadata.steps, target)
    return target


def discard(staging: Path) -> None:
    """Remove a staging directory after a failed save."""
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------- worker-side state dicts


def optimizer_key(fqn: str, name: str) -> str:
    return f"{OPTIMIZER_PREFIX}{fqn}/{name}"


def optimizer_entries(states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The optimizer state of parameters (FQN → {state name → value}, tensors DTensors in
    their parameter's placement, as ``ShardOptimizer.state_of`` gives them) as flat DCP
    entries; ``None`` values are left out."""
    return {
        optimizer_key(fqn, name): value
        for fqn, state in states.items()
        for name, value in state.items()
        if value is not None
    }


def scheduler_entry(scheduler: torch.optim.lr_scheduler.LRScheduler) -> bytes:
    """The ``LR_SCHEDULER_KEY`` entry: the schedule's ``state_dict`` serialised by
    ``torch.save`` (bytes, so that DCP stores it as one value whatever it holds)."""
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    return buffer.getvalue()


def load_scheduler_entry(scheduler: torch.optim.lr_scheduler.LRScheduler, entry: bytes) -> None:
    """Restore ``scheduler`` from its ``scheduler_entry``, and its optimizer's learning rates
    to the schedule's last ones (schedules such as ``CosineAnnealingLR`` compute the next rate
    from the current one, which the optimizer state does not carry)."""
    scheduler.load_state_dict(torch.load(io.BytesIO(entry), weights_only=False))
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def saved_entries(path: str | os.PathLike[str]) -> dict[str, Any]:
    """DCP's storage metadata of every key of the checkpoint at ``path``."""
    return dict(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def optimizer_templates(
    saved: Mapping[str, Any], params: Mapping[str, torch.nn.Parameter]
) -> dict[str, dict[str, Any]]:
    """FQN → {state name → empty value to load into}, for each saved optimizer entry of
    ``params``: a DTensor in the parameter's placements where the saved tensor has the
    parameter's shape (moments), else a plain tensor on the CPU (Adam's ``step``) or, for
    non-tensor values, a placeholder that DCP replaces."""
    templates: dict[str, dict[str, Any]] = {}
    for key, meta in saved.items():
        if not key.startswith(OPTIMIZER_PREFIX):
            continue
        fqn, name = key.removeprefix(OPTIMIZER_PREFIX).rsplit("/", 1)
        param = params.get(fqn)
        if param is not None:
            templates.setdefault(fqn, {})[name] = _template(key, meta, param)
    return templates


def _template(key: str, meta: Any, param: torch.nn.Parameter) -> Any:
    if isinstance(meta, TensorStorageMetadata):
        dtype = meta.properties.dtype
        if tuple(meta.size) == tuple(param.shape):
            return torch.zeros_like(param.detach(), dtype=dtype)
        return torch.zeros(tuple(meta.size), dtype=dtype)
    if isinstance(meta, BytesStorageMetadata):
        return None
    raise CheckpointError(
        f"optimizer entry '{key}' has unknown storage {meta}; use another checkpoint"
    )


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into ``target`` (both DTensors on one mesh, possibly with different
    placements — a collective on that mesh — or plain tensors)."""
    with torch.no_grad():
        if isinstance(target, DTensor):
            assert isinstance(source, DTensor)
            source = source.redistribute(target.device_mesh, target.placements)
            target.to_local().copy_(source.to_local())
        else:
            target.copy_(source)


def clone_like(value: Any, like: torch.Tensor) -> Any:
    """A copy of the optimizer state ``value`` laid out for a parameter copy ``like`` (a DTensor
    moment redistributed to ``like``'s placements; anything else cloned)."""
    if isinstance(value, DTensor) and isinstance(like, DTensor) and value.shape == like.shape:
        return value.redistribute(like.device_mesh, like.placements).clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


def save_shards(state: Mapping[str, Any], directory: Path) -> None:
    """``dcp.save`` of this worker's entries into ``directory`` (every worker calls it)."""
    dcp.save(dict(state), storage_writer=dcp.FileSystemWriter(str(directory)))


def load_shards(state: dict[str, Any], directory: Path) -> None:
    """``dcp.load`` into this worker's entries (tensors in place; others replaced in
    ``state``); every worker calls it."""
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)))


def lowest_holders(held: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Key → the lowest stage that holds it, over every worker's {key: its lowest stage}."""
    owners: dict[str, int] = {}
    for worker in held:
        for key, stage in worker.items():
            owners[key] = min(stage, owners.get(key, stage))
    return owners
