"""The result of the intra-op pass: a placement for every parameter, input and node of a graph."""

from __future__ import annotations

from dataclasses import dataclass, field

from intra_op.placement import Placements, format_placements


@dataclass
class ShardingSolution:
    """Where every value of a captured graph lives on a logical mesh.

    * ``param_placements``: parameter FQN → storage placement (one entry per mesh axis); a
      parameter ``Shard``-ed along a data-parallel axis is ZeRO-3 style (gathered for use).
    * ``input_placements``: graph input value name (``OpGraph.model_inputs`` and
      ``target_inputs``) → placement the input is fed in.
    * ``node_inputs``: node name → the placement each of its tensor inputs (``OpNode.inputs``
      order) is redistributed to before the op runs.
    * ``node_outputs``: node name → placement of its output(s) after the op.
    * ``node_strategy_names``: node name → the chosen strategy's name (display only).
    """

    mesh_shape: tuple[int, int]
    param_placements: dict[str, Placements]
    input_placements: dict[str, Placements]
    node_inputs: dict[str, tuple[Placements, ...]]
    node_outputs: dict[str, Placements]
    node_strategy_names: dict[str, str] = field(default_factory=dict)
    cost_s: float = 0.0
    """Objective value: forward + backward compute, communication and resharding time (s)."""
    memory_bytes_per_device: float = 0.0
    """Parameters, gradients, optimizer states and saved activations on one device (bytes)."""
    num_variables: int = 0
    num_constraints: int = 0
    solve_time_s: float = 0.0
    solver: str = ""
    forward_time_s: float = 0.0
    """The forward share of ``cost_s`` (what full recomputation runs again)."""
    dispatch_s: float = 0.0
    """DTensor's dispatch charge in ``cost_s`` (``intra_op.cost_graph``; 0 for a stage that
    runs as plain data parallelism)."""
    gradient_sync_s: float = 0.0
    """Synchronisation of replicated parameters' gradients, once per step."""
    state_bytes_per_device: float = 0.0
    """Parameters, gradients and optimizer states (part of ``memory_bytes_per_device``)."""
    activation_bytes_per_device: float = 0.0
    """Activations kept for backward, one micro-batch (the rest of ``memory_bytes_per_device``)."""
    forward_collectives: int | None = None
    """Collectives DTensor ran in the forward when ``propagate_solution`` recorded this
    solution (``None``: not recorded, e.g. an ILP solution); 0 lets the part run on local
    shards (``intra_op.local_execution``)."""

    def describe_params(self) -> dict[str, str]:
        """Parameter FQN → compact placement string (``S0R``…)."""
        return {fqn: format_placements(p) for fqn, p in self.param_placements.items()}
