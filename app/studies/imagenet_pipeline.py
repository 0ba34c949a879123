"""How fast one core prepares ImageNet's images: the recipe's training preprocessing (a random
crop decoded alone from the JPEG, resize, flip) and its evaluation preprocessing (the center
crop), both leaving the normalization to the model's first layer, against decoding the whole
JPEG and nothing else (the ceiling of any path that looks at every pixel) and against the
whole-image path this project used before (decode everything, resize, flip).

    python -m app.studies.imagenet_pipeline --num_images=512 --repeats=5

The images are photograph-like JPEGs of ImageNet's typical 500x375 pixels, written as
TFRecord shards by this tool (from the photographs scikit-learn ships) and read into memory
first, so that the disk is not measured. Each path runs on one thread, the paths in turn,
`--repeats` times; the table holds each one's median images/s with its spread, the CPU
seconds per image (which the other load on a shared machine does not inflate), and the
ratios to decoding alone. Writes imagenet_pipeline.md, .csv and .json to --out_dir.
"""
import os
import time

from app.horovod import tf  # first: it sets TF_XLA_FLAGS

import numpy as np

from app import cli
from app.studies import harness
from input_pipeline import imagenet_preprocessing, sources
from input_pipeline.shards import write_split

IMAGE_SIZE = 224


def paths(image_size):
    """{name: image bytes -> image} of the measured preprocessing paths."""
    def decode_only(image_bytes):
        return tf.io.decode_jpeg(image_bytes, channels=3)

    def whole_image(image_bytes):
        image = tf.image.convert_image_dtype(tf.io.decode_jpeg(image_bytes, channels=3),
                                             tf.float32)
        return tf.image.random_flip_left_right(tf.image.resize(image, [image_size] * 2))
    return {
        "decode only (the ceiling)": decode_only,
        "training: crop decoded alone, resize, flip": lambda image_bytes: (
            imagenet_preprocessing.training_image(image_bytes, image_size, 3, tf.random.uniform(
                [2], maxval=2**31 - 1, dtype=tf.int64), jpeg=True)),
        "evaluation: center crop, resize": lambda image_bytes: (
            imagenet_preprocessing.evaluation_image(image_bytes, image_size, jpeg=True)),
        "before: whole image decoded, resized, flipped": whole_image,
    }


def encoded_images(folder, num_images):
    """The JPEG bytes of `num_images` photograph-like images, written as TFRecord shards in
    `folder` and read back."""
    files = write_split(sources.photographs("train", num_images), "train", folder,
                        num_shards=4, encoding="jpeg")
    records = tf.data.TFRecordDataset(files).map(
        lambda record: tf.io.parse_single_example(
            record, sources.IMAGENET_FEATURES)["image/encoded"])
    return [image_bytes.numpy() for image_bytes in records]


def measure(images, preprocess):
    """(images/s, CPU seconds per image) of `preprocess` over `images` on one thread."""
    dataset = tf.data.Dataset.from_tensor_slices(images).map(preprocess)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    dataset = dataset.with_options(options)
    next(iter(dataset))  # traced outside the clock
    cpu, wall = time.process_time(), time.perf_counter()
    count = dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return int(count) / wall, cpu / int(count)


def study(images, repeats, image_size):
    """One row per path: the median images/s over `repeats` rounds (the paths in turn in
    each round), its spread, the median CPU seconds per image, and the ratios to the first
    path (decoding alone)."""
    measured = {name: [] for name in paths(image_size)}
    for _ in range(repeats):
        for name, preprocess in paths(image_size).items():
            measured[name].append(measure(images, preprocess))
    rows = []
    for name, results in measured.items():
        rates, cpu = np.array(results).T
        rows.append({"path": name, "images_per_sec": float(np.median(rates)),
                     "spread": float(np.std(rates)),
                     "cpu_ms_per_image": 1000 * float(np.median(cpu))})
    ceiling = rows[0]
    for row in rows:
        row["of_decode_only"] = row["images_per_sec"] / ceiling["images_per_sec"]
        row["cpu_of_decode_only"] = ceiling["cpu_ms_per_image"] / row["cpu_ms_per_image"]
    return rows


def main(argv=None):
    parser = cli.argument_parser("app.studies.imagenet_pipeline", __doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=512, help="JPEGs to write and read")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all the paths")
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE, help="model input side")
    parser.add_argument("--out_dir", default="runs/imagenet_pipeline",
                        help="where the shards and the table go")
    args = parser.parse_args(argv)
    if min(args.num_images, args.repeats) < 1 or args.image_size < 8:
        parser.error("--num_images and --repeats must be positive, --image_size at least 8")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    os.makedirs(os.path.join(args.out_dir, "shards"), exist_ok=True)
    images = encoded_images(os.path.join(args.out_dir, "shards"), args.num_images)
    rows = study(images, args.repeats, args.image_size)
    title = (f"{args.num_images} JPEGs of 500x375 to {args.image_size}x{args.image_size}, one "
             f"thread, median of {args.repeats}")
    columns = [("path", lambda row: row["path"]),
               ("images/s", lambda row: f"{row['images_per_sec']:.0f}"),
               ("spread", lambda row: f"{row['spread']:.0f}"),
               ("CPU ms/image", lambda row: f"{row['cpu_ms_per_image']:.2f}"),
               ("of decode only (images/s)", lambda row: f"{row['of_decode_only']:.2f}"),
               ("of decode only (CPU time)", lambda row: f"{row['cpu_of_decode_only']:.2f}")]
    harness.write_study(os.path.join(args.out_dir, "imagenet_pipeline"), rows, columns, title)


if __name__ == "__main__":
    main()
