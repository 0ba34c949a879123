"""Run under mpirun -np 2: one SGD step (LR 1, from 0) with known, different gradients on each
rank, through the distributed optimizers app.train builds: hvd.DistributedOptimizer without
and with --fp16_allreduce, and with --adasum (three tensors in one step: Adasum
combines each on its own). Writes the resulting weights (minus the combined gradient) to
OUT_DIR/rank-R.json."""
import json
import sys

import numpy as np

from app import horovod  # first: it sets TF_XLA_FLAGS
from app.horovod import hvd, keras, tf

GRADIENTS = ([1.0001, 0.1, 3.3333, 1e-5], [2.0003, 0.3, 1.1111, 3e-5])  # rank 0's, rank 1's
ADASUM_GRADIENTS = {  # name: (rank 0's, rank 1's)
    "orthogonal": ([1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]),
    "identical": ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]),
    "general": GRADIENTS,
}


def step(optimizer, gradients):
    """Minus the combined gradients of one step from zero weights: {name: [4 floats]}."""
    weights = {name: keras.Variable(np.zeros(4, np.float32), name=name) for name in gradients}
    optimizer.apply_gradients(  # Horovod reduces in the optimizer's apply()
        [(tf.constant(gradients[name][hvd.rank()], tf.float32), weights[name])
         for name in gradients])
    return {name: weight.numpy().tolist() for name, weight in weights.items()}


hvd.init()
found = {}
for fp16_allreduce in (False, True):
    optimizer = hvd.DistributedOptimizer(
        keras.optimizers.SGD(1.0),
        **horovod.allreduce_options(fp16_allreduce=fp16_allreduce))
    found["fp16" if fp16_allreduce else "fp32"] = step(
        optimizer, {f"kernel_{fp16_allreduce}": GRADIENTS})[f"kernel_{fp16_allreduce}"]
found["adasum"] = step(hvd.DistributedOptimizer(
    keras.optimizers.SGD(1.0), **horovod.allreduce_options(adasum=True)),
    ADASUM_GRADIENTS)
with open(f"{sys.argv[1]}/rank-{hvd.rank()}.json", "w") as out:
    json.dump({"gradients": GRADIENTS, "adasum_gradients": ADASUM_GRADIENTS, **found}, out)
