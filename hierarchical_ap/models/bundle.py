"""What the model zoo hands to the compiler: a model, example inputs, targets and a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hierarchical_ap.models.config import ModelConfig

DATA_SEED = 0


def causal_lm_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, seq, vocab) against targets (batch, seq).

    `output` is the logits tensor, or a transformers model output carrying `.logits`.
    """
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@dataclass(frozen=True)
class ModelBundle:
    """A model ready to capture, with a batch of inputs and a loss.

    Attributes:
        name: the spec (or preset name) the bundle was built from.
        model: the module; on the meta device its parameters hold no storage.
        example_inputs: positional arguments of `model`, here `(input_ids,)` of shape
            (batch, seq), int64, on the requested device.
        targets: next-token labels (batch, seq), int64, on the same device.
        loss_fn: `loss_fn(model(*example_inputs), targets)` returns a scalar loss; a plain
            module-level function, so it pickles.
        config: the architecture, or None for a `module:` factory's arbitrary model.
    """

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    config: ModelConfig | None


def token_batch(
    batch: int, seq: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (batch, seq) and their next-token targets, reproducible (seed 0).

    On the meta device both tensors are shape-only.
    """
    shape = (batch, seq + 1)
    if device.type == "meta":
        tokens = torch.empty(shape, dtype=torch.int64, device=device)
    else:
        generator = torch.Generator().manual_seed(DATA_SEED)
        tokens = torch.randint(vocab, shape, generator=generator).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lm_bundle(
    name: str,
    model: nn.Module,
    config: ModelConfig | None,
    shape: tuple[int, int, int],
    device: torch.device,
) -> ModelBundle:
    """Bundle a token-in, logits-out model with a synthetic batch; shape is (batch, seq, vocab)."""
    batch, seq, vocab = shape
    input_ids, targets = token_batch(batch, seq, vocab, device)
    return ModelBundle(name, model, (input_ids,), targets, causal_lm_loss, config)
