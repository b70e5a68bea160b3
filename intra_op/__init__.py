"""Inner pass: per-op DTensor sharding strategies, resharding costs, the sharding ILP and
applying its solution to a captured graph. Imports only the `hierarchical_ap` foundations."""

from intra_op.apply import ShardedProgram, apply
from intra_op.solution import ShardingSolution
from intra_op.solve import solve_sharding

__all__ = ["ShardedProgram", "ShardingSolution", "apply", "solve_sharding"]
