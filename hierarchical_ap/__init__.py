"""hierarchical-ap: an Alpa-style two-level automatic parallelisation compiler for PyTorch."""

from hierarchical_ap.errors import (
    CaptureError,
    ClusterSpecError,
    HapError,
    ModelSpecError,
    NoFeasiblePlanError,
    PlanError,
    PlannerOptionError,
)
from hierarchical_ap.graph import OpGraph, capture

__all__ = [
    "CaptureError",
    "ClusterSpecError",
    "HapError",
    "ModelSpecError",
    "NoFeasiblePlanError",
    "OpGraph",
    "PlanError",
    "PlannerOptionError",
    "capture",
]
__version__ = "0.1.0"
