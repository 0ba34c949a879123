"""Writes a split of any image data set this project reads to sharded TFRecord files in the
standard ImageNet layout, which `--dataset=imagenet --data_dir=OUTPUT_DIR` then reads:

    python -m input_pipeline.to_tfrecord --dataset=digits --output_dir=/tmp/digits_tfr \
        --num_shards=4

Each record holds `image/encoded` (PNG, or JPEG as ImageNet's are), `image/class/label`
(1-based, as in ImageNet),
`image/height`, `image/width` and `image/channels`; split S goes to S-00000-of-0000N ...
"""
import os

import tensorflow as tf
from absl import app, flags

import input_pipeline

FLAGS = flags.FLAGS


def write_split(source, split, output_dir, num_shards, encoding="png"):
    """Writes `source` to `num_shards` files, consecutive examples in each, each image
    encoded as `encoding` (png or jpeg); returns the paths."""
    encode = {"png": tf.io.encode_png,
              "jpeg": lambda image: tf.io.encode_jpeg(image, quality=90)}[encoding]
    paths = [os.path.join(output_dir, f"{split}-{shard:05d}-of-{num_shards:05d}")
             for shard in range(num_shards)]
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    examples = source.all_records().map(source.decode)
    for index, (image, label) in enumerate(examples.as_numpy_iterator()):
        encoded = encode(tf.image.convert_image_dtype(image, tf.uint8, saturate=True))
        features = {
            "image/encoded": _bytes(encoded.numpy()),
            "image/class/label": _int(int(label) + 1),
            "image/height": _int(image.shape[0]),
            "image/width": _int(image.shape[1]),
            "image/channels": _int(image.shape[2]),
        }
        record = tf.train.Example(features=tf.train.Features(feature=features))
        writers[index * num_shards // source.num_examples].write(record.SerializeToString())
    for writer in writers:
        writer.close()
    return paths


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def main(_):
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    for split in FLAGS.split:
        source = input_pipeline.load(FLAGS.dataset, split, data_dir=FLAGS.data_dir,
                                     image_size=FLAGS.image_size)
        paths = write_split(source, split, FLAGS.output_dir, FLAGS.num_shards, FLAGS.encoding)
        print(f"{source.num_examples} {split} examples -> {len(paths)} files in "
              f"{FLAGS.output_dir}")


def run():
    """The command line; its flags are defined here, not on import, so that importing
    write_split beside app.train's flags defines nothing twice."""
    flags.DEFINE_enum("dataset", "digits",
                      [d for d in input_pipeline.DATASETS if d != "linear"],
                      "Image data set to convert.")
    flags.DEFINE_multi_enum("split", list(input_pipeline.SPLITS), input_pipeline.SPLITS,
                            "Splits to write.")
    flags.DEFINE_string("data_dir", None, "Where the data set is prepared, if it needs one.")
    flags.DEFINE_integer("image_size", None, "Resize images to this side first.",
                         lower_bound=8)
    flags.DEFINE_string("output_dir", None, "Folder for the shards.", required=True)
    flags.DEFINE_integer("num_shards", 4, "Files per split.", lower_bound=1)
    flags.DEFINE_enum("encoding", "png", ["png", "jpeg"],
                      "How each image is encoded (png: lossless; jpeg: as ImageNet's are).")
    app.run(main)


if __name__ == "__main__":
    run()
