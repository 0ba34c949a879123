"""Run under mpirun -np 2: each rank normalizes its own, different batch in training mode with
the project's SyncBatchNormalization, Horovod's own and plain Keras BatchNormalization, and
writes its batch, the layers' moving statistics and outputs to OUT_DIR/rank-R.npz."""
import sys

import numpy as np

from app.horovod import hvd, keras, tf
from app.parallel.sync_batch_norm import SyncBatchNormalization
import horovod.tensorflow

hvd.init()
rank = hvd.rank()
rng = np.random.default_rng(10 + rank)
# Channels 0-7: ordinary data, a different mean per rank. Channels 8-15: a large mean and a
# tiny spread, where E[x^2] - E[x]^2 cancels in float32.
ordinary = rng.normal(loc=3.0 * rank, scale=1.0 + rank, size=(32, 8))
cancelling = 1000.0 + 7.3 * np.arange(8) + 0.01 * rank + 1e-3 * rng.normal(size=(32, 8))
batch = np.concatenate([ordinary, cancelling], axis=1).astype(np.float32)

found = {"batch": batch}
for name, layer in (("project", SyncBatchNormalization(momentum=0.0)),
                    ("horovod", horovod.tensorflow.SyncBatchNormalization(momentum=0.0)),
                    ("plain", keras.layers.BatchNormalization(momentum=0.0))):
    outputs = layer(tf.constant(batch), training=True)
    found[f"{name}_mean"] = layer.moving_mean.numpy()
    found[f"{name}_variance"] = layer.moving_variance.numpy()
    found[f"{name}_outputs"] = outputs.numpy()
np.savez(f"{sys.argv[1]}/rank-{rank}.npz", **found)
