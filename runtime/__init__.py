"""Runtime: Ray actors, process groups, stage programs, pipeline schedules, cross-mesh
communication and checkpoints. Imports the foundations and `intra_op.apply`, never the planners."""
