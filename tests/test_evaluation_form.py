"""``intra_op.evaluation``: which ops of a training capture switch in evaluation form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hierarchical_ap.graph import capture
from intra_op.evaluation import ATTENTION, BATCH_NORMS, DROPOUTS, evaluation_calls, pass_through


class ModeDependent(nn.Module):
    """Dropout, a tracked batch norm and attention with dropout: every rule of the module."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.norm(x))
        q = x.reshape(2, 1, 2, 4)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.3 if self.training else 0.0)


def _captured_calls():
    graph = capture(ModeDependent(), (torch.randn(4, 4),), loss_fn=lambda out: out.sum())
    nodes = [n for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    call_args = {n: (n.args, n.kwargs) for n in nodes}
    buffers = {n.name for n in graph.graph_module.graph.nodes if n.name.startswith("b_")}
    writers = {
        n for n in nodes if n.target is torch.ops.aten.add_.Tensor and n.args[0].name in buffers
    }
    return nodes, evaluation_calls(call_args, writers), writers


def test_each_mode_dependent_op_switches_and_nothing_else():
    nodes, calls, writers = _captured_calls()
    by_kind = {
        "dropout": [n for n in nodes if n.target in DROPOUTS],
        "batch_norm": [n for n in nodes if n.target in BATCH_NORMS],
        "attention": [n for n in nodes if n.target is ATTENTION],
    }
    assert all(len(found) == 1 for found in by_kind.values()), by_kind
    assert len(writers) == 1  # num_batches_tracked += 1
    switched = {*by_kind["dropout"], *by_kind["batch_norm"], *by_kind["attention"], *writers}
    assert set(calls) == switched

    (dropout,) = by_kind["dropout"]
    assert calls[dropout][0] is pass_through
    (norm,) = by_kind["batch_norm"]
    target, args, _ = calls[norm]
    assert target is norm.target and args[5] is False and norm.args[5] is True
    (attention,) = by_kind["attention"]
    target, args, kwargs = calls[attention]
    assert target is ATTENTION and kwargs.get("dropout_p", args[4] if len(args) > 4 else 0) == 0
    (counter,) = writers
    assert calls[counter][0] is pass_through


def test_pass_through_returns_its_first_argument_untouched():
    value = torch.zeros(3)
    assert pass_through(value, 1, alpha=2) is value
    assert torch.equal(value, torch.zeros(3))


def test_a_batch_norm_without_running_statistics_keeps_normalising_by_the_batch():
    """``model.eval()`` leaves such a norm on batch statistics (it has none to switch to)."""
    model = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False), nn.Dropout(0.5))
    graph = capture(model, (torch.randn(4, 4),), loss_fn=lambda out: out.sum())
    nodes = [n for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    calls = evaluation_calls({n: (n.args, n.kwargs) for n in nodes}, set())
    (norm,) = [n for n in nodes if n.target in BATCH_NORMS]
    assert norm.args[5] is True and norm.args[3] is None
    assert norm not in calls
    assert [n.target for n in calls] == [next(n for n in nodes if n.target in DROPOUTS).target]
