"""Runtime: Ray actors, process groups, stage programs, pipeline schedules, cross-mesh
communication and checkpoints. Imports the foundations and `intra_op.apply`, never the planners.

| module | job |
|---|---|
| `instructions.py` | a schedule's task lists → one static instruction list per worker (pure) |
| `stage_graph.py` | the plan's stages as node slices of the captured graph, boundary values (pure) |
| `stage_program.py` | one stage's slice run with `intra_op.apply` on the stage's DeviceMesh |
| `boundary.py` | moving boundary tensors between stages (the swap point for `cross_mesh.py`) |
| `worker.py` | one device's worker: process groups, stages, instruction loop, optimizer |
| `actors.py` | Ray actors per device in per-host placement groups, rendezvous |
| `executable.py` | `ParallelExecutable`, the driver's handle: train_step, state_dict, failures |
| `checkpoint.py` | DCP checkpoints: keys, metadata, staging and rename, optimizer-state templates |
| `precision.py` | training precision policies: bf16 compute, fp32 masters and reductions; fp16 refused |
| `optimizer.py` | the user's optimizer over a worker's shards (plain-tensor aliases on one device) |
"""
