"""Time GEMMs, attention and transformer blocks on this machine against the cost model.

Each case is a module, its input, and the nodes of its captured graph that it compares:

* ``gemm MxKxN``: ``x @ W`` with ``x`` of M×K and ``W`` of K×N; the backward is W's gradient,
  one more GEMM of the same size (the input needs no gradient);
* ``attention BxHxSxD``: causal ``scaled_dot_product_attention`` of B×H heads of S tokens and
  head width D. The captured module makes q, k and v with a bias-free projection (so that the
  attention's backward gives all three gradients), and only its attention node is compared,
  with the attention measured on its own;
* ``gpt-block H BxS``: one zoo GPT block (``hierarchical_ap.models.gpt.GPTBlock``) of hidden
  width H, 4H feed-forward and H/128 heads, on B×S tokens.

Measured: the median over ``--reps`` (after ``--warmup``) of the forward alone and of the
forward and backward (``torch.autograd.grad`` of the output, seeded with ones, with respect
to the parameters, or to q, k and v), timed with CUDA events on a GPU and
``time.perf_counter`` on a CPU.

Predicted: the case captured as the planner captures a model (``hierarchical_ap.graph.capture``
on the meta device), each compared node priced by ``CostModel.node_forward_time`` and
``node_backward_time`` on the device's ``DeviceSpec`` with ``CostModel.for_device``'s
efficiencies, and summed. On a GPU the device is the datasheet preset named by ``--preset`` or
found from ``torch.cuda.get_device_name()`` ("NVIDIA H200" → H200-141GB); on a CPU it is
``DeviceSpec.cpu()`` (the whole host as one worker, unprobed defaults).

Prints a row per case: measured and predicted forward and forward + backward milliseconds and
the ratio measured / predicted of the latter. ``--json PATH`` also writes the rows.

    python benchmarks/gpu_cost_model.py                 # on a GPU, bf16, the full sizes
    python benchmarks/gpu_cost_model.py --device cpu --quick --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hierarchical_ap.cluster import DeviceSpec
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.graph import capture
from hierarchical_ap.models.config import ModelConfig
from hierarchical_ap.models.gpt import GPTBlock

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Head width of the GPT blocks (hidden / heads), as GPT-3 and Megatron's runs use.
HEAD_WIDTH = 128

FULL_GEMMS = ((8192, 8192, 8192), (4096, 4096, 16384), (16384, 4096, 4096), (2048, 1024, 4096))
FULL_ATTENTION = ((4, 32, 2048, 128), (1, 32, 8192, 128), (8, 16, 1024, 64))
FULL_BLOCKS = ((2048, 4, 2048), (4096, 2, 2048), (8192, 1, 2048))
QUICK_GEMMS = ((256, 256, 256), (128, 512, 256))
QUICK_ATTENTION = ((2, 4, 128, 32),)
QUICK_BLOCKS = ((256, 2, 64),)


class MatMul(nn.Module):
    """``x @ weight``: one GEMM forward, one (the weight's gradient) backward."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n) / k**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class ProjectedAttention(nn.Module):
    """q, k, v from a bias-free projection of ``x``, then causal attention over ``heads``."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        shape = (batch, tokens, 3, self.heads, hidden // self.heads)
        q, k, v = self.qkv(x).view(shape).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@dataclass(frozen=True)
class Case:
    """A named workload: ``build()`` makes the module on the current default device, ``inputs``
    are the captured module's input shapes, ``compared`` picks the graph nodes priced (all when
    None), and ``measured`` (when given) is what is timed instead of the module."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    compared: str | None = None
    measured: Callable[[torch.device, torch.dtype], tuple[Callable, list[torch.Tensor]]] | None = (
        None
    )


@dataclass(frozen=True)
class Row:
    case: str
    measured_forward_ms: float
    predicted_forward_ms: float
    measured_step_ms: float
    predicted_step_ms: float

    @property
    def ratio(self) -> float:
        """Measured over predicted forward + backward."""
        return self.measured_step_ms / self.predicted_step_ms


def gemm_case(m: int, k: int, n: int) -> Case:
    return Case(f"gemm {m}x{k}x{n}", lambda: MatMul(k, n), (m, k))


def attention_case(batch: int, heads: int, tokens: int, width: int) -> Case:
    hidden = heads * width

    def measured(device: torch.device, dtype: torch.dtype) -> tuple[Callable, list[torch.Tensor]]:
        shape = (batch, heads, tokens, width)
        q, k, v = (
            torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv"
        )
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v]

    return Case(
        f"attention {batch}x{heads}x{tokens}x{width}",
        lambda: ProjectedAttention(hidden, heads),
        (batch, tokens, hidden),
        compared="scaled_dot_product_attention",
        measured=measured,
    )


