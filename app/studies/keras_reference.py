"""The same experiment without Horovod, to compare throughput against: plain Keras on one
process, or tf.distribute.MultiWorkerMirroredStrategy on several when TF_CONFIG names a
cluster (app.studies.throughput_scaling starts those workers). Same flags, model, pipeline and
throughput measurement as `app.train --benchmark`; writes MODEL_DIR/reference-RANK.json.

    python -m app.studies.keras_reference --flagfile=configs/digits_cnn.cfg --model_dir=/tmp/ref
"""
import itertools
import json
import os

from app.horovod import keras, tf  # first: it sets TF_XLA_FLAGS (Horovod is not started)

from absl import app

import input_pipeline
import models
from app import arithmetic, callbacks, cli, devices, optimizers, precision, tasks
from app import flags as app_flags

FLAGS = app_flags.FLAGS


def fit_on_workers(model, strategy, dataset, steps_per_epoch, throughput):
    """fit() under MultiWorkerMirroredStrategy: Keras 3's fit() and train_on_batch() fail
    under it (keras-team/keras#20585; they average the scalar logs along an axis), so this
    loop runs Keras' own train_step through strategy.run, its gradients all-reduced by the
    optimizer, and leaves each worker its own logs. Each worker feeds its own shard at the
    per-worker batch, as each Horovod rank does."""
    batches = iter(dataset)
    first = next(batches)
    features, labels = first
    with strategy.scope():  # the loss, metrics and slots are built here, not in the step
        predictions = model(features)
        model.compute_loss(features, labels, predictions)
        model.compute_metrics(features, labels, predictions)
        model.optimizer.build(model.trainable_variables)
    step = tf.function(lambda batch: strategy.run(model.train_step, args=(batch,)))
    batches = itertools.chain([first], batches)  # the first batch is trained on too
    hooks = keras.callbacks.CallbackList([throughput], model=model)
    hooks.on_train_begin()
    for epoch in range(FLAGS.epochs):
        hooks.on_epoch_begin(epoch)
        for index in range(steps_per_epoch):
            step(next(batches))
            hooks.on_train_batch_end(index)
        hooks.on_epoch_end(epoch, {})
    hooks.on_train_end()


def main(_):
    if optimizers.preconditions(FLAGS.optimizer):
        cli.fail(f"--optimizer={FLAGS.optimizer}: the reference runs take first-order "
                 f"optimizers only")
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}"))
    size = len(cluster["cluster"]["worker"]) if cluster else 1
    rank = cluster["task"]["index"] if cluster else 0
    devices.set_cpu_threads(devices.cpu_threads(size, FLAGS.threads_per_process))
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if cluster
                else tf.distribute.get_strategy())

    request = app_flags.batch_request()
    batch, global_batch = arithmetic.batch_sizes(request, size)
    source = input_pipeline.load(FLAGS.dataset, "train", **app_flags.load_options())
    steps_per_epoch = arithmetic.steps_per_epoch(request, source.num_examples, global_batch,
                                                 FLAGS.steps_per_epoch)
    keras.utils.set_random_seed(FLAGS.seed)
    # as app.train computes (each worker looks at its own processor)
    precision.apply(precision.choose(FLAGS.mixed_precision, FLAGS.float64,
                                     [precision.this_process()]))
    dataset = input_pipeline.training_dataset(
        source, rank=rank, size=size, batch_size=batch, steps_per_epoch=steps_per_epoch,
        seed=FLAGS.seed, shuffle_buffer=FLAGS.shuffle_buffer, cache=FLAGS.cache)
    with strategy.scope():
        model = models.build(FLAGS.model, source.feature_shape, source.num_outputs,
                             input_scaling=source.input_scaling)
        optimizer = optimizers.loss_scaled(
            optimizers.build(FLAGS.optimizer, app_flags.scaled_learning_rate(global_batch),
                             FLAGS.momentum), FLAGS.mixed_precision)
        tasks.compile_for(model, optimizer, source.task, source.num_outputs,
                          tasks.LossOptions(FLAGS.segmentation_loss), FLAGS.steps_per_execution)
    throughput = callbacks.Throughput(batch, size, FLAGS.warmup_steps)
    if cluster:
        fit_on_workers(model, strategy, dataset, steps_per_epoch, throughput)
    else:
        model.fit(dataset, steps_per_epoch=steps_per_epoch, epochs=FLAGS.epochs, verbose=0,
                  callbacks=[throughput])

    os.makedirs(FLAGS.model_dir, exist_ok=True)
    with open(os.path.join(FLAGS.model_dir, f"reference-{rank}.json"), "w") as out:
        json.dump({"strategy": "multi_worker_mirrored" if cluster else "none", "rank": rank,
                   "world_size": size, "images_per_sec": throughput.images_per_sec(),
                   "precision": keras.mixed_precision.global_policy().name,
                   "cpu_seconds_per_image": throughput.cpu_seconds_per_image(),
                   "window_rates": throughput.window_rates().tolist()}, out)


if __name__ == "__main__":
    app_flags.define_training_flags()
    app.run(main, flags_parser=app_flags.parse)
