"""Giving a model built on the meta device real storage and initial weights."""

from __future__ import annotations

import torch
from torch import nn


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate `model`'s parameters and buffers on `device` and initialise them; return it.

    Zoo models re-tie and initialise through `reset_parameters()`; transformers models through
    `init_weights()` (which also recomputes rotary buffers); any other module through the
    `reset_parameters()` of each submodule that has one.
    """
    model.to_empty(device=device)
    if callable(getattr(model, "reset_parameters", None)):
        model.reset_parameters()
    elif callable(getattr(model, "init_weights", None)):
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
        model.init_weights()
    else:
        with torch.no_grad():
            for module in model.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
    return model
