"""Run under mpirun -np 2 on Keras 3 (no TF_USE_LEGACY_KERAS): Horovod's Keras layer on Keras 3
models in float64, each case against the same computation on one process, which every rank
also does on the whole batch (both ranks' halves). Writes {case: findings} to
OUT_DIR/rank-R.json; tests/test_horovod_keras3.py judges them."""
import json
import os
import sys

import numpy as np

assert os.environ.get("TF_USE_LEGACY_KERAS") in (None, "", "0")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import horovod.tensorflow as hvd_tensorflow  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402

assert keras.__version__.startswith("3.") and tf.keras.__version__ == keras.__version__

keras.backend.set_floatx("float64")
OWN_PROCESS_SETS = [hvd.ProcessSet([0]), hvd.ProcessSet([1])]  # each rank alone
hvd.init(process_sets=OWN_PROCESS_SETS)
RANK, SIZE = hvd.rank(), hvd.size()
STEPS, BATCH = 4, 6  # per rank: BATCH rows a step
rng = np.random.default_rng(7)
X = rng.normal(size=(SIZE, STEPS, BATCH, 5))  # [rank, step, row, feature]
Y = rng.normal(size=(SIZE, STEPS, BATCH, 3))
TOKENS = rng.integers(0, 10, size=(SIZE, STEPS, BATCH, 2))
found = {}


def model_of(seed, embedding=False):
    """Two Dense layers (whose variables share their names: kernel, bias), or an Embedding
    (sparse gradients) under a Dense."""
    keras.utils.set_random_seed(seed)
    if embedding:
        layers = [keras.Input((2,), dtype="int32"), keras.layers.Embedding(10, 4),
                  keras.layers.Flatten(), keras.layers.Dense(3)]
    else:
        layers = [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                  keras.layers.Dense(3)]
    return keras.Sequential(layers)


def batches(ranks, embedding=False):
    """Each step's rows of `ranks`, stacked (the whole batch on one process)."""
    inputs = TOKENS if embedding else X
    return [(np.concatenate([inputs[r, s] for r in ranks]),
             np.concatenate([Y[r, s] for r in ranks])) for s in range(STEPS)]


def reference(optimizer, ranks=range(SIZE), embedding=False, seed=0, grad_scale=1.0,
              dense=False, slots=None):
    """The weights after STEPS steps on one process over the rows of `ranks`, gradients of the
    mean loss times grad_scale (made dense tensors with `dense`: the optimizers update their
    slots of an embedding's rows that have no gradient only then), from optimizer variables
    all `slots` if given."""
    model = model_of(seed, embedding)
    if slots is not None:
        set_slots(optimizer, model, slots)
    loss = keras.losses.MeanSquaredError()
    for x, y in batches(ranks, embedding):
        with tf.GradientTape() as tape:
            value = loss(y, model(x)) * grad_scale
        grads = tape.gradient(value, model.trainable_variables)
        if dense:
            grads = [tf.convert_to_tensor(grad) for grad in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return model


def distance(model, expected):
    return max(float(np.max(np.abs(a - b)))
               for a, b in zip(model.get_weights(), expected.get_weights()))


def fit(optimizer, embedding=False, seed=0, callbacks=(), steps=STEPS, epochs=1):
    model = model_of(seed, embedding)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = (np.concatenate(part) for part in zip(*batches([RANK], embedding)[:steps]))
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


def custom_loop(optimizer, embedding=False):
    """A tf.function step with apply_gradients, as a custom training loop writes it."""
    model = model_of(0, embedding)
    loss = keras.losses.MeanSquaredError()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x))
        optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables),
                                      model.trainable_variables))
    for x, y in batches([RANK], embedding):
        step(x, y)
    return model


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "lion": lambda: keras.optimizers.Lion(0.01),
}


def optimizers_in_fit_and_custom_loop():
    for name, make in OPTIMIZERS.items():
        expected = reference(make())
        found[f"fit_{name}"] = distance(fit(hvd.DistributedOptimizer(make())), expected)
        found[f"loop_{name}"] = distance(custom_loop(hvd.DistributedOptimizer(make())),
                                         expected)


