"""Training-state bytes per parameter, as the ZeRO paper and Megatron-LM count them."""

from __future__ import annotations

import pytest
import torch

from intra_op.cost_graph import FP32_ADAM, TrainingMemory


@pytest.mark.parametrize(
    "dtype,optimizer,fp32_gradients,expected",
    [
        (torch.bfloat16, "adam", False, 16),  # ZeRO: 2 weight + 2 grad + 4 master + 4 + 4
        (torch.float16, "adamw", False, 16),
        (torch.bfloat16, "adam", True, 18),  # Megatron-LM accumulates gradients in fp32
        (torch.float32, "adam", False, 16),  # 4 weight + 4 grad + 4 + 4 moments
        (torch.float32, "sgd-momentum", False, 12),
        (torch.float32, "sgd", False, 8),
    ],
)
def test_bytes_per_parameter(dtype, optimizer, fp32_gradients, expected):
    memory = TrainingMemory.for_training(dtype, optimizer=optimizer, fp32_gradients=fp32_gradients)
    assert memory.bytes_per_parameter(dtype) == expected


def test_default_is_fp32_adam():
    assert FP32_ADAM == TrainingMemory.for_training(torch.float32)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; known: adam"):
        TrainingMemory.for_training(torch.float32, optimizer="lion")
