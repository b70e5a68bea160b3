"""`module:package.module:factory[:key=value,...]` specs: models built by the user's own code.

Contract. `from_spec` imports `package.module`, then calls
`factory(batch=B, seq=S, **overrides)` inside a `torch.device(device)` context, so modules and
tensors the factory creates land on the requested device (meta included). `S` is from_spec's
`seq`, or None to let the factory choose. Override values are parsed as JSON (numbers,
true/false, lists) and otherwise passed as strings. The factory returns either

* a `ModelBundle`, used as it is (inputs, targets and loss are the factory's business); or
* an `nn.Module` mapping input_ids (batch, seq) to logits (batch, seq, vocab), or to an output
  with a `.logits` attribute. The zoo then adds random token inputs, next-token targets and
  the causal LM loss. The vocabulary is read from the module's `vocab_size` (or
  `config.vocab_size`); the sequence length is `seq`, or else the module's `max_seq_len` (or
  `config.max_position_embeddings`). The bundle's `config` is None.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hierarchical_ap.errors import ModelSpecError
from hierarchical_ap.models.bundle import ModelBundle, lm_bundle
from hierarchical_ap.models.spec import parse_assignments, parse_literal

FACTORY_EXAMPLE = "module:my_project.models:build_model:width=256"


def load_factory(spec: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The factory callable named by a `module:` spec and its keyword overrides."""
    parts = spec.split(":", 3)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ModelSpecError(
            f"{spec!r} must name a module and a factory as 'module:package.module:factory', "
            f"for example {FACTORY_EXAMPLE!r}"
        )
    module_name, factory_name = parts[1], parts[2]
    overrides = parse_assignments(parts[3] if len(parts) == 4 else "", FACTORY_EXAMPLE)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(
            f"cannot import {module_name!r} ({exc}); make it importable (installed or on "
            f"PYTHONPATH), for example {FACTORY_EXAMPLE!r}"
        ) from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelSpecError(
            f"{module_name!r} has no callable {factory_name!r}; for example {FACTORY_EXAMPLE!r}"
        )
    return factory, {key: parse_literal(text) for key, text in overrides.items()}


def module_attr(model: nn.Module, names: tuple[str, str]) -> Any:
    """`model.<names[0]>`, else `model.config.<names[1]>`, else None."""
    value = getattr(model, names[0], None)
    if value is None:
        value = getattr(getattr(model, "config", None), names[1], None)
    return value


def factory_bundle(spec: str, batch: int, seq: int | None, device: torch.device) -> ModelBundle:
    """Call the factory of a `module:` spec and bundle what it returns."""
    factory, overrides = load_factory(spec)
    try:
        inspect.signature(factory).bind(batch=batch, seq=seq, **overrides)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(
            f"the factory of {spec!r} must accept batch=, seq= and the spec's keywords "
            f"({', '.join(overrides) or 'none'}): {exc}; for example "
            f"'def build_model(batch, seq, width=256)'"
        ) from None
    with torch.device(device):
        built = factory(batch=batch, seq=seq, **overrides)
    if isinstance(built, ModelBundle):
        return built
    if not isinstance(built, nn.Module):
        raise ModelSpecError(
            f"the factory of {spec!r} returned {type(built).__name__}; it must return an "
            f"nn.Module or a ModelBundle, for example {FACTORY_EXAMPLE!r}"
        )
    vocab = module_attr(built, ("vocab_size", "vocab_size"))
    seq = seq or module_attr(built, ("max_seq_len", "max_position_embeddings"))
    if vocab is None or seq is None:
        raise ModelSpecError(
            f"the module built by {spec!r} does not tell its vocabulary size (vocab_size) or "
            f"sequence length (max_seq_len); set them on the module, pass seq=, or return a "
            f"ModelBundle, for example 'self.vocab_size = 50257'"
        )
    return lm_bundle(spec, built, None, (batch, int(seq), int(vocab)), device)
