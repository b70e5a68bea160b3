"""Plan or simulate a model named by a spec: capture, training-memory recipe, context.

The glue the command line and ``compile_parallel`` share: a model spec is built on the meta
device in the training precision and captured once with a dynamic batch, so the planner can
try several micro-batch sizes without tracing again.
"""

from __future__ import annotations

import torch

from hierarchical_ap.cluster import Cluster
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import PlannerOptionError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.stamping import capture_repeated
from intra_op.cost_graph import TrainingMemory
from stage_partitioner.planner import PlannerOptions, PlanningContext

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_memory_for(precision: str) -> TrainingMemory:
    """Adam with fp32 master weights for 16-bit training and gradients accumulated in fp32
    (Megatron-LM's recipe, 18 bytes per parameter); plain fp32 Adam (16 bytes) otherwise."""
    if precision not in PRECISION_DTYPES:
        raise PlannerOptionError(
            f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}"
        )
    dtype = PRECISION_DTYPES[precision]
    return TrainingMemory.for_training(
        dtype, optimizer="adam", fp32_gradients=dtype != torch.float32
    )


def capture_spec(spec: str, *, seq: int | None, precision: str) -> OpGraph:
    """Capture the model named by ``spec`` in ``precision`` with a dynamic batch; a deep list of
    identical blocks is traced as three and stamped (``hierarchical_ap.stamping``)."""
    from hierarchical_ap.models import from_spec

    bundle = from_spec(spec, batch=2, seq=seq, device="meta", dtype=PRECISION_DTYPES[precision])
    return capture_repeated(
        bundle.model,
        bundle.example_inputs,
        loss_fn=bundle.loss_fn,
        targets=bundle.targets,
        dynamic_batch=True,
    )


def cluster_from_text(text: str) -> Cluster:
    """A cluster from a spec string (``4x8xA100-80GB``) or a cluster file path."""
    from pathlib import Path

    if Path(text).is_file():
        return Cluster.from_file(text)
    return Cluster.from_spec(text)


def planning_context(
    graph: OpGraph, cluster: Cluster, options: PlannerOptions, precision: str
) -> PlanningContext:
    return PlanningContext(
        graph, cluster, options, training_memory_for(precision), CostModel.for_cluster(cluster)
    )
