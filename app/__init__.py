"""Orchestration: flags, the experiment registry, Horovod glue, callbacks and entry points."""
