"""The same experiment without Horovod, to compare throughput against: plain Keras on one
process, or tf.distribute.MultiWorkerMirroredStrategy on several when TF_CONFIG names a
cluster (app.studies.throughput_scaling starts those workers). Same flags, model, pipeline and
throughput measurement as `app.train --benchmark`; writes MODEL_DIR/reference-RANK.json.

    python -m app.studies.keras_reference --flagfile=configs/digits_cnn.cfg --model_dir=/tmp/ref
"""
import json
import os

from app.horovod import keras, tf  # first: it sets TF_XLA_FLAGS (Horovod is not started)

from absl import app

import input_pipeline
import models
from app import arithmetic, callbacks, devices, optimizers
from app import flags as app_flags

FLAGS = app_flags.FLAGS


def main(_):
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
    if FLAGS.mixed_precision:  # as app.train computes
        keras.mixed_precision.set_global_policy(f"mixed_{FLAGS.mixed_precision}")
    dataset = input_pipeline.training_dataset(
        source, rank=rank, size=size, batch_size=batch, steps_per_epoch=steps_per_epoch,
        seed=FLAGS.seed, shuffle_buffer=FLAGS.shuffle_buffer, cache=FLAGS.cache)
    # Each worker feeds its own shard at the per-worker batch, as each Horovod rank does.
    data = strategy.distribute_datasets_from_function(lambda _: dataset) if cluster else dataset

    with strategy.scope():
        model = models.build(FLAGS.model, source.feature_shape, source.num_outputs,
                             input_scaling=source.input_scaling)
        optimizer = optimizers.loss_scaled(
            optimizers.build(FLAGS.optimizer, app_flags.scaled_learning_rate(global_batch),
                             FLAGS.momentum), FLAGS.mixed_precision)
        models.compile_for_task(model, optimizer, source.task, FLAGS.steps_per_execution,
                                FLAGS.segmentation_loss)
    throughput = callbacks.Throughput(batch, size, FLAGS.warmup_steps)
    model.fit(data, steps_per_epoch=steps_per_epoch, epochs=FLAGS.epochs, verbose=0,
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
