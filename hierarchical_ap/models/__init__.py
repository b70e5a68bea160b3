"""The model zoo: GPT and LLaMA families, published presets, and transformers adapters.

`from_spec(spec, batch=..., seq=None, device="meta")` is the entry point; see `build.py` for the
spec forms and `list_presets()` for the preset names.
"""

from hierarchical_ap.models.build import from_spec
from hierarchical_ap.models.bundle import ModelBundle, causal_lm_loss
from hierarchical_ap.models.config import ModelConfig
from hierarchical_ap.models.gpt import GPT
from hierarchical_ap.models.llama import Llama
from hierarchical_ap.models.materialize import init_module_weights, materialize
from hierarchical_ap.models.presets import list_presets

__all__ = [
    "GPT",
    "Llama",
    "ModelBundle",
    "ModelConfig",
    "causal_lm_loss",
    "from_spec",
    "init_module_weights",
    "list_presets",
    "materialize",
]
