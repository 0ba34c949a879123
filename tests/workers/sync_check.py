"""Run under mpirun/horovodrun: trains a small Keras model with hvd.DistributedOptimizer and the
BroadcastGlobalVariables, MetricAverage and LearningRateWarmup callbacks, each rank on its own
data and with its own initial weights, and writes what each rank ended with to OUT_DIR."""
import json
import os
import sys

from app.horovod import hvd, keras  # noqa: I001  (sets TF_XLA_FLAGS first)

import numpy as np

from app import optimizers

out_dir = sys.argv[1]
hvd.init()
keras.utils.set_random_seed(100 + hvd.rank())  # different initial weights on each rank

rng = np.random.default_rng(hvd.rank())  # different data on each rank
features = rng.normal(size=(256, 8)).astype("float32")
labels = (features[:, 0] + hvd.rank() * features[:, 1] > 0).astype("int64")

model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(2, activation="softmax")])
learning_rate = 0.05 * hvd.size()
model.compile(hvd.DistributedOptimizer(optimizers.build("momentum", learning_rate, 0.9)),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(
    features, labels, batch_size=32, epochs=3, shuffle=False, verbose=0,
    callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
               hvd.callbacks.MetricAverageCallback(),
               hvd.callbacks.LearningRateWarmupCallback(initial_lr=learning_rate,
                                                        warmup_epochs=2, steps_per_epoch=8)])
local_loss, _ = model.evaluate(features, labels, verbose=0)  # on this rank's data only

np.savez(os.path.join(out_dir, f"weights-{hvd.rank()}.npz"), *model.get_weights())
with open(os.path.join(out_dir, f"metrics-{hvd.rank()}.json"), "w") as f:
    json.dump({"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
               "local_loss": float(local_loss), "size": hvd.size()}, f)
