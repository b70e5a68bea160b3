"""`from_spec`: the one entry point that turns a model spec string into a ModelBundle.

Accepted specs, tried in this order:

* `hf:<model_type>[:attr=value,...]` — a transformers causal LM from its config class;
* `module:package.module:factory[:key=value,...]` — user code (contract in `factory.py`);
* a path to a local HF `config.json` or its directory (recognised by a `/` or a `.json`),
  optionally followed by `:attr=value,...`;
* `gpt:key=value,...`, `llama:key=value,...`, or a preset name with optional overrides
  (`gpt3-175b:layers=2`); see `list_presets()`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hierarchical_ap.errors import ModelSpecError
from hierarchical_ap.models.bundle import ModelBundle, lm_bundle
from hierarchical_ap.models.factory import factory_bundle
from hierarchical_ap.models.gpt import GPT
from hierarchical_ap.models.hf import (
    build_hf_model,
    describe_hf_config,
    hf_config_from_file,
    hf_config_from_spec,
    hf_sequence_length,
)
from hierarchical_ap.models.llama import Llama
from hierarchical_ap.models.spec import parse_zoo_spec

FAMILIES: dict[str, type[nn.Module]] = {"gpt": GPT, "llama": Llama}


def check_positive(name: str, value: int | None) -> None:
    """Raise ModelSpecError unless `value` is None or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ModelSpecError(
            f"{name} must be a positive integer, got {value!r}; for example "
            f"from_spec('gpt-tiny', batch=8, seq=64)"
        )


def is_config_path(spec: str) -> bool:
    """Whether `spec` names a config file or directory rather than a family or preset."""
    return "/" in spec or os.sep in spec or spec.endswith(".json") or ".json:" in spec


def build_model_bundle(spec: str, batch: int, seq: int | None, device: torch.device) -> ModelBundle:
    """The bundle of `spec` in the model's default dtype (float32)."""
    if spec.startswith("module:"):
        return factory_bundle(spec, batch, seq, device)
    if spec.startswith("hf:") or is_config_path(spec):
        hf_config = (
            hf_config_from_spec(spec) if spec.startswith("hf:") else hf_config_from_file(spec)
        )
        length = hf_sequence_length(hf_config, seq)
        config = describe_hf_config(hf_config, length)
        model = build_hf_model(hf_config, device)
    else:
        config = parse_zoo_spec(spec, seq)
        with torch.device(device):
            model = FAMILIES[config.family](config)
    return lm_bundle(spec, model, config, (batch, config.seq, config.vocab), device)


def from_spec(
    spec: str,
    batch: int = 1,
    seq: int | None = None,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> ModelBundle:
    """Build the model named by `spec` with a (batch, seq) batch of token ids on `device`.

    `seq` replaces the spec's sequence length; `dtype` casts the parameters (float32 when
    None). On the meta device nothing is allocated; `materialize` the model later. Raises
    ModelSpecError for a spec that names no buildable model.
    """
    check_positive("batch", batch)
    check_positive("seq", seq)
    bundle = build_model_bundle(spec.strip(), batch, seq, torch.device(device))
    if dtype is not None:
        bundle.model.to(dtype=dtype)
    return bundle
