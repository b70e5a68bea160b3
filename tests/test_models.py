"""The model zoo: spec parsing, presets, parameter counts, numerics, capture on meta, errors."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from hierarchical_ap.errors import ModelSpecError
from hierarchical_ap.models import (
    GPT,
    Llama,
    ModelBundle,
    causal_lm_loss,
    from_spec,
    list_presets,
    materialize,
)
from hierarchical_ap.models.llama import apply_rotary, rotary_tables
from hierarchical_ap.models.presets import megatron_name, read_data_csv
from hierarchical_ap.models.spec import parse_zoo_spec

HF_GPT2_TINY = "hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=512,n_positions=64"
HF_LLAMA_TINY = (
    "hf:llama:num_hidden_layers=2,hidden_size=64,num_attention_heads=4,"
    "num_key_value_heads=2,intermediate_size=128,vocab_size=512,max_position_embeddings=64"
)
TINY_SPECS = ("gpt-tiny", "llama-tiny", HF_GPT2_TINY, HF_LLAMA_TINY)
TINY_IDS = ("gpt-tiny", "llama-tiny", "hf-gpt2", "hf-llama")


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameter elements (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def output_logits(output: object) -> torch.Tensor:
    """Logits of a zoo model (a tensor) or of a transformers model (an output object)."""
    return output if isinstance(output, torch.Tensor) else output.logits


# ---------------------------------------------------------------- parsing


def test_family_spec_fields_and_defaults() -> None:
    gpt = parse_zoo_spec("gpt:layers=2,hidden=64,heads=4,vocab=512,seq=32")
    assert (gpt.family, gpt.layers, gpt.hidden, gpt.heads, gpt.vocab, gpt.seq) == (
        "gpt",
        2,
        64,
        4,
        512,
        32,
    )
    assert (gpt.ffn_hidden, gpt.kv_heads, gpt.tied_head, gpt.dropout) == (256, 4, True, 0.0)
    llama = parse_zoo_spec("llama:layers=2,hidden=4096,heads=32,vocab=32000,seq=128")
    assert (llama.ffn_hidden, llama.kv_heads, llama.tied_head) == (11008, 32, False)


def test_optional_keys() -> None:
    gpt = parse_zoo_spec(
        "gpt:layers=2,hidden=64,heads=4,vocab=512,seq=32,ffn=100,tied=0,dropout=0.1"
    )
    assert (gpt.ffn_hidden, gpt.tied_head, gpt.dropout) == (100, False, 0.1)
    llama = parse_zoo_spec(
        "llama:layers=1,hidden=64,heads=4,kv_heads=1,ffn=96,vocab=10,seq=8,rope_theta=500000"
    )
    assert (llama.kv_heads, llama.ffn_hidden, llama.rope_theta) == (1, 96, 500000.0)


def test_preset_overrides_and_seq_argument() -> None:
    config = parse_zoo_spec("gpt3-175b:layers=2")
    assert (config.layers, config.hidden, config.heads, config.seq) == (2, 12288, 96, 2048)
    narrower = parse_zoo_spec("gpt3-175b:hidden=1024,heads=8")
    assert narrower.ffn_hidden == 4096
    assert parse_zoo_spec("llama3-8b:layers=1", seq=512).seq == 512
    bundle = from_spec("gpt-tiny", batch=3, seq=16)
    assert bundle.config.seq == 16
    assert bundle.example_inputs[0].shape == (3, 16)


def test_aliases_resolve_to_megatron_rows() -> None:
    assert parse_zoo_spec("gpt-530b") == parse_zoo_spec("gpt-529.6b")
    assert parse_zoo_spec("gpt-18b") == parse_zoo_spec("gpt-18.4b")
    assert {"gpt-1t", "gpt-76b", "gpt-145b", "gpt-310b", "gpt3-175b"} <= set(list_presets())


# ---------------------------------------------------------------- presets


def test_megatron_presets_match_table() -> None:
    rows = read_data_csv("megatron_sc21_table1.csv")
    assert len(rows) == 10
    for row in rows:
        config = parse_zoo_spec(megatron_name(float(row["params_b"])))
        assert (config.layers, config.hidden, config.heads) == (
            int(row["layers"]),
            int(row["hidden"]),
            int(row["heads"]),
        )
        assert (config.seq, config.vocab) == (2048, 51200)


def test_alpa_presets_match_suite() -> None:
    rows = read_data_csv("alpa_gpt_suite.csv")
    assert [row["name"] for row in rows] == [
        "gpt-350m",
        "gpt-1.3b",
        "gpt-2.6b",
        "gpt-6.7b",
        "gpt-15b",
        "gpt-39b",
    ]
    for row in rows:
        config = parse_zoo_spec(row["name"])
        assert (config.layers, config.hidden, config.heads) == (
            int(row["layers"]),
            int(row["hidden"]),
            int(row["heads"]),
        )
        assert (config.seq, config.vocab) == (1024, 51200)


def test_llama3_presets() -> None:
    expected = {
        "llama3-8b": (32, 4096, 32, 8, 14336),
        "llama3-70b": (80, 8192, 64, 8, 28672),
        "llama3-405b": (126, 16384, 128, 8, 53248),
    }
    for name, shape in expected.items():
        config = parse_zoo_spec(name)
        assert (
            config.layers,
            config.hidden,
            config.heads,
            config.kv_heads,
            config.ffn_hidden,
        ) == shape
        assert (config.vocab, config.seq, config.rope_theta) == (128256, 8192, 500000.0)
        assert not config.tied_head


# ---------------------------------------------------------------- parameter counts on meta


@pytest.mark.parametrize(
    ("spec", "billions"),
    [("gpt3-175b", 174.6), ("llama3-8b", 8.03), ("llama3-70b", 70.6), ("gpt-529.6b", 529.6)],
)
def test_parameter_counts_on_meta(spec: str, billions: float) -> None:
    model = from_spec(spec).model
    assert all(p.is_meta for p in model.parameters())
    assert count_params(model) / 1e9 == pytest.approx(billions, rel=0.005)


def test_tied_head_shares_the_embedding() -> None:
    tied = from_spec("gpt-tiny", device="cpu").model
    untied = from_spec("gpt-tiny:tied=0", device="cpu").model
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert count_params(untied) - count_params(tied) == 512 * 64


def test_materialize_from_meta_keeps_tie_and_initialises() -> None:
    model = materialize(from_spec("gpt-tiny").model)
    assert model.head.weight is model.embed.weight
    weights = model.blocks[0].attn.qkv_proj.weight
    assert not weights.is_meta and weights.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(model.blocks[0].attn_norm.weight == 1)


def test_materialize_hf_recomputes_rotary_buffers() -> None:
    model = materialize(from_spec(HF_LLAMA_TINY).model)
    inv_freq = model.model.rotary_emb.inv_freq
    expected = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    torch.testing.assert_close(inv_freq, expected)


# ---------------------------------------------------------------- real training step on CPU


@pytest.mark.parametrize("spec", TINY_SPECS, ids=TINY_IDS)
def test_tiny_forward_backward_on_cpu(spec: str) -> None:
    bundle = from_spec(spec, batch=2, seq=32, device="cpu")
    (input_ids,) = bundle.example_inputs
    assert input_ids.dtype == torch.int64 and input_ids.shape == (2, 32)
    assert torch.equal(input_ids[:, 1:], bundle.targets[:, :-1])
    loss = bundle.loss_fn(bundle.model(*bundle.example_inputs), bundle.targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(512), rel=0.1)
    loss.backward()
    grads = [p.grad for p in bundle.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dtype_argument_casts_parameters() -> None:
    model = from_spec("llama-tiny", dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------- capture on meta


@pytest.mark.parametrize("spec", TINY_SPECS, ids=TINY_IDS)
def test_export_on_meta(spec: str) -> None:
    bundle = from_spec(spec, batch=2, seq=16)
    assert bundle.example_inputs[0].is_meta and bundle.targets.is_meta
    program = torch.export.export(bundle.model, bundle.example_inputs, strict=False)
    output = next(node for node in program.graph.nodes if node.op == "output")
    assert output.args[0][0].meta["val"].shape == (2, 16, 512)
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default in targets


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_zoo_export_keeps_block_paths(spec: str) -> None:
    bundle = from_spec(spec, batch=1, seq=8)
    program = torch.export.export(bundle.model, bundle.example_inputs, strict=False)
    paths = {
        path
        for node in program.graph.nodes
        for path, _ in node.meta.get("nn_module_stack", {}).values()
    }
    assert {"blocks.0", "blocks.1", "embed", "norm", "head"} <= paths


# ---------------------------------------------------------------- numerics vs references


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit causal softmax attention, KV heads repeated to the query head count."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def reference_rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate each pair (i, i + d/2) of x (batch, heads, seq, d) by position * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for pos in range(x.shape[2]):
        for i in range(half):
            angle = pos * theta ** (-2 * i / x.shape[-1])
            a, b = x[:, :, pos, i], x[:, :, pos, i + half]
            out[:, :, pos, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, :, pos, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_rotary_matches_pairwise_rotation() -> None:
    x = torch.randn(1, 2, 6, 8)
    cos, sin = rotary_tables(6, 8, 10000.0, x.device)
    torch.testing.assert_close(apply_rotary(x, cos, sin), reference_rotary(x, 10000.0))


def test_llama_attention_matches_reference() -> None:
    torch.manual_seed(0)
    model = from_spec("llama-tiny", device="cpu").model
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = rotary_tables(10, 16, 10000.0, x.device)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 10, -1, 16).transpose(1, 2)

    q = reference_rotary(heads(attn.q_proj(x)), 10000.0)
    k = reference_rotary(heads(attn.k_proj(x)), 10000.0)
    expected = attn.o_proj(
        reference_attention(q, k, heads(attn.v_proj(x))).transpose(1, 2).reshape(2, 10, 64)
    )
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa = from_spec("llama-tiny", device="cpu").model
    mha = from_spec("llama-tiny:kv_heads=4", device="cpu").model
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    ids = torch.randint(512, (2, 12))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-4)


def hf_llama_key(key: str) -> str:
    """The transformers LlamaForCausalLM name of a zoo Llama state-dict key."""
    key = re.sub(r"^blocks\.", "model.layers.", key)
    key = key.replace(".attn_norm.", ".input_layernorm.").replace(".attn.", ".self_attn.")
    key = key.replace(".mlp_norm.", ".post_attention_layernorm.")
    top = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}
    first, _, rest = key.partition(".")
    return f"{top[first]}.{rest}" if first in top else key


def test_llama_matches_transformers_llama() -> None:
    ours = from_spec("llama-tiny", device="cpu").model
    theirs = from_spec(HF_LLAMA_TINY + ",rms_norm_eps=1e-5", device="cpu").model
    theirs.load_state_dict({hf_llama_key(k): v for k, v in ours.state_dict().items()})
    ids = torch.randint(512, (2, 20))
    torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def head_major_to_qkv_major(t: torch.Tensor, heads: int = 4) -> torch.Tensor:
    """Reorder fused QKV rows from Megatron's [head, qkv, d] to GPT-2's [qkv, head, d]."""
    rows = t.shape[0]
    return t.reshape(heads, 3, rows // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def test_gpt_matches_transformers_gpt2() -> None:
    ours = from_spec("gpt-tiny", device="cpu").model
    theirs = from_spec(HF_GPT2_TINY + ",activation_function=gelu", device="cpu").model
    hf = theirs.transformer
    with torch.no_grad():
        hf.wte.weight.copy_(ours.embed.weight)
        hf.wpe.weight.copy_(ours.pos_embed.weight)
        hf.ln_f.load_state_dict(ours.norm.state_dict())
        for block, layer in zip(ours.blocks, hf.h, strict=True):
            layer.ln_1.load_state_dict(block.attn_norm.state_dict())
            layer.ln_2.load_state_dict(block.mlp_norm.state_dict())
            pairs = (
                (layer.attn.c_attn, block.attn.qkv_proj),
                (layer.attn.c_proj, block.attn.o_proj),
                (layer.mlp.c_fc, block.mlp.up_proj),
                (layer.mlp.c_proj, block.mlp.down_proj),
            )
            for conv, linear in pairs:
                weight, bias = linear.weight, linear.bias
                if linear is block.attn.qkv_proj:
                    weight, bias = head_major_to_qkv_major(weight), head_major_to_qkv_major(bias)
                conv.weight.copy_(weight.T)
                conv.bias.copy_(bias)
    ids = torch.randint(512, (2, 20))
    torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_loss_is_cross_entropy_over_vocabulary() -> None:
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(7, (2, 3))
    expected = F.cross_entropy(logits.reshape(6, 7), targets.reshape(6))
    torch.testing.assert_close(causal_lm_loss(logits, targets), expected)


# ---------------------------------------------------------------- other spec sources


def test_hf_spec_config() -> None:
    bundle = from_spec(HF_GPT2_TINY)
    hf_config = bundle.model.config
    assert (hf_config.n_layer, hf_config.n_embd, hf_config.use_cache) == (2, 64, False)
    assert hf_config.attn_pdrop == hf_config.resid_pdrop == hf_config.embd_pdrop == 0.0
    assert hf_config._attn_implementation == "sdpa"
    assert bundle.config.family == "hf:gpt2" and bundle.config.seq == 64
    llama = from_spec(HF_LLAMA_TINY).config
    assert (llama.kv_heads, llama.ffn_hidden, llama.tied_head) == (2, 128, False)


def test_bad_config_files(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "typeless.json").write_text('{"n_layer": 2}')
    with pytest.raises(ModelSpecError, match="cannot read"):
        from_spec(str(tmp_path / "broken.json"))
    with pytest.raises(ModelSpecError, match="no 'model_type'"):
        from_spec(str(tmp_path / "typeless.json"))


def test_hf_config_file(tmp_path: Path) -> None:
    transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100).save_pretrained(
        tmp_path
    )
    by_dir = from_spec(f"{tmp_path}/", batch=1, seq=8)
    assert (by_dir.config.layers, by_dir.config.vocab) == (3, 100)
    by_file = from_spec(f"{tmp_path / 'config.json'}:n_layer=1", batch=1, seq=8)
    assert by_file.config.layers == 1 and by_file.model.config.use_cache is False


FACTORY_MODULE = """
import torch
from hierarchical_ap.models import ModelBundle, causal_lm_loss