def options():
    adam = OPTIMIZERS["adam"]
    expected = reference(adam())
    model = model_of(0)
    dense1, dense2 = (layer.trainable_variables for layer in model.layers)
    for case, kwargs in {"num_groups": dict(num_groups=2), "groups_int": dict(groups=2),
                         "predivide": dict(gradient_predivide_factor=2.0)}.items():
        found[case] = distance(fit(hvd.DistributedOptimizer(adam(), **kwargs)), expected)
    # groups of variables: the model's own (the weights trained are the same numbers)
    optimizer = hvd.DistributedOptimizer(adam(), groups=[[dense1[0], dense2[0]], [dense1[1]]])
    model.compile(optimizer=optimizer, loss="mse")
    x, y = (np.concatenate(part) for part in zip(*batches([RANK])))
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    found["groups_variables"] = distance(model, expected)
    found["sum"] = distance(fit(hvd.DistributedOptimizer(adam(), op=hvd.Sum)),
                            reference(adam(), grad_scale=SIZE))
    found["process_set"] = distance(
        fit(hvd.DistributedOptimizer(adam(), process_set=OWN_PROCESS_SETS[RANK])),
        reference(adam(), ranks=[RANK]))
    for sparse_as_dense in (False, True):
        found[f"embedding_sparse_as_dense_{sparse_as_dense}"] = distance(
            fit(hvd.DistributedOptimizer(adam(), sparse_as_dense=sparse_as_dense),
                embedding=True),
            reference(adam(), embedding=True, dense=sparse_as_dense))
    for average in (True, False):
        distributed = hvd.DistributedOptimizer(adam(), backward_passes_per_step=2,
                                               average_aggregated_gradients=average)
        # Keras 3's own accumulation averages the k gradients; their sum is k times that
        one = keras.optimizers.Adam(0.01, gradient_accumulation_steps=2)
        found[f"backward_passes_average_{average}"] = distance(
            fit(distributed), reference(one, grad_scale=1.0 if average else 2.0))
        found[f"backward_passes_average_{average}_iterations"] = [
            int(distributed.iterations.numpy()), int(one.iterations.numpy())]


def loss_scaling():
    expected = reference(keras.optimizers.SGD(0.1, momentum=0.9))
    outside = hvd.DistributedOptimizer(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)))
    found["loss_scale_distributed_outside"] = distance(fit(outside), expected)
    inside = keras.optimizers.LossScaleOptimizer(
        hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)))
    found["loss_scale_distributed_inside"] = distance(fit(inside), expected)
    # An overflow on rank 1 only: the reduced gradients overflow on both, both skip the step.
    optimizer = hvd.DistributedOptimizer(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    weight = keras.Variable(np.ones(2))
    gradient = np.array([1.0, np.inf if RANK == 1 else 1.0])
    optimizer.apply_gradients([(tf.constant(gradient), weight)])
    found["overflow_on_one_rank"] = {"weight": weight.numpy().tolist(),
                                     "scale": float(optimizer.dynamic_scale.numpy())}


def set_slots(optimizer, model, value):
    optimizer.build(model.trainable_variables)
    for variable in optimizer.variables:  # slots as if restored from another step
        variable.assign(np.full(variable.shape, value, variable.dtype))


def broadcast():
    """Different initial weights and optimizer slots on each rank become rank 0's."""
    model = model_of(seed=RANK)
    optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(0.01))
    model.compile(optimizer=optimizer, loss="mse")
    set_slots(optimizer, model, RANK + 2)
    x, y = (np.concatenate(part) for part in zip(*batches([RANK])))
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    one = keras.optimizers.Adam(0.01)
    expected = reference(one, seed=0, slots=2)
    found["broadcast_weights"] = distance(model, expected)
    found["broadcast_slots"] = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                                   for a, b in zip(optimizer.variables, one.variables))


