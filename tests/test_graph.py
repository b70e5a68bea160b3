"""Graph capture and the symbolic profiler against real execution and published formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hierarchical_ap import CaptureError, capture
from hierarchical_ap.models import from_spec
from tests.measure import (
    graph_inputs,
    measured_kernel_calls,
    measured_node_forward_flops,
    measured_saved_bytes,
    measured_train_flops,
)
from tests.reference_models import MLP, SmallCNN, TinyGPT, class_loss, lm_loss


def gpt_model_flops(batch: int, layers: int, seq: int, hidden: int, vocab: int) -> float:
    """Korthikanti et al. eq. (7): model FLOPs of one training step, no recomputation."""
    return (
        72
        * batch
        * layers
        * seq
        * hidden**2
        * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))
    )


def _cases():
    torch.manual_seed(0)
    gpt = TinyGPT(layers=2, hidden=64, heads=4, vocab=128, seq=32)
    ids = torch.randint(0, 128, (2, 32))
    yield "gpt", gpt, (ids,), lm_loss, torch.randint(0, 128, (2, 32))
    yield "mlp", MLP(), (torch.randn(8, 32),), class_loss, torch.randint(0, 10, (8,))
    yield "cnn", SmallCNN(), (torch.randn(4, 3, 8, 8),), class_loss, torch.randint(0, 10, (4,))


CASES = {name: case for name, *case in _cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_train_flops_match_real_flop_counter(name):
    model, inputs, loss_fn, targets = CASES[name]
    graph = capture(model, inputs, loss_fn=loss_fn, targets=targets)
    assert graph.train_flops == measured_train_flops(model, inputs, loss_fn, targets)


@pytest.mark.parametrize("name", list(CASES))
def test_node_forward_flops_match_real_flop_counter(name):
    model, inputs, loss_fn, targets = CASES[name]
    graph = capture(model, inputs, loss_fn=loss_fn, targets=targets)
    measured = measured_node_forward_flops(graph, graph_inputs(graph, model, (inputs, {}, targets)))
    for node in graph.nodes.values():
        assert node.profile.forward_flops == measured[node.name], node.name
    assert sum(measured.values()) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_counts_match_a_real_eager_step(name):
    # the nodes' counts, summed, against the aten calls of one real forward and backward; the
    # eager step also runs what no node holds (autograd summing the gradients of a value
    # read twice, the loss's seed), hence the slack
    model, inputs, loss_fn, targets = CASES[name]
    graph = capture(model, inputs, loss_fn=loss_fn, targets=targets)
    forward, backward = measured_kernel_calls(model, inputs, loss_fn, targets)
    profiled_forward = sum(n.profile.forward_kernels for n in graph.nodes.values())
    profiled_backward = sum(n.profile.backward_kernels for n in graph.nodes.values())
    assert abs(profiled_forward - forward) <= max(5, 0.1 * forward)
    assert abs(profiled_backward - backward) <= max(5, 0.1 * backward)
    linear = next(n for n in graph.nodes.values() if n.target == "aten.linear.default")
    # t + addmm on a 2-d input (plus two views on a 3-d one); backward two mm, a sum, views
    assert linear.profile.forward_kernels in (2, 4)
    assert linear.profile.backward_kernels >= 4


@pytest.mark.parametrize("name", list(CASES))
def test_saved_activation_bytes_match_saved_tensors_hooks(name):
    model, inputs, loss_fn, targets = CASES[name]
    graph = capture(model, inputs, loss_fn=loss_fn, targets=targets)
    measured = measured_saved_bytes(model, inputs, loss_fn, targets)
    assert graph.saved_activation_bytes() == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize(
    "layers,hidden,heads,seq,vocab,batch",
    [(2, 64, 4, 64, 512, 2), (4, 256, 8, 128, 1000, 1), (96, 12288, 96, 2048, 51200, 1)],
)
def test_gpt_training_flops_formula_on_meta(layers, hidden, heads, seq, vocab, batch):
    with torch.device("meta"):
        model = TinyGPT(layers, hidden, heads, vocab, seq)
        ids = torch.zeros(batch, seq, dtype=torch.long)
    graph = capture(model, (ids,), loss_fn=lm_loss, targets=ids)
    expected = gpt_model_flops(batch, layers, seq, hidden, vocab)
    assert graph.train_flops == pytest.approx(expected, rel=0.02)
    assert graph.has_loss


def test_layers_follow_modules_and_identical_blocks_share_a_hash():
    with torch.device("meta"):
        model = TinyGPT(layers=3, hidden=32, heads=2, vocab=64, seq=16)
        ids = torch.zeros(2, 16, dtype=torch.long)
    graph = capture(model, (ids,), loss_fn=lm_loss, targets=ids)
    names = [layer.name for layer in graph.layers]
    assert names[:2] == ["wte", "wpe"]
    assert names[2:5] == ["blocks.0", "blocks.1", "blocks.2"]
    assert names[-2:] == ["ln", "head"]
    hashes = {graph.layer(f"blocks.{i}").structural_hash for i in range(3)}
    assert len(hashes) == 1
    assert graph.layer("head").structural_hash not in hashes
    assert set(graph.layer("blocks.1").params) == {
        f"blocks.1.{p}" for p, _ in model.blocks[1].named_parameters()
    }
    assert set(graph.param_shapes) == set(dict(model.named_parameters()))
    for node in graph.nodes.values():
        if node.target == "aten.linear.default":
            assert node.module_path.startswith(node.layer)


def test_parameters_touched_and_output_metadata():
    model = MLP(width=16, depth=1, classes=4)
    graph = capture(model, (torch.randn(5, 16),))
    linears = [n for n in graph.nodes.values() if n.target == "aten.linear.default"]
    assert [n.params for n in linears] == [
        ("net.0.weight", "net.0.bias"),
        ("out.weight", "out.bias"),
    ]
    assert linears[-1].outputs[0].shape == (5, 4)
    assert linears[-1].outputs[0].dtype == torch.float32
    assert not graph.has_loss


def test_capture_without_allocating_weights():
    with torch.device("meta"):
        model = TinyGPT(layers=2, hidden=4096, heads=32, vocab=50000, seq=2048)
        ids = torch.zeros(4, 2048, dtype=torch.long)
    graph = capture(model, (ids,), loss_fn=lm_loss, targets=ids)
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())


def test_keyword_inputs_are_accepted():
    model = MLP(width=8, depth=1)

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *, features):
            return self.inner(features)

    graph = capture(Keyword(), {"features": torch.randn(3, 8)})
    (name,) = graph.model_inputs
    assert graph.input_values[name].shape == (3, 8)
    assert graph.target_inputs == []


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: not traceable
            return x * 2
        return x


def test_untraceable_model_names_module_and_line():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "module 'gate' (Gate)" in message
    assert "test_graph.py" in message
    assert "torch.cond" in message


def test_non_scalar_loss_is_rejected():
    model = MLP(width=8, depth=1)
    with pytest.raises(CaptureError, match="one scalar tensor"):
        capture(model, (torch.randn(3, 8),), loss_fn=lambda out: out * 2)


def test_sdpa_profile_keeps_flash_semantics():
    """Attention saves q, k, v, the output and O(s) statistics, never the s×s matrix."""
    batch, seq, hidden, heads = 1, 512, 64, 4
    with torch.device("meta"):
        model = TinyGPT(1, hidden, heads, 32, seq)
        ids = torch.zeros(batch, seq, dtype=torch.long)
    graph = capture(model, (ids,), loss_fn=lm_loss, targets=ids)
    (attn,) = [n for n in graph.nodes.values() if "scaled_dot_product" in n.target]
    assert attn.profile.internal_saved_bytes < batch * heads * seq * seq
    assert attn.profile.backward_flops == 2 * attn.profile.forward_flops
    assert attn.profile.forward_flops == 4 * batch * heads * seq * seq * (hidden // heads)


def test_loss_fn_without_targets():
    model = MLP(width=8, depth=1)
    graph = capture(model, (torch.randn(3, 8),), loss_fn=lambda out: F.relu(out).mean())
    assert graph.has_loss
    assert graph.train_flops > 0


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_dynamic_batch_graph_equals_a_capture_at_that_batch(spec):
    from hierarchical_ap.models import from_spec

    small = from_spec(spec, batch=2, seq=16)
    dynamic = capture(
        small.model,
        small.example_inputs,
        loss_fn=small.loss_fn,
        targets=small.targets,
        dynamic_batch=True,
    )
    large = from_spec(spec, batch=8, seq=16)
    static = capture(
        large.model, large.example_inputs, loss_fn=large.loss_fn, targets=large.targets
    )
    rebatched = dynamic.at_batch(8)

    assert dynamic.batch_size == 2 and rebatched.batch_size == 8
    assert list(rebatched.nodes) == list(static.nodes)
    for name, node in static.nodes.items():
        assert rebatched.nodes[name].outputs == node.outputs, name
        assert rebatched.nodes[name].profile == node.profile, name
    assert rebatched.input_values == static.input_values
    assert rebatched.train_flops == static.train_flops == 4 * dynamic.train_flops
    assert [lay.structural_hash for lay in rebatched.layers] == [
        lay.structural_hash for lay in static.layers
    ]


def test_at_batch_needs_a_dynamic_capture():
    model = MLP()
    graph = capture(
        model, (torch.randn(4, 32),), loss_fn=class_loss, targets=torch.zeros(4, dtype=torch.long)
    )
    assert graph.at_batch(4) is graph
    with pytest.raises(ValueError, match="dynamic_batch=True"):
        graph.at_batch(8)


def test_metadata_checks_cost_nothing():
    # captured on the meta device, the zoo GPT checks its position ids' metadata
    # (`_assert_tensor_metadata`); the runtime skips the check, so the cost model must too
    bundle = from_spec("gpt:layers=1,hidden=32,heads=2,vocab=64,seq=8", batch=2, device="meta")
    graph = capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )
    checks = [n for n in graph.nodes.values() if n.target == "aten._assert_tensor_metadata.default"]
    assert checks
    for node in checks:
        p = node.profile
        assert (p.forward_flops, p.forward_bytes, p.forward_kernels) == (0, 0, 0)
        assert (p.backward_flops, p.backward_bytes, p.backward_kernels) == (0, 0, 0)
