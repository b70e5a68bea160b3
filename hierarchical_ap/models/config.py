"""The shape of a decoder-only language model, shared by every family the zoo builds."""

from __future__ import annotations

from dataclasses import dataclass

from hierarchical_ap.errors import ModelSpecError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer language model.

    `family` is ``"gpt"`` or ``"llama"`` for the zoo's own models and ``"hf:<model_type>"`` for
    models built by transformers (their fields are read off the transformers config).
    """

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq: int
    tied_head: bool
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def validate(self, example: str) -> ModelConfig:
        """Check that the numbers describe a buildable model; return self.

        Raises ModelSpecError naming the offending field, with `example` as a valid spec.
        """
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq"):
            value = getattr(self, name)
            if value < 1:
                raise ModelSpecError(
                    f"{name} must be a positive integer, got {value}; for example {example!r}"
                )
        if self.hidden % self.heads:
            raise ModelSpecError(
                f"heads={self.heads} does not divide hidden={self.hidden}; pick a head count that "
                f"divides the hidden size, for example {example!r}"
            )
        if self.heads % self.kv_heads:
            raise ModelSpecError(
                f"kv_heads={self.kv_heads} does not divide heads={self.heads}; every key/value "
                f"head must serve the same number of query heads, for example {example!r}"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise ModelSpecError(
                f"rotary embeddings need an even head size, got hidden/heads={self.head_dim}; "
                f"for example {example!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelSpecError(
                f"dropout must lie in [0, 1), got {self.dropout}; for example {example!r}"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ModelSpecError(
                f"rope_theta and norm_eps must be positive, got {self.rope_theta} and "
                f"{self.norm_eps}; for example {example!r}"
            )
        return self
