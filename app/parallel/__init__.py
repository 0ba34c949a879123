"""The kinds of parallelism beyond Horovod's data parallelism, and the seam that chooses one.

- kinds: the seam. One object per run, chosen from the flags (KINDS), owns everything that
  differs between data, pipeline and spatial parallelism; app.train asks it and never
  branches on them.
- pipeline_plan: where each rank sits in a pipelined run, the schedules and the cut of the
  model into stages (no TensorFlow); pipeline: the stages' runtime (MPI messages, one
  update per step).
- spatial: the layers that split each example into slabs over a group of ranks, exchanging
  halos.
- sharded_optimizer: the optimizer state (and gradients) sharded over the data-parallel
  ranks (ZeRO stages 1 and 2).
- sync_batch_norm: batch normalization over the global batch (Horovod's, guarded).

How the project talks to Horovod itself (import, allreduce options) is app.horovod's.
"""
