"""Named model configurations, each defined as a family spec string (`gpt:layers=...`).

Sources: Narayanan et al., SC21, table 1 (`data/megatron_sc21_table1.csv`, s=2048, V=51200);
Zheng et al., OSDI'22, the Alpa GPT suite (`data/alpa_gpt_suite.csv`, s=1024, V=51200);
Brown et al. 2020 (GPT-3 175B); Meta's LLaMA 3 / 3.1 model cards (8B, 70B, 405B).

Keeping presets as spec strings means an override such as `gpt3-175b:hidden=4096` re-derives
the defaults (here the 4h MLP) exactly as `gpt:...` would.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType

GPT_VOCAB = 51200
MEGATRON_SEQ = 2048
ALPA_SEQ = 1024

ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "gpt-18b": "gpt-18.4b",
        "gpt-76b": "gpt-76.1b",
        "gpt-145b": "gpt-145.6b",
        "gpt-310b": "gpt-310.1b",
        "gpt-530b": "gpt-529.6b",
    }
)

FIXED_PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "gpt3-175b": "gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048",
        "llama3-8b": (
            "llama:layers=32,hidden=4096,heads=32,kv_heads=8,ffn=14336,vocab=128256,seq=8192,"
            "rope_theta=500000"
        ),
        "llama3-70b": (
            "llama:layers=80,hidden=8192,heads=64,kv_heads=8,ffn=28672,vocab=128256,seq=8192,"
            "rope_theta=500000"
        ),
        "llama3-405b": (
            "llama:layers=126,hidden=16384,heads=128,kv_heads=8,ffn=53248,vocab=128256,seq=8192,"
            "rope_theta=500000"
        ),
        "gpt-tiny": "gpt:layers=2,hidden=64,heads=4,vocab=512,seq=64",
        "llama-tiny": "llama:layers=2,hidden=64,heads=4,kv_heads=2,ffn=128,vocab=512,seq=64",
    }
)


def gpt_spec(row: Mapping[str, str], seq: int) -> str:
    """Family spec of a GPT suite row (columns layers, hidden, heads) at vocabulary 51200."""
    return (
        f"gpt:layers={int(row['layers'])},hidden={int(row['hidden'])},heads={int(row['heads'])},"
        f"vocab={GPT_VOCAB},seq={seq}"
    )


def read_data_csv(filename: str) -> list[dict[str, str]]:
    """Rows of a packaged data file, skipping its `#` comment lines (which name the source)."""
    text = resources.files("hierarchical_ap").joinpath("data", filename).read_text("utf-8")
    lines = [line for line in io.StringIO(text) if line.strip() and not line.startswith("#")]
    return list(csv.DictReader(lines))


def megatron_name(params_b: float) -> str:
    """Preset name of a Megatron table-1 row: `gpt-39.1b`, or `gpt-1t` at a trillion and above."""
    if params_b >= 1000:
        return f"gpt-{round(params_b / 1000)}t"
    return f"gpt-{params_b:g}b"


@functools.cache
def presets() -> Mapping[str, str]:
    """Every preset's family spec by canonical name (aliases are in `ALIASES`)."""
    megatron = {
        megatron_name(float(row["params_b"])): gpt_spec(row, MEGATRON_SEQ)
        for row in read_data_csv("megatron_sc21_table1.csv")
    }
    alpa = {row["name"]: gpt_spec(row, ALPA_SEQ) for row in read_data_csv("alpa_gpt_suite.csv")}
    return MappingProxyType({**megatron, **alpa, **FIXED_PRESETS})


def list_presets() -> list[str]:
    """Names accepted as a model spec: canonical preset names, then aliases."""
    return [*presets(), *ALIASES]


def preset_spec(name: str) -> str | None:
    """The family spec of preset (or alias) `name`, or None when there is no such preset."""
    return presets().get(ALIASES.get(name, name))
