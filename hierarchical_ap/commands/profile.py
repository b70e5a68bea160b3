"""`hap profile`: capture a model symbolically and report parameters, FLOPs and activations."""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import groupby
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from hierarchical_ap.graph import OpGraph, capture

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="capture a model on fake tensors and print its parameters, FLOPs and activations",
        description=(
            "Capture MODEL with torch.export on the meta device (no weights are allocated) and "
            "print parameters, training FLOPs per step (forward + backward, no recomputation) "
            "and, per layer, FLOPs, parameters and the activation bytes autograd saves."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model spec, e.g. gpt3-175b or gpt:layers=2,hidden=64,heads=4,vocab=512,seq=64",
    )
    parser.add_argument("--batch", type=int, required=True, help="sequences per step")
    parser.add_argument(
        "--seq", type=int, default=None, help="sequence length (default: the model's)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="parameter and activation dtype"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.set_defaults(run=run)


def profile_report(
    spec: str, batch: int, seq: int | None = None, dtype: str = "fp32"
) -> dict[str, Any]:
    """Capture the model named by ``spec`` and summarise it as a JSON-able dict."""
    from hierarchical_ap.models import from_spec

    started = time.perf_counter()
    bundle = from_spec(spec, batch=batch, seq=seq, device="meta")
    bundle.model.to(DTYPES[dtype])
    build_time = time.perf_counter() - started
    graph = capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )
    return _report(
        graph,
        spec=spec,
        batch=batch,
        seq=int(bundle.example_inputs[0].shape[1]),
        dtype=dtype,
        build_time_s=build_time,
    )


def _report(graph: OpGraph, **header: Any) -> dict[str, Any]:
    return {
        **header,
        "params": graph.num_params,
        "param_bytes": graph.param_bytes,
        "forward_flops": graph.forward_flops,
        "backward_flops": graph.backward_flops,
        "train_flops": graph.train_flops,
        "saved_activation_bytes": graph.saved_activation_bytes(),
        "num_nodes": len(graph.nodes),
        "capture_time_s": graph.capture_time_s,
        "layers": graph.layer_summary(),
    }


def _human(value: float, unit: str = "") -> str:
    for threshold, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _bytes(value: float) -> str:
    for threshold, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return f"{value:.0f} B"


def wide_console() -> Console:
    """A console for tables: the terminal's width, or 120 columns when output is piped."""
    return Console(width=None if sys.stdout.isatty() else 120)


def render(report: dict[str, Any], console: Console) -> None:
    """Print the summary and the per-layer table; runs of identical layers share one row."""
    summary = Table(
        title=f"{report['spec']}  batch={report['batch']} seq={report['seq']} dtype={report['dtype']}",
        show_header=False,
    )
    summary.add_row("parameters", f"{report['params']:,} ({_human(report['params'])})")
    summary.add_row("parameter memory", _bytes(report["param_bytes"]))
    summary.add_row("forward FLOPs / step", _human(report["forward_flops"], "FLOP"))
    summary.add_row("training FLOPs / step (fwd + bwd)", _human(report["train_flops"], "FLOP"))
    summary.add_row("saved activations / step", _bytes(report["saved_activation_bytes"]))
    summary.add_row("graph nodes", str(report["num_nodes"]))
    summary.add_row("capture time", f"{report['capture_time_s']:.2f} s")
    console.print(summary)

    table = Table(title="layers (identical consecutive layers share a row; figures are per layer)")
    for column in ("layers", "count", "params", "fwd FLOP", "bwd FLOP", "saved act.", "hash"):
        left = column in ("layers", "hash")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for _, run in groupby(report["layers"], key=lambda layer: layer["hash"]):
        rows = list(run)
        first = rows[0]
        names = first["name"] if len(rows) == 1 else f"{first['name']} … {rows[-1]['name']}"
        table.add_row(
            names,
            str(len(rows)),
            _human(first["params"]),
            _human(first["forward_flops"]),
            _human(first["backward_flops"]),
            _bytes(first["saved_activation_bytes"]),
            first["hash"][:8],
        )
    console.print(table)


def run(args: argparse.Namespace) -> int:
    report = profile_report(args.model, args.batch, args.seq, args.dtype)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report, wide_console())
    return 0
