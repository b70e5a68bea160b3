"""Kernels and bytes of one optimizer step, counted on the real torch optimizers, against
hand-derived counts of the per-tensor update each one runs."""

from __future__ import annotations

import pytest

from hierarchical_ap.profile import UpdateProfile, optimizer_update_profile


def test_sgd_is_one_in_place_add():
    # p.add_(grad, alpha=-lr): reads p and grad, writes p, 4 bytes each
    assert optimizer_update_profile("sgd") == UpdateProfile(kernels=1, bytes_per_element=12.0)


def test_sgd_with_momentum_updates_its_buffer_then_the_parameter():
    # buf.mul_(momentum) (read + write buf), buf.add_(grad) (read buf and grad, write buf),
    # p.add_(buf, alpha=-lr) (read p and buf, write p)
    profile = optimizer_update_profile("sgd-momentum")
    assert profile == UpdateProfile(kernels=3, bytes_per_element=8.0 + 12.0 + 12.0)


def test_adamw_is_adam_plus_its_decoupled_weight_decay():
    # AdamW's step is Adam's plus p.mul_(1 - lr * weight_decay): one kernel, read + write p
    adam, adamw = optimizer_update_profile("adam"), optimizer_update_profile("adamw")
    assert adamw.kernels == adam.kernels + 1
    assert adamw.bytes_per_element == pytest.approx(adam.bytes_per_element + 8.0)
    # both read and write the two moments and the parameter and read the gradient at least
    assert adam.bytes_per_element >= 4 * (3 * 2 + 1)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; known: adam, adamw"):
        optimizer_update_profile("lion")
