"""Run under mpirun -np 2: hvd.init() inside devices.threads_started_at_lowest_priority, then
an allreduce. Writes to OUT_DIR/rank-R.json the niceness of the threads hvd.init() started and
of this (the main) thread, and the allreduced sum."""
import json
import os
import sys

from app.horovod import hvd, tf  # first: it sets TF_XLA_FLAGS

from app import devices

before = devices.thread_ids()
with devices.threads_started_at_lowest_priority():
    hvd.init()
started = devices.thread_ids() - before
total = hvd.allreduce(tf.constant(float(hvd.rank() + 1)), op=hvd.Sum)
with open(os.path.join(sys.argv[1], f"rank-{hvd.rank()}.json"), "w") as out:
    json.dump({"started": [os.getpriority(os.PRIO_PROCESS, tid) for tid in started],
               "main": os.getpriority(os.PRIO_PROCESS, 0), "sum": float(total)}, out)
