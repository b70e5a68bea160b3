"""Parsing of the zoo's model specs: `gpt:key=value,...`, `llama:key=value,...` and presets.

A preset may be followed by overrides (`gpt3-175b:layers=2`); the overrides are merged into the
preset's own family spec before defaults are derived, so `ffn` follows an overridden `hidden`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from hierarchical_ap.errors import ModelSpecError
from hierarchical_ap.models.config import ModelConfig
from hierarchical_ap.models.presets import list_presets, preset_spec

EXAMPLES: Mapping[str, str] = {
    "gpt": "gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048",
    "llama": "llama:layers=32,hidden=4096,heads=32,kv_heads=8,ffn=14336,vocab=128256,seq=8192",
}
OTHER_FORMS = (
    "'hf:<model_type>[:attr=value,...]' (e.g. 'hf:gpt2:n_layer=2'), a path to an HF config.json, "
    "'module:package.module:factory'"
)
REQUIRED = ("layers", "hidden", "heads", "vocab", "seq")
COMMON_KEYS = (*REQUIRED, "ffn", "tied", "norm_eps")
FAMILY_KEYS: Mapping[str, tuple[str, ...]] = {
    "gpt": (*COMMON_KEYS, "dropout"),
    "llama": (*COMMON_KEYS, "kv_heads", "rope_theta"),
}
FIELD_OF_KEY: Mapping[str, str] = {"ffn": "ffn_hidden", "tied": "tied_head"}


def parse_int(key: str, text: str, example: str) -> int:
    """An integer spec value."""
    try:
        return int(text)
    except ValueError:
        raise ModelSpecError(f"{key}={text!r} is not an integer; for example {example!r}") from None


def parse_float(key: str, text: str, example: str) -> float:
    """A real-number spec value."""
    try:
        return float(text)
    except ValueError:
        raise ModelSpecError(f"{key}={text!r} is not a number; for example {example!r}") from None


def parse_flag(key: str, text: str, example: str) -> bool:
    """A 0/1 (or false/true) spec value."""
    flags = {"0": False, "1": True, "false": False, "true": True}
    if text.lower() not in flags:
        raise ModelSpecError(f"{key}={text!r} must be 0 or 1; for example {example!r}")
    return flags[text.lower()]


PARSERS: Mapping[str, Callable[[str, str, str], object]] = {
    "tied": parse_flag,
    "dropout": parse_float,
    "rope_theta": parse_float,
    "norm_eps": parse_float,
}


def parse_literal(text: str) -> Any:
    """A free-form value: JSON (numbers, true/false, lists) when it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(text: str, example: str) -> dict[str, str]:
    """Split `key=value,key=value` into a dict of raw strings; an empty text gives {}."""
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ModelSpecError(
                f"{item!r} is not a key=value pair; write settings as comma-separated "
                f"key=value pairs, for example {example!r}"
            )
        if key in values:
            raise ModelSpecError(f"{key!r} is given twice; for example {example!r}")
        values[key] = value
    return values


def llama_ffn(hidden: int) -> int:
    """LLaMA's default SwiGLU width: two thirds of 4h, rounded up to a multiple of 256."""
    return 256 * math.ceil(int(8 * hidden / 3) / 256)


def build_config(family: str, raw: Mapping[str, str], example: str) -> ModelConfig:
    """Turn raw key=value strings of `family` into a validated ModelConfig."""
    allowed = FAMILY_KEYS[family]
    for key in raw:
        if key not in allowed:
            raise ModelSpecError(
                f"unknown key {key!r} for a {family} model; known keys: {', '.join(allowed)}; "
                f"for example {example!r}"
            )
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise ModelSpecError(
            f"missing required key(s) {', '.join(missing)} for a {family} model; "
            f"for example {example!r}"
        )
    values = {
        FIELD_OF_KEY.get(key, key): PARSERS.get(key, parse_int)(key, text, example)
        for key, text in raw.items()
    }
    hidden, heads = values["hidden"], values["heads"]
    default_ffn = 4 * hidden if family == "gpt" else llama_ffn(hidden)
    values.setdefault("ffn_hidden", default_ffn)
    values.setdefault("kv_heads", heads)
    values.setdefault("tied_head", family == "gpt")
    return ModelConfig(family=family, **values).validate(example)


def unknown_model(name: str) -> ModelSpecError:
    """The error for a spec whose first field is neither a family nor a preset."""
    return ModelSpecError(
        f"unknown model family or preset {name!r}; use 'gpt:...' (e.g. {EXAMPLES['gpt']!r}), "
        f"'llama:...' (e.g. {EXAMPLES['llama']!r}), {OTHER_FORMS}, or a preset, optionally "
        f"with overrides such as 'gpt3-175b:layers=2'. Presets: {', '.join(list_presets())}"
    )


def parse_zoo_spec(spec: str, seq: int | None = None) -> ModelConfig:
    """The ModelConfig of a family spec or preset; `seq`, when given, replaces the spec's length."""
    name, _, rest = spec.strip().partition(":")
    if name in FAMILY_KEYS:
        family, example, base = name, EXAMPLES[name], {}
    else:
        definition = preset_spec(name)
        if definition is None:
            raise unknown_model(name)
        family, _, base_text = definition.partition(":")
        example = f"{name}:layers=2"
        base = parse_assignments(base_text, example)
    raw = {**base, **parse_assignments(rest, example)}
    if seq is not None:
        raw["seq"] = str(seq)
    return build_config(family, raw, example)
