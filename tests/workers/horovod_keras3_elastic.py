"""Run by horovodrun's elastic mode on 2 workers, on Keras 3 (no TF_USE_LEGACY_KERAS): trains a
small float64 model with Horovod's elastic Keras API, committing every BATCHES_PER_COMMIT steps
and at each epoch's end. The worker of rank 1 kills itself (SIGKILL) before global step
KILL_STEP; the other rolls back to its last commit and trains alone to EPOCHS.

    python horovod_keras3_elastic.py OUT_DIR EPOCHS BATCHES_PER_COMMIT KILL_STEP

Reads OUT_DIR/data.npz: x and y, [step of an epoch, row of the global batch, feature], the same
global batches every epoch, each worker taking its share of the rows; w0..w3, rank 0's initial
weights; learning_rate and momentum, SGD's. The killed worker writes OUT_DIR/killed.json first;
rank 0 writes OUT_DIR/result.json at the end; tests/test_horovod_keras3.py judges them."""
import json
import os
import signal
import sys

import numpy as np

assert os.environ.get("TF_USE_LEGACY_KERAS") in (None, "", "0")

import keras  # noqa: E402

import horovod.tensorflow.keras as hvd  # noqa: E402

assert keras.__version__.startswith("3.")

OUT_DIR = sys.argv[1]
EPOCHS, BATCHES_PER_COMMIT, KILL_STEP = (int(arg) for arg in sys.argv[2:5])
keras.config.set_floatx("float64")
hvd.init()
data = np.load(os.path.join(OUT_DIR, "data.npz"))
X, Y = data["x"], data["y"]
STEPS, GLOBAL_BATCH = X.shape[:2]

keras.utils.set_random_seed(hvd.rank())  # rank 1 starts elsewhere: the first sync must fix it
model = keras.Sequential([keras.Input((X.shape[2],)), keras.layers.Dense(4, activation="tanh"),
                          keras.layers.Dense(1)])
if hvd.rank() == 0:
    model.set_weights([data[f"w{i}"] for i in range(4)])
optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(float(data["learning_rate"]),
                                                          momentum=float(data["momentum"])))
model.compile(optimizer=optimizer, loss="mse")
state = hvd.elastic.KerasState(model, optimizer=optimizer, batch=0, epoch=0)
starts = []  # each start of train(): the world and the state it starts from
step_sizes = {}  # global step: the world size that (last) trained it


def global_step():
    """Steps trained, from the optimizer's count: the state commits and restores it with the
    weights."""
    return int(optimizer.iterations.numpy())


class KillBeforeStep(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if global_step() == KILL_STEP:
            with open(os.path.join(OUT_DIR, "killed.json"), "w") as out:
                json.dump({"rank": hvd.rank(), "step": KILL_STEP}, out)
            os.kill(os.getpid(), signal.SIGKILL)


class RecordWorldSize(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        step_sizes[global_step() - 1] = hvd.size()


def rows(first_batch):
    """This worker's share of the rows of the epoch's batches from `first_batch` on, and its
    batch size: the global batch stays GLOBAL_BATCH whatever the world size."""
    share = GLOBAL_BATCH // hvd.size()
    mine = slice(hvd.rank() * share, (hvd.rank() + 1) * share)
    return (X[first_batch:, mine].reshape(-1, X.shape[2]),
            Y[first_batch:, mine].reshape(-1, Y.shape[2]), share)


@hvd.elastic.run
def train(state):
    step = global_step()
    starts.append({"size": hvd.size(), "rank": hvd.rank(), "step": step,
                   "epoch": state.epoch, "batch": state.batch})
    # The commit last: it saves the batch and epoch the others have just set.
    callbacks = [RecordWorldSize(), hvd.elastic.UpdateBatchStateCallback(state),
                 hvd.elastic.UpdateEpochStateCallback(state),
                 hvd.elastic.CommitStateCallback(state, batches_per_commit=BATCHES_PER_COMMIT)]
    if hvd.rank() == 1 and len(starts) == 1:  # in the first world only
        callbacks.insert(0, KillBeforeStep())
    # Keras 3 cannot start an epoch at a batch (UpdateBatchStateCallback's shorter
    # params['steps'] is not read), so the rest of the epoch a commit fell in is its own fit,
    # whose batches state.batch counts from 0: the position is taken from the step count.
    if step % STEPS:
        x, y, batch_size = rows(step % STEPS)
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
                  callbacks=callbacks)
    if state.epoch < EPOCHS:
        x, y, batch_size = rows(0)
        model.fit(x, y, batch_size=batch_size, epochs=EPOCHS - state.epoch, shuffle=False,
                  verbose=0, callbacks=callbacks)


train(state)
if hvd.rank() == 0:
    with open(os.path.join(OUT_DIR, "result.json"), "w") as out:
        json.dump({"starts": starts, "step": global_step(), "epoch": state.epoch,
                   "step_sizes": [step_sizes[step] for step in sorted(step_sizes)],
                   "weights": [weights.tolist() for weights in model.get_weights()]}, out)
