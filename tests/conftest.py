"""Test-wide settings: deterministic seeds and few threads on the 2-core CI machine."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