class Recorder(keras.callbacks.Callback):
    """The learning rate each step runs with, and the logs each epoch ends with."""

    def __init__(self):
        super().__init__()
        self.steps, self.epochs = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.steps.append(float(self.model.optimizer.learning_rate.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({name: float(value) for name, value in logs.items()})


def learning_rate_callbacks():
    warmup, schedule = Recorder(), Recorder()
    sgd = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))
    trained = fit(sgd, steps=2, epochs=3, callbacks=[
        hvd.callbacks.LearningRateWarmupCallback(0.1, warmup_epochs=2, verbose=0), warmup])
    found["warmup_steps"] = warmup.steps
    # Inside float16's LossScaleOptimizer the momentum is its inner optimizer's: the same
    # correction (the scale, a power of 2, is exact in float64).
    scaled = fit(hvd.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9))), steps=2, epochs=3, callbacks=[
        hvd.callbacks.LearningRateWarmupCallback(0.1, warmup_epochs=2, verbose=0)])
    found["warmup_loss_scaled"] = distance(scaled, trained)
    fit(hvd.DistributedOptimizer(keras.optimizers.Adam(0.1)), steps=2, epochs=3, callbacks=[
        hvd.callbacks.LearningRateScheduleCallback(0.1, multiplier=0.5, start_epoch=1),
        schedule])
    found["schedule_steps"] = schedule.steps
    # The momentum correction reaches the update: one process with the recorded learning
    # rates and Horovod's tf_keras correction, momentum times new / old learning rate for the
    # steps of the warmup (epochs 0 and 1, 2 steps each).
    expected = model_of(0)
    loss = keras.losses.MeanSquaredError()
    old_lr = [0.1] + warmup.steps
    momenta = [np.zeros(variable.shape) for variable in expected.trainable_variables]
    keras_momentum = float(np.float32(0.9))  # Keras 3 casts the number to a float32 tensor first
    for step, (x, y) in enumerate(batches(range(SIZE))[:2] * 3):
        epoch = step / 2 + 1 / 2  # Horovod's warmup formula: the end of this step's epoch
        new_lr = 0.1 / SIZE * (epoch * (SIZE - 1) / 2 + 1)
        momentum = keras_momentum * new_lr / old_lr[step] if step < 4 else keras_momentum
        with tf.GradientTape() as tape:
            value = loss(y, expected(x))
        grads = tape.gradient(value, expected.trainable_variables)
        for variable, velocity, grad in zip(expected.trainable_variables, momenta, grads):
            velocity[...] = momentum * velocity - warmup.steps[step] * grad.numpy()
            variable.assign(variable.numpy() + velocity)  # Keras' SGD with momentum
    found["warmup_weights"] = distance(trained, expected)
    # From a learning rate of 0 there is no ratio to correct the momentum by: the first epoch
    # leaves everything as it was, the next two train as two epochs at 0.1 do.
    from_zero = fit(hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), steps=2,
                    epochs=3, callbacks=[hvd.callbacks.LearningRateScheduleCallback(
                        0.1, multiplier=lambda epoch: min(epoch, 1))])
    found["from_zero_lr"] = distance(from_zero, fit(hvd.DistributedOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9)), steps=2, epochs=2))
    try:
        fit(hvd.DistributedOptimizer(keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))), steps=1,
            callbacks=[hvd.callbacks.LearningRateWarmupCallback(0.1)])
        found["schedule_object_refused"] = None
    except ValueError as error:
        found["schedule_object_refused"] = str(error)


def metric_average():
    recorder = Recorder()
    fit(hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), steps=1,
        callbacks=[hvd.callbacks.MetricAverageCallback(), recorder])
    initial = model_of(0)
    losses = [float(np.mean((initial(X[r, 0]).numpy() - Y[r, 0]) ** 2)) for r in range(SIZE)]
    found["metric_average"] = {"logged": recorder.epochs[0]["loss"], "losses": losses}


def load_model():
    """A model saved (.keras) after 2 steps of Adam on one process, loaded by hvd.load_model on
    each rank, trains 2 more steps on each rank's half as the loaded model on one process."""
    path = f"{sys.argv[1]}/model.keras"
    whole = batches(range(SIZE))
    saved = model_of(0)  # on every rank: Keras names the next models alike on each
    saved.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    for x, y in whole[:2]:
        saved.train_on_batch(x, y)
    if RANK == 0:
        saved.save(path)
    hvd.allreduce(tf.constant(0.0), name="saved")  # the file is there for every rank
    model = hvd.load_model(path)
    expected = keras.models.load_model(path)
    for (x, y), (x_rank, y_rank) in zip(whole[2:], batches([RANK])[2:]):
        model.train_on_batch(x_rank, y_rank)
        expected.train_on_batch(x, y)
    found["load_model"] = distance(model, expected)
    found["load_model_optimizer"] = [type(model.optimizer).__name__,
                                     int(model.optimizer.iterations.numpy())]


def sync_batch_norm():
    """hvd.SyncBatchNormalization on each rank's half as BatchNormalization on the whole
    batches (the weights and the moving statistics)."""
    def with_normalization(layer):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), layer,
                                 keras.layers.Dense(3)])
    model = with_normalization(hvd_tensorflow.SyncBatchNormalization())
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    expected = with_normalization(keras.layers.BatchNormalization())
    expected.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    for (x, y), (x_rank, y_rank) in zip(batches(range(SIZE)), batches([RANK])):
        model.train_on_batch(x_rank, y_rank)
        expected.train_on_batch(x, y)
    found["sync_batch_norm"] = distance(model, expected)


