"""Adapters for transformers causal language models, built from config classes only.

Two spec forms reach this module:

* `hf:<model_type>[:attr=value,...]`, e.g. `hf:gpt2:n_layer=2,n_embd=64,n_head=4` or
  `hf:llama:num_hidden_layers=2`: the config class of `model_type` with its defaults, every
  dropout probability set to 0 unless overridden, and the overrides applied;
* a local `config.json` (or a directory holding one), optionally followed by `:attr=value,...`:
  the file's values with the overrides applied. Nothing is ever fetched from the Hub.

Every model is built with `use_cache=False` and the "sdpa" attention implementation, so
`torch.export.export(model, (input_ids,), strict=False)` captures it on the meta device. (An
eager forward on meta tensors fails inside transformers' mask helpers; export fakifies the
inputs and does not hit that path.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hierarchical_ap.errors import ModelSpecError
from hierarchical_ap.models.config import ModelConfig
from hierarchical_ap.models.spec import parse_assignments, parse_flag, parse_literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig

HF_EXAMPLE = "hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=512"
CONFIG_FILE_FIX = (
    "give an HF config.json such as GPT2Config().save_pretrained(directory) writes, "
    "for example 'models/gpt2/config.json:n_layer=2'"
)
DROPOUT_SUFFIXES = ("dropout", "pdrop", "dropout_prob")


def require_transformers() -> None:
    """Raise ModelSpecError when transformers is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelSpecError(
            "HF model specs need the transformers package; install it with "
            "'pip install transformers' or use a zoo spec such as 'gpt-tiny'"
        ) from None


def coerce_value(key: str, text: str, default: Any, example: str) -> Any:
    """Convert an override string to the type of the config attribute's default value."""
    if isinstance(default, bool):
        return parse_flag(key, text, example)
    value = parse_literal(text)
    if isinstance(default, int) and not isinstance(value, int):
        raise ModelSpecError(f"{key}={text!r} is not an integer; for example {example!r}")
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelSpecError(f"{key}={text!r} is not a number; for example {example!r}")
        return float(value)
    return value


def make_hf_config(
    model_type: str, base: Mapping[str, Any], overrides: Mapping[str, str], zero_dropout: bool
) -> PretrainedConfig:
    """The transformers config of `model_type` from `base` values plus string `overrides`."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelSpecError(
            f"transformers knows no model type {model_type!r}; use one such as gpt2, llama, "
            f"mistral or qwen2, for example {HF_EXAMPLE!r}"
        )
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class(**base)
    known = defaults.to_dict()
    typed: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in known and key not in config_class.attribute_map:
            raise ModelSpecError(
                f"{config_class.__name__} has no attribute {key!r}; known attributes: "
                f"{', '.join(sorted(known))}; for example {HF_EXAMPLE!r}"
            )
        typed[key] = coerce_value(key, text, getattr(defaults, key), HF_EXAMPLE)
    values: dict[str, Any] = {**base, "use_cache": False}
    if zero_dropout:
        values.update(
            (key, 0.0)
            for key, value in known.items()
            if key.endswith(DROPOUT_SUFFIXES) and isinstance(value, float)
        )
    return config_class(**{**values, **typed})


def split_file_spec(spec: str) -> tuple[Path, str]:
    """Split `<path>[:attr=value,...]` into the config file path and the override text."""
    path, overrides = Path(spec), ""
    if not path.exists() and ":" in spec:
        head, _, overrides = spec.rpartition(":")
        path = Path(head)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelSpecError(f"no HF config file at {str(path)!r}; {CONFIG_FILE_FIX}")
    return path, overrides


def hf_config_from_spec(spec: str) -> PretrainedConfig:
    """The transformers config named by `hf:<model_type>[:attr=value,...]`."""
    require_transformers()
    _, _, rest = spec.partition(":")
    model_type, _, override_text = rest.partition(":")
    if not model_type:
        raise ModelSpecError(
            f"'hf:' must name a transformers model type, for example {HF_EXAMPLE!r}"
        )
    return make_hf_config(model_type, {}, parse_assignments(override_text, HF_EXAMPLE), True)


def hf_config_from_file(spec: str) -> PretrainedConfig:
    """The transformers config stored in a local config.json, with optional overrides."""
    require_transformers()
    from transformers import PretrainedConfig

    path, override_text = split_file_spec(spec)
    try:
        base, _ = PretrainedConfig.get_config_dict(str(path), local_files_only=True)
    except OSError as exc:
        raise ModelSpecError(f"cannot read {str(path)!r} ({exc}); {CONFIG_FILE_FIX}") from exc
    model_type = base.get("model_type")
    if not model_type:
        raise ModelSpecError(f"{str(path)!r} has no 'model_type'; {CONFIG_FILE_FIX}")
    overrides = parse_assignments(override_text, HF_EXAMPLE)
    return make_hf_config(model_type, base, overrides, False)


def build_hf_model(config: PretrainedConfig, device: torch.device) -> nn.Module:
    """A causal LM for `config` with SDPA attention, allocated on `device` (meta allocates nothing)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError as exc:
        raise ModelSpecError(
            f"cannot build a causal LM with SDPA attention from {type(config).__name__}: {exc}; "
            f"use a decoder-only model type, for example {HF_EXAMPLE!r}"
        ) from exc


def first_attr(config: PretrainedConfig, names: tuple[str, ...], default: Any) -> Any:
    """The first of `names` that `config` sets to something other than None, else `default`."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def describe_hf_config(config: PretrainedConfig, seq: int) -> ModelConfig:
    """The zoo's view of a transformers config (family `hf:<model_type>`)."""
    try:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        layers = int(config.num_hidden_layers)
        vocab = int(config.vocab_size)
    except AttributeError as exc:
        raise ModelSpecError(
            f"{type(config).__name__} does not describe a decoder-only transformer ({exc}); "
            f"for example {HF_EXAMPLE!r}"
        ) from exc
    rope = getattr(config, "rope_parameters", None) or {}
    return ModelConfig(
        family=f"hf:{config.model_type}",
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=int(first_attr(config, ("num_key_value_heads",), heads)),
        ffn_hidden=int(first_attr(config, ("intermediate_size", "n_inner"), 4 * hidden)),
        vocab=vocab,
        seq=seq,
        tied_head=bool(getattr(config, "tie_word_embeddings", False)),
        dropout=float(
            first_attr(config, ("resid_pdrop", "hidden_dropout", "attention_dropout"), 0.0)
        ),
        rope_theta=float(rope.get("rope_theta") or first_attr(config, ("rope_theta",), 10000.0)),
        norm_eps=float(first_attr(config, ("layer_norm_epsilon", "rms_norm_eps"), 1e-5)),
    )


def hf_sequence_length(config: PretrainedConfig, seq: int | None) -> int:
    """`seq` if given (checked against the model's position limit), else that limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if seq is None:
        if limit is None:
            raise ModelSpecError(
                f"{type(config).__name__} has no max_position_embeddings; pass seq= explicitly, "
                f"for example from_spec(spec, batch=8, seq=1024)"
            )
        return int(limit)
    if limit is not None and seq > limit:
        raise ModelSpecError(
            f"seq={seq} exceeds max_position_embeddings={limit} of {type(config).__name__}; "
            f"lower seq or raise the limit in the spec (n_positions for gpt2, "
            f"max_position_embeddings otherwise), for example 'hf:gpt2:n_positions=2048'"
        )
    return seq
