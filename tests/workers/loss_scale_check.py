"""Run under mpirun -np 2: the optimizer of --mixed_precision=float16 (Keras' dynamic loss
scaling, SGD at LR 1, inside hvd.DistributedOptimizer, or with `sharded` inside the optimizer
whose state app.parallel.sharded_optimizer shards, where each rank reduces half the kernel) on
a Dense layer that computes in float16. Step 1: rank 1's input overflows float16 once the loss
is scaled in the kernel's first element (rank 0's half), rank 0's does not; step 2: both are
finite. Writes the kernel and the loss scale after each step, and the layer's dtypes, to
OUT_DIR/rank-R.json.

    mpirun -np 2 python tests/workers/loss_scale_check.py OUT_DIR [sharded]
"""
import json
import sys

from app.horovod import hvd, keras, tf  # first: it sets TF_XLA_FLAGS

from app import optimizers
from app.parallel import sharded_optimizer

# The gradient of the scaled loss is the input times the scale, 2^15 on step 1: rank 1's
# 1000 x 2^15 exceeds float16's 65504, rank 0's 2^15 do not (2 x 2^15 would).
INPUTS = ({0: [[1.0, 1.0]], 1: [[1000.0, 1.0]]},  # step 1
          {0: [[1.0, 2.0]], 1: [[3.0, 0.5]]})     # step 2

hvd.init()
keras.mixed_precision.set_global_policy("mixed_float16")
layer = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
layer.build((None, 2))
scaled = optimizers.loss_scaled(keras.optimizers.SGD(1.0), "float16")
optimizer = (sharded_optimizer.shard(scaled, agree_on_overflow=True)
             if sys.argv[2:] == ["sharded"] else hvd.DistributedOptimizer(scaled))
steps = []
for inputs in INPUTS:
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(layer(tf.constant(inputs[hvd.rank()])), tf.float32))
        scaled_loss = optimizer.scale_loss(loss)
    optimizer.apply(tape.gradient(scaled_loss, layer.trainable_variables),
                    layer.trainable_variables)
    steps.append({"kernel": layer.kernel.numpy().ravel().tolist(),
                  "loss_scale": float(optimizer.dynamic_scale.numpy())})
with open(f"{sys.argv[1]}/rank-{hvd.rank()}.json", "w") as out:
    json.dump({"steps": steps, "compute_dtype": layer.compute_dtype,
               "variable_dtype": layer.kernel.dtype}, out)
