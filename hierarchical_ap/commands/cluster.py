"""`hap cluster probe`: measure collectives on local workers and write a cluster file."""

from __future__ import annotations

import argparse
import json
import re

from rich.console import Console
from rich.table import Table

from hierarchical_ap.probe import DEFAULT_REPS, DEFAULT_SIZES, DEFAULT_TIMEOUT_S, ProbeResult, probe

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(|B|K|KB|KIB|M|MB|MIB|G|GB|GIB)\s*$", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """Bytes from "4096", "4KiB", "16MiB", "1G" (K, M, G are binary multiples)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a byte count such as 4096, 64KiB or 16MiB"
        )
    value = int(match.group(1)) * _SIZE_SCALE[match.group(2)[:1].upper()]
    if value < 4:
        raise argparse.ArgumentTypeError(f"size {text!r} is below one fp32 element (4 bytes)")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `cluster` with its `probe` sub-command to the `hap` parser."""
    parser = subparsers.add_parser("cluster", help="describe and measure clusters")
    commands = parser.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    probe_parser = commands.add_parser(
        "probe",
        help="time collectives on local Ray workers and write a cluster file with fitted alpha/beta",
    )
    probe_parser.add_argument(
        "--workers", type=int, default=2, help="workers to probe (default: 2)"
    )
    probe_parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=list(DEFAULT_SIZES),
        metavar="SIZE",
        help="message sizes, e.g. 4KiB 1MiB 16MiB (default: 4 KiB to 16 MiB in steps of 4x)",
    )
    probe_parser.add_argument(
        "--reps",
        type=int,
        default=DEFAULT_REPS,
        help=f"timed repetitions per size (default: {DEFAULT_REPS})",
    )
    probe_parser.add_argument(
        "--device", default="CPU", help="CPU (gloo), or a GPU preset such as H100-80GB (NCCL)"
    )
    probe_parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a stuck step fails"
    )
    probe_parser.add_argument(
        "-o",
        "--output",
        default="cluster.yaml",
        help="cluster file to write (.yaml, .yml or .json)",
    )
    probe_parser.add_argument(
        "--json", action="store_true", help="print the result as JSON, not a table"
    )
    probe_parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    probe_parser.set_defaults(run=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    """Probe, write the cluster file, and print the fits."""
    progress = Console(stderr=True, quiet=args.quiet or args.json)
    with progress.status("probing collectives") as status:
        result = probe(
            args.workers,
            device=args.device,
            sizes=args.sizes,
            reps=args.reps,
            timeout_s=args.timeout,
            on_progress=lambda step: status.update(f"probing: {step}"),
        )
    path = result.cluster.to_file(args.output)
    if args.json:
        print(json.dumps(_summary(result, str(path)), indent=2))
    else:
        console = Console()
        console.print(_table(result))
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)
    return 0


def _summary(result: ProbeResult, path: str) -> dict:
    return {
        "path": path,
        "workers": result.cluster.devices_per_host,
        "backend": result.cluster.backend,
        "gemm_flops": result.rates and result.rates.gemm_flops,
        "gemm_flops_bf16": result.rates and result.rates.gemm_flops_bf16,
        "memory_bandwidth": result.rates and result.rates.memory_bandwidth,
        "kernel_overhead_s": result.rates and result.rates.kernel_overhead_s,
        "cache_bandwidth": result.rates and result.rates.cache_bandwidth,
        "cache_bytes": result.rates and result.cluster.device.cache_bytes,
        "dtensor_dispatch_s": result.rates and result.rates.dtensor_dispatch_s,
        "reference_block_s": result.per_core_rates and result.per_core_rates.reference_block_s,
        "compute_scale": result.cluster.device.compute_scale,
        "collectives": {
            c.value: {"alpha": f.alpha, "beta": f.beta} for c, f in result.fits.items()
        },
    }


def _table(result: ProbeResult) -> Table:
    cluster = result.cluster
    caption = None
    rates = result.rates
    if rates is not None:
        caption = (
            f"per worker: GEMM {rates.gemm_flops / 1e9:.1f} GFLOP/s fp32, "
            f"{rates.gemm_flops_bf16 / 1e9:.1f} bf16, memory "
            f"{rates.memory_bandwidth / 1e9:.2f} GB/s ({rates.cache_bandwidth / 1e9:.2f} GB/s "
            f"for kernels within {cluster.device.cache_bytes / 2**20:g} MiB), "
            f"{rates.kernel_overhead_s * 1e6:.1f} µs per kernel "
            f"(+{rates.dtensor_dispatch_s * 1e6:.1f} µs on DTensor); a GPT block "
            f"{result.per_core_rates.reference_block_s * 1e3:.2f} ms, "
            f"{cluster.device.compute_scale:.2f}× the rates' prediction (compute_scale)"
        )
    table = Table(
        title=f"{cluster.devices_per_host} {cluster.device.name} workers ({cluster.backend})",
        caption=caption,
    )
    table.add_column("collective", no_wrap=True)
    table.add_column("alpha (µs/step)", justify="right")
    table.add_column("beta (ns/byte)", justify="right")
    table.add_column("1/beta (GB/s)", justify="right")
    for collective, fit in result.fits.items():
        table.add_row(
            collective.value,
            f"{fit.alpha * 1e6:.1f}",
            f"{fit.beta * 1e9:.3f}",
            f"{1e-9 / fit.beta:.2f}",
        )
    return table