def elastic_state():
    """hvd.elastic.KerasState: sync() gives every rank rank 0's weights and builds the Keras 3
    optimizer's variables; restore() after 2 steps returns to the saved weights and slots."""
    model = model_of(seed=RANK)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)
    state.sync()
    found["elastic_sync"] = distance(model, model_of(seed=0))
    saved = [variable.numpy() for variable in model.optimizer.variables]
    found["elastic_optimizer_variables"] = len(saved)
    for x, y in batches([RANK])[:2]:
        model.train_on_batch(x, y)
    state.restore()
    found["elastic_restore"] = [distance(model, model_of(seed=0)), max(
        float(np.max(np.abs(variable.numpy() - value)))
        for variable, value in zip(model.optimizer.variables, saved))]


def best_model_checkpoint():
    """Rank 0's BestModelCheckpoint (its path set afterwards, as horovod.spark sets it) keeps
    the epoch of least validation loss: trained towards Y, validated against -Y, an early one.
    The file loads without Horovod."""
    path = f"{sys.argv[1]}/best.keras"
    recorder, weights = Recorder(), []
    snapshot = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights.append(recorder.model.get_weights()))
    callbacks = [recorder, snapshot]
    if RANK == 0:
        best = hvd.callbacks.BestModelCheckpoint(monitor="val_loss")
        best.filepath = path
        callbacks.append(best)
    model = model_of(0)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    x, y = (np.concatenate(part) for part in zip(*batches([RANK])))
    model.fit(x, y, batch_size=BATCH, epochs=4, validation_data=(x, -y), shuffle=False,
              verbose=0, callbacks=callbacks)
    hvd.allreduce(tf.constant(0.0), name="best_saved")  # the file is there for every rank
    val_losses = [epoch["val_loss"] for epoch in recorder.epochs]
    best_epoch = int(np.argmin(val_losses))
    saved = keras.models.load_model(path)
    found["best_model_checkpoint"] = hvd_tensorflow.broadcast_object({
        "val_losses": val_losses, "best_epoch": best_epoch,
        "distance": max(float(np.max(np.abs(a - b)))
                        for a, b in zip(saved.get_weights(), weights[best_epoch]))}, 0)


def bfloat16():
    """Under mixed_bfloat16 each rank's float32 gradient of its half is averaged: the weights
    of one process applying the mean of the halves' gradients, each computed as fit does."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = model_of(0)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    x, y = (np.concatenate(part) for part in zip(*batches([RANK])))
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    expected = model_of(0)
    expected.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")

    @tf.function
    def gradient(x, y):
        with tf.GradientTape() as tape:
            value = expected.compute_loss(x=x, y=y, y_pred=expected(x, training=True))
        return tape.gradient(value, expected.trainable_variables)
    for halves in zip(*(batches([rank]) for rank in range(SIZE))):
        grads = [gradient(tf.constant(x), tf.constant(y)) for x, y in halves]
        expected.optimizer.apply_gradients(zip([sum(parts) / SIZE for parts in zip(*grads)],
                                               expected.trainable_variables))
    keras.config.set_dtype_policy("float64")
    found["bfloat16_dtypes"] = [model.layers[0].kernel.dtype, model.layers[0].compute_dtype]
    found["bfloat16"] = distance(model, expected)


def collectives():
    """Horovod's collectives on a Keras 3 variable holding rank + 1 (and on Python objects)."""
    variable = keras.Variable(np.full(3, RANK + 1.0))
    results = {"allreduce": hvd.allreduce(variable), "allgather": hvd.allgather(variable),
               "broadcast": hvd.broadcast(variable, 1),
               "reducescatter": hvd_tensorflow.allgather_object(
                   hvd.reducescatter(keras.Variable(np.arange(4.0) * (RANK + 1))).numpy())}
    hvd_tensorflow.broadcast_variables([variable], 1)
    results["broadcast_variables"] = variable
    found["collectives"] = {name: np.asarray(value).tolist() for name, value in results.items()}
    received = hvd_tensorflow.broadcast_object(
        {"rank": RANK, "value": keras.Variable(np.full(2, float(RANK)))}, 1)
    found["collectives"]["broadcast_object"] = received["value"].numpy().tolist()


by_case = {}
for case in sys.argv[2].split(","):
    found = {}  # each case's findings apart
    globals()[case]()
    by_case[case] = found
with open(f"{sys.argv[1]}/rank-{RANK}.json", "w") as out:
    json.dump(by_case, out)
