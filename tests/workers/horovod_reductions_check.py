"""Run under mpirun on Keras 3: hvd.DistributedOptimizer's
reductions, one SGD(1) step from zero on each rank's own float64 gradient, so that the step is
minus the reduced gradient: fp16 compression, Adasum, gradient_predivide_factor against fp16's
overflow, and process sets of the even and the odd ranks; and model.fit with jit_compile
refused. Writes {case: finding} to OUT_DIR/rank-R.json; tests/test_horovod_keras3.py judges
them."""
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import horovod.tensorflow.keras as hvd

SIZE = int(os.environ["OMPI_COMM_WORLD_SIZE"])  # the process sets are given to init()
PARITY_SETS = [hvd.ProcessSet(list(range(parity, SIZE, 2))) for parity in (0, 1)]
hvd.init(process_sets=PARITY_SETS)
RANK = hvd.rank()
GRADIENTS = np.random.default_rng(7).normal(size=(SIZE, 4)) * [1, 10, 100, 1000]


def one_sgd_step(gradient, **options):
    """Minus the reduced gradient: one SGD(1) step from zero with this rank's `gradient`."""
    weight = tf.Variable(np.zeros(4))
    optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(1.0), **options)
    # Keras 3's wrapper reduces in apply(), which model.fit and apply_gradients reach
    optimizer.apply_gradients([(tf.constant(gradient), weight)])
    return (-weight.numpy()).tolist()


found = {"gradients": GRADIENTS.tolist(),
         "fp16": one_sgd_step(GRADIENTS[RANK], compression=hvd.Compression.fp16),
         "adasum": one_sgd_step(GRADIENTS[RANK], op=hvd.Adasum),
         "parity_set": one_sgd_step(GRADIENTS[RANK], process_set=PARITY_SETS[RANK % 2])}
# fp16 overflows at 65504: SIZE x 60000 is in range only if predivided by SIZE first
for factor in (1.0, float(SIZE)):
    found[f"fp16_60000_predivide_{factor:g}"] = one_sgd_step(
        np.full(4, 60000.0), compression=hvd.Compression.fp16, gradient_predivide_factor=factor)
# XLA cannot compile Horovod's allreduce on this CPU build: model.fit with jit_compile=True
# is refused in one line (Keras 3 picks jit_compile on GPUs by itself)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
              jit_compile=True)
try:
    model.fit(GRADIENTS, GRADIENTS[:, :1], verbose=0)
    found["jit_compile"] = "trained"
except ValueError as error:
    found["jit_compile"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1].strip()}"
with open(f"{sys.argv[1]}/rank-{RANK}.json", "w") as out:
    json.dump(found, out)