def block_case(hidden: int, batch: int, tokens: int) -> Case:
    config = ModelConfig(
        family="gpt",
        layers=1,
        hidden=hidden,
        heads=max(1, hidden // HEAD_WIDTH),
        kv_heads=max(1, hidden // HEAD_WIDTH),
        ffn_hidden=4 * hidden,
        vocab=1024,
        seq=tokens,
        tied_head=False,
    )
    return Case(
        f"gpt-block {hidden} {batch}x{tokens}", lambda: GPTBlock(config), (batch, tokens, hidden)
    )


def predicted_seconds(case: Case, device: DeviceSpec, dtype: torch.dtype) -> tuple[float, float]:
    """(forward, forward + backward) the cost model prices the case's compared nodes at."""
    with torch.device("meta"):
        module = case.build().to(dtype)
    graph = capture(module, (torch.empty(case.input_shape, device="meta", dtype=dtype),))
    cost = CostModel.for_device(device)
    nodes = [n for n in graph.nodes.values() if case.compared in (None, n.name)]
    if not nodes:
        raise RuntimeError(f"{case.name}: the captured graph has no node {case.compared!r}")
    forward = backward = 0.0
    for node in nodes:
        forward += cost.node_forward_time(node.profile, device, node.compute_dtype)
        backward += cost.node_backward_time(node.profile, device, node.compute_dtype)
    return forward, forward + backward


def measured_seconds(
    case: Case, device: torch.device, dtype: torch.dtype, warmup: int, reps: int
) -> tuple[float, float]:
    """(forward, forward + backward) medians of the case run on ``device``."""
    torch.manual_seed(0)
    if case.measured is not None:
        forward, wrt = case.measured(device, dtype)
    else:
        with torch.device(device):
            module = case.build().to(dtype)
            x = torch.randn(case.input_shape, dtype=dtype)
        wrt = list(module.parameters())

        def forward() -> torch.Tensor:
            return module(x)

    with torch.no_grad():
        seed = torch.ones_like(forward())

    def step() -> None:
        torch.autograd.grad(forward(), wrt, seed)

    return _median_seconds(forward, device, warmup, reps), _median_seconds(
        step, device, warmup, reps
    )


def _median_seconds(
    run: Callable[[], object], device: torch.device, warmup: int, reps: int
) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def device_spec(device: torch.device, preset: str | None) -> DeviceSpec:
    """The ``DeviceSpec`` the predictions use (module docstring)."""
    if device.type == "cpu":
        return DeviceSpec.cpu()
    if preset is not None:
        return DeviceSpec.preset(preset)
    name = torch.cuda.get_device_name(device)
    words = name.replace("NVIDIA", "").split()
    if not words:
        raise SystemExit(f"cannot tell the preset of GPU {name!r}; pass --preset")
    return DeviceSpec.preset(words[0])


def cases(quick: bool) -> list[Case]:
    gemms, attention, blocks = (
        (QUICK_GEMMS, QUICK_ATTENTION, QUICK_BLOCKS)
        if quick
        else (FULL_GEMMS, FULL_ATTENTION, FULL_BLOCKS)
    )
    return [
        *(gemm_case(*shape) for shape in gemms),
        *(attention_case(*shape) for shape in attention),
        *(block_case(*shape) for shape in blocks),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="datasheet device (default: the GPU's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    dtype = DTYPES[args.dtype]
    spec = device_spec(device, args.preset)
    print(f"device {spec.name} ({device}), {args.dtype}, median of {args.reps} after {args.warmup}")
    print(
        f"{'case':32s} {'fwd ms':>9s} {'model':>9s} {'fwd+bwd ms':>11s} {'model':>9s} {'ratio':>6s}"
    )
    rows = []
    for case in cases(args.quick):
        forward, step = measured_seconds(case, device, dtype, args.warmup, args.reps)
        model_forward, model_step = predicted_seconds(case, spec, dtype)
        row = Row(case.name, forward * 1e3, model_forward * 1e3, step * 1e3, model_step * 1e3)
        rows.append(row)
        print(
            f"{row.case:32s} {row.measured_forward_ms:9.3f} {row.predicted_forward_ms:9.3f} "
            f"{row.measured_step_ms:11.3f} {row.predicted_step_ms:9.3f} {row.ratio:6.2f}",
            flush=True,
        )
    ratios = [row.ratio for row in rows]
    print(
        f"measured / predicted (fwd+bwd): median {statistics.median(ratios):.2f}, "
        f"range {min(ratios):.2f}-{max(ratios):.2f}"
    )
    if args.json is not None:
        payload = {
            "device": spec.name,
            "dtype": args.dtype,
            "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
