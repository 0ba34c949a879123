"""Run under mpirun -np 2: one SGD step (LR 1, from 0) with known, different gradients on each
rank, through hvd.DistributedOptimizer built with app.optimizers.horovod_options, without and
with --fp16_allreduce; writes the resulting weights (minus the combined gradient) to
OUT_DIR/rank-R.json."""
import json
import sys

import numpy as np

from app.compat import hvd, tf  # first: it sets TF_USE_LEGACY_KERAS

from app import optimizers

GRADIENTS = ([1.0001, 0.1, 3.3333, 1e-5], [2.0003, 0.3, 1.1111, 3e-5])  # rank 0's, rank 1's

hvd.init()
found = {}
for fp16_allreduce in (False, True):
    optimizer = hvd.DistributedOptimizer(
        tf.keras.optimizers.legacy.SGD(1.0),
        **optimizers.horovod_options(fp16_allreduce=fp16_allreduce))
    weights = tf.Variable(np.zeros(4, np.float32), name=f"kernel_{fp16_allreduce}")
    with tf.GradientTape() as tape:  # a loss whose gradient is this rank's vector
        loss = tf.reduce_sum(tf.constant(GRADIENTS[hvd.rank()], tf.float32) * weights)
    optimizer.minimize(loss, [weights], tape=tape)  # Horovod allreduces in minimize
    found["fp16" if fp16_allreduce else "fp32"] = weights.numpy().tolist()
with open(f"{sys.argv[1]}/rank-{hvd.rank()}.json", "w") as out:
    json.dump({"gradients": GRADIENTS, **found}, out)
