"""Capture time and peak memory (RSS) of GPT-3 175B at batch 1, seq 2048, on the meta device.

Target on a 2-core machine: under 30 s and under 4 GiB. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import resource
import time

from hierarchical_ap import capture
from hierarchical_ap.models import from_spec


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gpt3-175b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()

    started = time.perf_counter()
    bundle = from_spec(args.model, batch=args.batch, seq=args.seq, device="meta")
    built = time.perf_counter()
    graph = capture(
        bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
    )
    done = time.perf_counter()

    print(f"model                 {args.model} (batch {args.batch}, seq {args.seq})")
    print(f"parameters            {graph.num_params / 1e9:.2f} B")
    print(f"graph nodes           {len(graph.nodes)} in {len(graph.layers)} layers")
    print(f"build on meta         {built - started:.2f} s")
    print(f"capture + profile     {done - built:.2f} s   (target < 30 s)")
    print(f"peak RSS              {peak_rss_bytes() / 2**30:.2f} GiB   (target < 4 GiB)")


if __name__ == "__main__":
    main()
