"""Weight initialisation shared by the zoo's transformer families (Megatron/GPT-2 style)."""

from __future__ import annotations

import math

import torch
from torch import nn

INIT_STD = 0.02
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


@torch.no_grad()
def init_transformer_weights(model: nn.Module, layers: int) -> None:
    """Initialise every parameter of `model` in place.

    Linear and embedding weights are drawn from N(0, 0.02); the projections that write into the
    residual stream (`o_proj`, `down_proj`) use 0.02 / sqrt(2 * layers) as in GPT-2 and
    Megatron-LM. Biases are zero, norm weights one and norm biases zero.
    """
    scaled_std = INIT_STD / math.sqrt(2 * layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = scaled_std if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS else INIT_STD
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
