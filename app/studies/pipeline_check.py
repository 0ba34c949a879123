"""Is the input pipeline ever the bottleneck? Measures, in one run:

1. the training pipeline of an experiment alone (no model), with the threads one process
   gets, against the images/s that `app.train --benchmark` consumes with the same flags;
2. the same split written as TFRecord shards: reading the records, reading and decoding them
   (the imagenet pipeline), and reading the same files' bytes whole, without TFRecord.

    python -m app.studies.pipeline_check --flagfile=configs/digits_cnn.cfg --steps_per_epoch=200

Prints each rate and the ratios; writes pipeline_check.json to --model_dir.
"""
import json
import os
import sys
import time

from app.horovod import tf  # first: it sets TF_XLA_FLAGS

from absl import app

import input_pipeline
from app import arithmetic, devices
from app import flags as app_flags
from app.studies import harness
from input_pipeline.shards import write_split

FLAGS = app_flags.FLAGS


def images_per_sec(dataset, batches, batch_size, warmup=5):
    """Rate at which `dataset` yields `batches` batches, after `warmup` batches."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def bytes_per_sec(dataset):
    """Rate at which `dataset` of strings yields bytes, read once to the end."""
    started = time.perf_counter()
    total = dataset.reduce(tf.constant(0, tf.int64),
                           lambda count, item: count + tf.cast(tf.strings.length(item), tf.int64))
    return int(total) / (time.perf_counter() - started)


def training_consumes(steps):
    """images/s of `app.train --benchmark` on one process with the same flags."""
    return harness.run_benchmark(
        os.path.join(FLAGS.model_dir, "train_benchmark"), 1,
        [*sys.argv[1:], "--epochs=1", "--warmup_epochs=0", f"--steps_per_epoch={steps}"],
        launch_args=[])["images_per_sec"]


def main(_):
    threads = devices.cpu_threads(1, FLAGS.threads_per_process)
    devices.set_cpu_threads(threads)
    batch, _ = arithmetic.batch_sizes(app_flags.batch_request(), 1)
    steps = FLAGS.steps_per_epoch or 200
    source = input_pipeline.load(FLAGS.dataset, "train", **app_flags.load_options())
    pipeline = input_pipeline.training_dataset(
        source, rank=0, size=1, batch_size=batch, steps_per_epoch=steps, seed=FLAGS.seed,
        shuffle_buffer=FLAGS.shuffle_buffer, cache=FLAGS.cache, threads=threads)
    found = {"pipeline_images_per_sec": images_per_sec(pipeline, steps, batch),
             "training_images_per_sec": training_consumes(steps)}
    found["pipeline_over_training"] = (found["pipeline_images_per_sec"]
                                       / found["training_images_per_sec"])

    shards = os.path.join(FLAGS.model_dir, "tfrecords")
    os.makedirs(shards, exist_ok=True)
    files = write_split(source, "train", shards, num_shards=4)
    tfrecords = input_pipeline.sources.tfrecord_images(
        "train", shards, source.feature_shape[0], channels=source.feature_shape[-1],
        num_outputs=source.num_outputs, num_examples=source.num_examples)
    decoded = input_pipeline.training_dataset(
        tfrecords, rank=0, size=1, batch_size=batch, steps_per_epoch=steps, seed=FLAGS.seed,
        threads=threads)
    found.update({
        "tfrecord_decoded_images_per_sec": images_per_sec(decoded, steps, batch),
        "tfrecord_read_bytes_per_sec": bytes_per_sec(tf.data.TFRecordDataset(files)),
        "raw_file_read_bytes_per_sec": bytes_per_sec(
            tf.data.Dataset.from_tensor_slices(files).map(tf.io.read_file)),
    })
    found["tfrecord_over_raw_read"] = (found["tfrecord_read_bytes_per_sec"]
                                       / found["raw_file_read_bytes_per_sec"])
    with open(os.path.join(FLAGS.model_dir, "pipeline_check.json"), "w") as out:
        json.dump(found, out, indent=2)
    for name, value in found.items():
        print(f"{name}: {value:,.2f}")


def run():
    app_flags.define_training_flags()
    app.run(main, flags_parser=app_flags.parse)


if __name__ == "__main__":
    run()
