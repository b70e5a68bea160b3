"""Stamped captures equal full traces node for node, and models that break the rules are traced."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from hierarchical_ap import capture
from hierarchical_ap.models import from_spec
from hierarchical_ap.stamping import (
    MIN_STAMPED_BLOCKS,
    capture_repeated,
    graph_difference,
    repeated_block_list,
)

DEEP_SPECS = [
    "gpt:layers=9,hidden=64,heads=4,vocab=128,seq=16",
    "llama:layers=9,hidden=64,heads=4,kv_heads=2,ffn=96,vocab=128,seq=16",
    "hf:gpt2:n_layer=9,n_embd=32,n_head=2,vocab_size=64,n_positions=16",
    "hf:llama:num_hidden_layers=9,hidden_size=32,intermediate_size=64,num_attention_heads=2,"
    "num_key_value_heads=1,vocab_size=64",
]


def _constants(node: fx.Node):
    """The node's target and arguments, with the values it reads blanked out."""
    blank = pytree.tree_map(lambda a: "value" if isinstance(a, fx.Node) else a, node.args)
    return node.target, blank


def _both(model: nn.Module, inputs, **kwargs):
    return capture_repeated(model, inputs, **kwargs), capture(model, inputs, **kwargs)


@pytest.mark.parametrize("spec", DEEP_SPECS)
def test_stamped_graph_equals_full_trace_at_every_batch(spec):
    bundle = from_spec(spec, batch=2, seq=16, device="meta", dtype=torch.bfloat16)
    kwargs = dict(loss_fn=bundle.loss_fn, targets=bundle.targets, dynamic_batch=True)
    stamped, traced = _both(bundle.model, bundle.example_inputs, **kwargs)
    assert stamped.stamped and not traced.stamped
    assert len(stamped.nodes) == len(traced.nodes)
    assert graph_difference(stamped, traced) == ""
    assert graph_difference(stamped.at_batch(6), traced.at_batch(6)) == ""
    # rules read constant op arguments (dims, reductions) through fx_node: a copy's are the same
    for name in traced.nodes:
        assert _constants(stamped.fx_node(name)) == _constants(traced.fx_node(name))
    # the model is left as it was
    assert len(bundle.model.get_submodule(repeated_block_list(bundle.model)[0])) == 9


def test_stamped_graph_has_no_executable_program():
    bundle = from_spec(DEEP_SPECS[0], batch=2, device="meta")
    graph = capture_repeated(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )
    with pytest.raises(ValueError, match="no executable program"):
        _ = graph.graph_module


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class _AlternatingNet(nn.Module):
    """Identical block modules, but every odd block's output also goes through tanh: the
    blocks' graphs are not all alike, so stamping the middle one would be wrong."""

    def __init__(self, depth: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index % 2:
                x = torch.tanh(x)
        return x.sum()


class _DenseSkipNet(_AlternatingNet):
    """Each block also adds the output of two blocks back: the tail reads the template's first
    block, which stamping cannot map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x, x]
        for block in self.blocks:
            outputs.append(block(outputs[-1]) + outputs[-2])
        return outputs[-1].sum()


@pytest.mark.parametrize("net", [_AlternatingNet, _DenseSkipNet])
def test_models_breaking_the_rules_are_traced_whole(net):
    model = net(MIN_STAMPED_BLOCKS + 1)
    stamped, traced = _both(model, (torch.randn(4, 8),))
    assert not stamped.stamped
    assert graph_difference(stamped, traced) == ""


def test_shallow_block_lists_are_traced_whole():
    model = _AlternatingNet(MIN_STAMPED_BLOCKS - 1)
    assert not capture_repeated(model, (torch.randn(4, 8),)).stamped


def test_block_list_needs_identical_blocks():
    model = _AlternatingNet(MIN_STAMPED_BLOCKS)
    model.blocks[3] = nn.Linear(8, 8)
    assert repeated_block_list(model) is None
    assert repeated_block_list(_AlternatingNet(MIN_STAMPED_BLOCKS)) == ("blocks", 8)
