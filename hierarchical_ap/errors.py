"""Exceptions that users can cause.

Every message names the cause and the fix, so that a user reading only the last line of a
traceback knows what to change.
"""

from __future__ import annotations


class HapError(Exception):
    """Base class of every error hierarchical-ap raises on purpose."""


class ClusterSpecError(HapError, ValueError):
    """A cluster description (spec string, file, Ray cluster) that cannot be used."""


class ModelSpecError(HapError, ValueError):
    """A model spec string that does not name a buildable model."""


class CaptureError(HapError):
    """A model that torch.export cannot capture (data-dependent control flow, unsupported Python)."""


class NoFeasiblePlanError(HapError):
    """No parallel plan fits in device memory."""


class PlanError(HapError, ValueError):
    """A parallel plan (file) that is malformed, inconsistent or made for another model or cluster."""


class PlannerOptionError(HapError, ValueError):
    """Planner or parallel-configuration options that cannot be used (batch, degrees, schedule)."""


class WorkerFailedError(HapError, RuntimeError):
    """A runtime worker died or failed during a step; names its pipeline stage and rank."""

    def __init__(self, message: str, *, stage: int | None = None, rank: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.rank = rank

    def __reduce__(self) -> tuple[type[WorkerFailedError], tuple[str], dict[str, int | None]]:
        return type(self), (str(self),), {"stage": self.stage, "rank": self.rank}


class CheckpointError(HapError, ValueError):
    """A checkpoint path that holds no checkpoint, or one saved from another model or
    optimizer, or a save target that is not a checkpoint directory."""


class JobSubmissionError(HapError):
    """A Ray job that cannot be submitted or followed: unreachable job server, missing or
    rejected authentication token, bad working directory or entrypoint."""


class InitialisationError(HapError, ValueError):
    """A meta-device model whose initialisation cannot give every tensor a value, or tensors to
    initialise that do not belong to the model."""
