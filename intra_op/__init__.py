"""Inner pass: per-op DTensor sharding strategies, resharding costs, the sharding ILP and
applying its solution to a captured graph. Imports only the `hierarchical_ap` foundations."""
