"""Size and solve time of the sharding ILP for one transformer block on several meshes.

Blocks: GPT-3 175B (h=12288, 96 heads, seq 2048) and LLaMA-3 70B (h=8192, 64 heads, 8 KV
heads, ffn 28672, seq 8192), each at batch 8, on A100 meshes 1×8, 2×4 (one host) and 8×8
(eight hosts). Target on a 2-core machine: every solve under 2 s.
"""

from __future__ import annotations

import time

from hierarchical_ap import capture
from hierarchical_ap.cluster import Cluster
from hierarchical_ap.models import from_spec
from intra_op import solve_sharding

BLOCKS = {
    "gpt3-175b block": ("gpt3-175b:layers=1", 8),
    "llama3-70b block": ("llama3-70b:layers=1", 8),
}
MESHES = {
    "1x8": ("1x8xA100-80GB", (1, 8)),
    "2x4": ("1x8xA100-80GB", (2, 4)),
    "8x8": ("8x8xA100-80GB", (8, 8)),
}


def main() -> None:
    print(
        f"{'block':18} {'mesh':5} {'nodes':>6} {'variables':>10} {'constraints':>12} {'build+solve s':>14} {'solve s':>8}"
    )
    for label, (spec, batch) in BLOCKS.items():
        bundle = from_spec(spec, batch=batch)
        graph = capture(
            bundle.model, bundle.example_inputs, loss_fn=bundle.loss_fn, targets=bundle.targets
        )
        block = graph.layer("blocks.0").nodes
        for mesh_label, (cluster_spec, shape) in MESHES.items():
            cluster = Cluster.from_spec(cluster_spec)
            started = time.perf_counter()
            solution = solve_sharding(graph, cluster.logical_mesh(shape), cluster, nodes=block)
            total = time.perf_counter() - started
            print(
                f"{label:18} {mesh_label:5} {len(block):6d} {solution.num_variables:10d} "
                f"{solution.num_constraints:12d} {total:14.2f} {solution.solve_time_s:8.2f}"
            )


if __name__ == "__main__":
    main()
