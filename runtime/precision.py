"""Training precision: which dtype the program computes in, which it keeps the weights in.

The policy is PyTorch's own mixed-precision practice (FSDP's ``MixedPrecisionPolicy(
param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``, Megatron-LM's bf16 recipe):

* ``"fp32"`` (the default) trains the model as it is: nothing is cast.
* ``"bf16"``: the program is the model converted to bfloat16 (``model.to(torch.bfloat16)``:
  floating parameters and buffers) run on its floating inputs cast to bfloat16, so every
  activation, and every activation or activation gradient crossing a stage boundary, is
  bfloat16. The parameters themselves stay float32 *master weights*: they are what the
  optimizer steps (its state is float32 too), what ``state_dict`` returns and what checkpoints
  hold. Each optimizer step casts every parameter shard to bfloat16 once (not once per
  micro-batch); the cast's backward brings each micro-batch's gradient back to float32
  *before* it is accumulated over the micro-batches and reduced to the parameter's placement
  (the reduce-scatter of a ZeRO shard every micro-batch, the data-parallel all-reduce of the
  accumulated sum once per step) into the master's ``.grad``, and summed over the stages
  sharing the parameter. Tensor-parallel activation collectives inside a stage
  run in bfloat16 (gloo and NCCL both reduce bfloat16).
* The loss is whatever ``loss_fn`` computes on the bfloat16 outputs; the zoo's
  ``causal_lm_loss`` upcasts the logits to float32 first (as Megatron-LM and transformers do),
  so its cross-entropy, and its gradient down to the logits, is float32. Targets are passed
  as given. ``train_step`` reports the loss as a Python float.
* ``"fp16"`` is refused: float16's range needs loss scaling (a ``GradScaler`` that skips steps
  whose gradients overflow), which the runtime does not implement.

Both the planner's graph and every worker's graph are captured from the converted model, so
the plan's memory accounting and fingerprint are those of the bf16 program (as ``hap plan
--precision bf16`` captures it), while checkpoints carry the fingerprint of the float32 masters
(``master_fingerprint``), so a checkpoint of a bf16 run loads into an fp32 run and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from hierarchical_ap.errors import HapError
from hierarchical_ap.graph import OpGraph
from hierarchical_ap.plan import PRECISIONS, fingerprint

COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Precision name → the dtype the model is captured and run in (``None``: as it is)."""
assert set(COMPUTE_DTYPES) == set(PRECISIONS)


class UnsupportedPrecisionError(HapError, ValueError):
    """A training precision the runtime cannot train in."""


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one precision trains (see the module docstring)."""

    name: str
    compute_dtype: torch.dtype | None
    """The dtype of the program's floating values; ``None``: the model's own."""
    master_dtype: torch.dtype | None
    """The dtype floating parameters are stored, reduced and stepped in; ``None``: the
    captured dtype (no master copy)."""

    def compute_inputs(self, value: Any) -> Any:
        """``value`` with every floating tensor (at any depth) cast to the compute dtype."""
        return cast_floating(value, self.compute_dtype)


def cast_floating(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating tensor (at any depth) cast to ``dtype`` (``None``: as it
    is); integer tensors (token ids) and everything else unchanged."""
    if dtype is None:
        return value
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, value
    )


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype a model is captured in for ``precision`` (planning accepts every
    ``PRECISIONS`` name; ``None``: the model's own)."""
    if precision not in COMPUTE_DTYPES:
        raise UnsupportedPrecisionError(
            f"precision must be one of {list(PRECISIONS)}, got {precision!r}"
        )
    return COMPUTE_DTYPES[precision]


def policy_for(precision: str) -> PrecisionPolicy:
    """The runtime's policy for ``precision``; ``UnsupportedPrecisionError`` for fp16 (which
    needs loss scaling) and unknown names."""
    dtype = compute_dtype(precision)
    if precision == "fp16":
        raise UnsupportedPrecisionError(
            "precision 'fp16' needs loss scaling (float16 gradients underflow and overflow "
            "without a dynamic GradScaler that skips overflowing steps), which the runtime does "
            "not implement; train with precision='bf16' (same speed on hardware with bfloat16, "
            "float32's range) or 'fp32'"
        )
    return PrecisionPolicy(precision, dtype, None if dtype is None else torch.float32)


def master_fingerprint(graph: OpGraph, policy: PrecisionPolicy) -> str:
    """``hierarchical_ap.plan.fingerprint`` of the parameters as the workers store them (the
    float32 masters under bf16): a checkpoint's model identity, the same for every precision
    of one float32 model (and equal to the plan's ``model_fingerprint`` under fp32)."""
    master = policy.master_dtype
    return fingerprint(
        {
            fqn: (
                meta.shape,
                str(
                    master if master is not None and meta.dtype.is_floating_point else meta.dtype
                ).removeprefix("torch."),
            )
            for fqn, meta in graph.param_shapes.items()
        }
    )