class Bigram(torch.nn.Module):
    vocab_size = 50
    max_seq_len = 12

    def __init__(self, width):
        super().__init__()
        self.table = torch.nn.Embedding(50, 50 if width is None else width)

    def forward(self, input_ids):
        return self.table(input_ids)

def module(batch, seq, width=None):
    return Bigram(width)

def bundle(batch, seq):
    model = Bigram(None)
    ids = torch.zeros(batch, seq or 4, dtype=torch.int64)
    return ModelBundle("bigram", model, (ids,), ids, causal_lm_loss, None)
"""


def test_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zoo_factory_example.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    wrapped = from_spec("module:zoo_factory_example:module:width=50", batch=2)
    assert wrapped.config is None and wrapped.model.table.weight.is_meta
    assert wrapped.example_inputs[0].shape == (2, 12)
    given = from_spec("module:zoo_factory_example:bundle", batch=3, device="cpu")
    assert isinstance(given, ModelBundle) and given.name == "bigram"
    assert given.example_inputs[0].shape == (3, 4)


# ---------------------------------------------------------------- bad specs


BAD_SPECS = [
    ("gtp:layers=2,hidden=64,heads=4,vocab=512,seq=64", "unknown model family or preset"),
    ("gpt-7b", "gpt3-175b"),
    ("gpt:layers=2,hidden=64,heads=4,vocab=512,seq=64,colour=3", "unknown key 'colour'"),
    ("gpt:layers=2,hidden=64,heads=4,vocab=512,seq=64,kv_heads=2", "unknown key 'kv_heads'"),
    ("gpt:layers=two,hidden=64,heads=4,vocab=512,seq=64", "not an integer"),
    ("gpt:layers=2.5,hidden=64,heads=4,vocab=512,seq=64", "not an integer"),
    ("gpt:layers=2,hidden=64,heads=5,vocab=512,seq=64", "does not divide hidden"),
    ("gpt:layers=2,hidden=64,vocab=512,seq=64", "missing required key(s) heads"),
    ("gpt:layers=2,hidden=64,heads=4,vocab=512,seq=64,tied=2", "must be 0 or 1"),
    ("gpt:layers=2,hidden=64,heads=4,vocab=512,seq=64,dropout=1.5", "dropout"),
    ("gpt:layers=0,hidden=64,heads=4,vocab=512,seq=64", "positive integer"),
    ("gpt:layers,hidden=64", "not a key=value pair"),
    ("gpt:layers=2,layers=3,hidden=64,heads=4,vocab=512,seq=64", "given twice"),
    ("llama-tiny:kv_heads=3", "does not divide heads"),
    ("llama-tiny:dropout=0.1", "unknown key 'dropout'"),
    ("gpt3-175b:layers=x", "not an integer"),
    ("hf:nosuchmodel", "no model type 'nosuchmodel'"),
    ("hf:gpt2:n_layers=2", "no attribute 'n_layers'"),
    ("hf:gpt2:n_layer=two", "not an integer"),
    ("hf:gpt2:n_layer=2,n_embd=64,n_head=4,n_positions=8", "exceeds max_position_embeddings"),
    ("hf:", "must name a transformers model type"),
    ("no/such/dir/config.json", "no HF config file"),
    ("module:no_such_package_xyz:build", "cannot import"),
    ("module:math:no_such_factory", "no callable 'no_such_factory'"),
    ("module:math", "must name a module and a factory"),
    ("module:math:sqrt", "must accept"),
]


@pytest.mark.parametrize(("spec", "cause"), BAD_SPECS)
def test_bad_specs_raise_model_spec_error(spec: str, cause: str) -> None:
    with pytest.raises(ModelSpecError) as info:
        from_spec(spec, batch=1, seq=16)
    message = str(info.value)
    assert cause in message
    assert re.search(r"for example|e\.g\.", message), message


@pytest.mark.parametrize(("batch", "seq"), [(0, None), (2, -1), (1.5, None)])
def test_bad_batch_or_seq(batch: object, seq: object) -> None:
    with pytest.raises(ModelSpecError, match="positive integer"):
        from_spec("gpt-tiny", batch=batch, seq=seq)


def test_zoo_classes_are_exported() -> None:
    assert isinstance(from_spec("gpt-tiny").model, GPT)
    assert isinstance(from_spec("llama-tiny").model, Llama)
