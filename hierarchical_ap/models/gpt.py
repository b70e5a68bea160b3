"""GPT in the Megatron-LM layout: pre-LayerNorm blocks, fused QKV, GELU MLP, learned positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hierarchical_ap.models.config import ModelConfig
from hierarchical_ap.models.weights import init_transformer_weights


class GPTAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection.

    The fused projection's output features are ordered as Megatron-LM orders them, head-major:
    ``[head, (q | k | v), head_dim]``, so that splitting them by heads (tensor parallelism)
    gives every device whole heads with their q, k and v.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.qkv_proj = nn.Linear(config.hidden, 3 * config.hidden)
        self.o_proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the causal prefix; x is (batch, seq, hidden)."""
        batch, seq, hidden = x.shape
        head_dim = hidden // self.heads
        qkv = self.qkv_proj(x).view(batch, seq, self.heads, 3 * head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(head_dim, dim=-1))
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, hidden))


class GPTMLP(nn.Module):
    """Two-layer feed-forward network with a GELU in between."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden, config.ffn_hidden)
        self.down_proj = nn.Linear(config.ffn_hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply up-projection, GELU and down-projection."""
        return self.down_proj(F.gelu(self.up_proj(x)))


class GPTBlock(nn.Module):
    """One pre-LayerNorm transformer layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.attn = GPTAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.mlp = GPTMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only GPT; `forward(input_ids)` returns logits of shape (batch, seq, vocab).

    Built under a meta device context it allocates nothing; after `to_empty(device=...)` call
    `reset_parameters()` to initialise (and re-tie) the weights.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.pos_embed = nn.Embedding(config.seq, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(GPTBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.tie_weights()
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Make the LM head share the token embedding when the config asks for a tied head."""
        if self.config.tied_head:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """Re-tie the head (moving off meta unties it) and initialise every weight."""
        self.tie_weights()
        init_transformer_weights(self, self.config.layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Map token ids (batch, seq) to next-token logits (batch, seq, vocab)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.dropout(self.embed(input_ids) + self.pos_embed(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
