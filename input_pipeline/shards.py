"""TFRecord shards as this project writes them: records serialized deterministically (the
same bytes in every run), written to SPLIT-00000-of-0000N files; image data sets as records
in the standard ImageNet layout. What the to_tfrecord command and input_pipeline.volumes
write with."""
import os

import tensorflow as tf

ENCODERS = {"png": tf.io.encode_png, "jpeg": lambda image: tf.io.encode_jpeg(image, quality=90)}


def write_split(source, split, output_dir, num_shards, encoding="png"):
    """Writes `source` to `num_shards` files, consecutive examples in each, each image
    encoded as `encoding` (png or jpeg); returns the paths."""
    encode = ENCODERS[encoding]
    examples = source.all_records().map(source.decode).as_numpy_iterator()

    def records():
        for image, label in examples:
            uint8 = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
            yield image_record(encode(uint8).numpy(), int(label) + 1, image.shape)
    return write_shards(records(), source.num_examples, split, output_dir, num_shards)


def write_shards(records, count, split, output_dir, num_shards, interleave=False):
    """Writes `count` serialized records to `num_shards` files of `split`: consecutive
    records in each, or dealt out in turn (`interleave`: each shard then holds every
    class of a list sorted by class); returns the paths."""
    paths = [os.path.join(output_dir, f"{split}-{shard:05d}-of-{num_shards:05d}")
             for shard in range(num_shards)]
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    for index, record in enumerate(records):
        shard = index % num_shards if interleave else index * num_shards // count
        writers[shard].write(record)
    for writer in writers:
        writer.close()
    return paths


def image_record(encoded, label, shape):
    """The record of an `encoded` image (PNG or JPEG bytes) of `shape` with its 1-based
    `label`: `image/encoded`, `image/class/label`, `image/height`, `image/width` and
    `image/channels`, as ImageNet's shards hold them."""
    return serialized({"image/encoded": bytes_feature(encoded),
                       "image/class/label": int64_feature([label]),
                       "image/height": int64_feature([shape[0]]),
                       "image/width": int64_feature([shape[1]]),
                       "image/channels": int64_feature([shape[2]])})


def serialized(features):
    """A tf.train.Example of `features` ({name: tf.train.Feature}), serialized."""
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString(deterministic=True)  # the same bytes in every run


def bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def int64_feature(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
