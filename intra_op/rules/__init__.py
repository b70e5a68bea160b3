"""Per-op-family sharding strategy rules; ``intra_op.strategies`` assembles the registry."""
