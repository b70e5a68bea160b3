"""hierarchical-ap: an Alpa-style two-level automatic parallelisation compiler for PyTorch.

``compile_parallel`` and ``ParallelExecutable`` (the front door, which imports the planners
and the runtime) are loaded on first use, so that importing the foundations stays light.
"""

from typing import Any

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.errors import (
    CaptureError,
    ClusterSpecError,
    HapError,
    ModelSpecError,
    NoFeasiblePlanError,
    PlanError,
    PlannerOptionError,
    WorkerFailedError,
)
from hierarchical_ap.graph import OpGraph, capture
from hierarchical_ap.plan import ParallelPlan

__all__ = [
    "CaptureError",
    "Cluster",
    "ClusterSpecError",
    "HapError",
    "ModelSpecError",
    "NoFeasiblePlanError",
    "OpGraph",
    "ParallelExecutable",
    "ParallelPlan",
    "PlanError",
    "PlannerOptionError",
    "WorkerFailedError",
    "capture",
    "compile_parallel",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "compile_parallel":
        from hierarchical_ap.api import compile_parallel

        return compile_parallel
    if name == "ParallelExecutable":
        from hierarchical_ap.api import ParallelExecutable

        return ParallelExecutable
    raise AttributeError(f"module 'hierarchical_ap' has no attribute {name!r}")
