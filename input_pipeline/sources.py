"""Where examples come from: one `Source` per split of a data set.

A source knows how many examples the split holds and how to read its raw records, either as
one dataset of the whole split (in-memory and generated data, TFDS) or as a list of files with
a reader per file (TFRecord shards, which the pipeline can shard by file). `decode` turns a
raw record into (features, label) (after `prepare`, for what the cache should keep, such
as a generated volume), `augment(features, label, seed)` adds training-only
randomness drawn from a per-example `seed` (stateless random ops), and `task` says
whether labels are classes or regression targets.
"""
import contextlib
import dataclasses
import glob
import os
import zipfile
from typing import Callable, Optional

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    num_examples: int
    feature_shape: tuple
    num_outputs: int
    records: Optional[Callable[[], tf.data.Dataset]] = None
    files: tuple = ()
    read_file: Optional[Callable[[tf.Tensor], tf.data.Dataset]] = None
    decode: Callable = lambda *record: record
    prepare: Optional[Callable] = None  # deterministic and costly: before the cache
    augment: Optional[Callable] = None
    task: str = "classification"  # a name of app.tasks' table
    skip_errors: bool = False  # drop records that fail to read or decode
    damaged: tuple = ()  # RecordCount of each file read only up to its damage
    input_scaling: Optional[tuple] = None  # (scale, offset) per channel: the model's first layer
    standardization: Optional[str] = None  # how each volume was scaled before (seismic's)
    # What made the split (input_pipeline.load's digest of the data set, split and options),
    # in a file cache's name: a cache of other data is never read.
    cache_key: str = ""
    # The physical case of example i of the split, which its task scores predictions against
    # (topology's load cases: app.tasks); None where there is none.
    cases: Optional[Callable[[int], object]] = None

    def with_examples(self, examples):
        """This source with (feature shape, decode, augment) of its examples."""
        shape, decode, augment = examples
        return dataclasses.replace(self, feature_shape=shape, decode=decode, augment=augment)

    def all_records(self):
        """The whole split, in a fixed order."""
        if self.records is not None:
            return self.records()
        return tf.data.Dataset.from_tensor_slices(list(self.files)).flat_map(self.read_file)


def first_line(error):
    """An exception's first line: TensorFlow's messages go on for pages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def digits(split):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), scaled to [0, 1].

    The split is fixed: a stratified 80/20 cut with a constant seed, 1437 train and 360
    validation images, identical on every rank and every run."""
    train_x, val_x, train_y, val_y = _digits_split(validation_share=0.2, seed=0)
    x, y = (train_x, train_y) if split == "train" else (val_x, val_y)
    return _in_memory(f"digits-{split}", x, y, num_outputs=10)


def _digits_split(validation_share, seed):
    """(train images, validation images, train labels, validation labels), kept in the user's
    cache for this split and version of scikit-learn: importing scikit-learn costs each rank
    of a job a second of CPU, more than all the rest of reading the digits."""
    from importlib import metadata
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hvd-keras",
        f"digits-{validation_share}-{seed}-sklearn-{metadata.version('scikit-learn')}.npz")
    names = ("train_x", "val_x", "train_y", "val_y")
    try:
        with np.load(cache) as kept:
            return tuple(kept[name] for name in names)
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):  # made again
        pass
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = (data.images / 16.0).astype("float32")[..., np.newaxis]
    labels = data.target.astype("int64")
    made = train_test_split(images, labels, test_size=validation_share, random_state=seed,
                            stratify=labels)
    partial = f"{cache}.{os.getpid()}.npz"
    try:  # written whole, then renamed: another rank reads the whole file or none
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.savez(partial, **dict(zip(names, made)))
        os.replace(partial, cache)
    except OSError:  # an unwritable home: made again each time
        with contextlib.suppress(OSError):
            os.remove(partial)
    return tuple(made)


def linear_arrays(num_examples, weight, bias, noise, seed):
    """x ~ U(-1, 1) and y = weight * x + bias + N(0, noise^2), as float32 columns."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(num_examples, 1)).astype("float32")
    y = (weight * x + bias + rng.normal(0.0, noise, size=x.shape)).astype("float32")
    return x, y


def linear(split, weight=2.0, bias=1.0, noise=0.1, num_examples=1024, seed=0):
    """The neuron of Lab 1: linear_arrays, a different draw for each split."""
    x, y = linear_arrays(num_examples, weight, bias, noise, seed + (0 if split == "train" else 1))
    return dataclasses.replace(_in_memory(f"linear-{split}", x, y, num_outputs=1),
                               task="regression")


def synthetic(split, shape, num_classes, num_examples, seed=0):
    """Random images generated on the fly from their index (nothing held in memory), so any
    shape costs only the time to generate it; for benchmarks."""
    shape = tuple(shape)
    split_seed = _split_seed(seed, split)

    def generate(index):
        image = tf.random.stateless_uniform(shape, seed=tf.stack([split_seed, index]))
        return image, index % num_classes
    return Source(f"synthetic-{split}", num_examples, shape, num_classes,
                  records=lambda: tf.data.Dataset.range(num_examples), decode=generate)


def photographs(split, num_examples, shape=(375, 500, 3), num_classes=10, seed=0):
    """Photograph-like images of `shape` (ImageNet's typical 500x375 by default): crops of
    random size and place from the two photographs scikit-learn ships, resized to `shape`,
    made from their index; for benchmarks of JPEG decoding and cropping."""
    from sklearn.datasets import load_sample_images
    photos = [tf.constant(photo) for photo in load_sample_images().images]
    split_seed = _split_seed(seed, split)

    def generate(index):
        photo = tf.gather(photos, index % len(photos))  # both are 427x640
        window = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(photo), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=tf.stack([split_seed, index]), area_range=(0.3, 1.0),
            use_image_if_no_bounding_boxes=True)
        image = tf.slice(photo, window[0], window[1])
        return tf.image.resize(tf.cast(image, tf.float32) / 255.0, shape[:2]), index % num_classes
    return Source(f"photographs-{split}", num_examples, tuple(shape), num_classes,
                  records=lambda: tf.data.Dataset.range(num_examples), decode=generate)


def _split_seed(seed, split):
    """Each split of a generated data set draws from its own seeds."""
    return seed * 2 + (0 if split == "train" else 1)


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_PREFIXES = {"train": "train", "validation": "t10k"}
_IDX_EXAMPLES = {"train": 60_000, "validation": 10_000}
_INSTALL_HINT = ("install Debian's dataset-fashion-mnist (apt install dataset-fashion-mnist) "
                 "or point --data_dir at a folder holding the IDX files")


def has_idx_files(folder):
    """Whether `folder` holds Fashion-MNIST's IDX files (the training images' at least)."""
    return os.path.exists(os.path.join(folder, "train-images-idx3-ubyte.gz"))


def fashion_mnist_idx(split, folder=DEBIAN_FASHION_MNIST):
    """Fashion-MNIST from its original IDX files (gzipped, as Debian's dataset-fashion-mnist
    installs them under DEBIAN_FASHION_MNIST): 60,000 training and 10,000 test 28x28 uint8
    images, scaled to [0, 1] as they are read. Raises FileNotFoundError for a missing file
    and ValueError for one that is truncated or not what it should be, naming it."""
    prefix, count = _IDX_PREFIXES[split], _IDX_EXAMPLES[split]
    images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), (count, 28, 28))
    labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), (count,))
    if labels.max() > 9:
        raise ValueError(f"{folder}/{prefix}-labels-idx1-ubyte.gz: labels beyond 0-9 "
                         f"({int(labels.max())}); {_INSTALL_HINT}")

    def decode(image, label):
        return tf.cast(image, tf.float32)[..., tf.newaxis] / 255.0, tf.cast(label, tf.int64)
    return Source(f"fashion_mnist-{split}", count, (28, 28, 1), 10,
                  records=lambda: tf.data.Dataset.from_tensor_slices((images, labels)),
                  decode=decode)


def read_idx(path, shape):
    """The uint8 array of shape `shape` in the gzipped IDX file `path` (LeCun's format: magic
    0x0000080N with N the number of dimensions, the sizes as big-endian int32, the bytes)."""
    import gzip
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as idx:
            data = idx.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a complete gzip file ({error}); {_INSTALL_HINT}") from None
    header = 4 * (1 + len(shape))
    magic = 0x800 + len(shape)
    found = tuple(int(value) for value in
                  np.frombuffer(data[:min(header, len(data) // 4 * 4)], ">i4"))
    if found != (magic, *shape):
        raise ValueError(f"{path}: header {found} is not that of uint8 data of shape {shape} "
                         f"(magic {magic:#010x}); {_INSTALL_HINT}")
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data) - header} bytes of data for shape {shape} "
                         f"({int(np.prod(shape))} expected); {_INSTALL_HINT}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def tfds_dataset(name, split, data_dir, image_size=None, augment=None):
    """A TensorFlow Datasets split read from `data_dir`, where it must already be prepared
    (nothing is downloaded here); images are scaled to [0, 1]."""
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        records = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:  # what TFDS raises for data that is not prepared
        raise FileNotFoundError(
            f"{name} is not prepared in {data_dir}; prepare it once on a machine with "
            f"internet (a login node): python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"") from None
    image_spec = builder.info.features["image"]
    shape = tuple(image_spec.shape) if image_size is None else (image_size, image_size,
                                                                  image_spec.shape[-1])

    def decode(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if image_size is not None:
            image = tf.image.resize(image, shape[:2])
        return image, label
    return Source(f"{name}-{split}", int(records.cardinality()), shape,
                  builder.info.features["label"].num_classes, records=lambda: records,
                  decode=decode, augment=augment)


IMAGENET_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def tfrecord_images(split, data_dir, image_size, channels=3, num_outputs=1000,
                    num_examples=None, skip_corrupt=False, preprocess=None, training_crop=None,
                    input_scaling=None):
    """Shards in the standard ImageNet TFRecord layout: `{data_dir}/{split}-NNNNN-of-NNNNN`,
    each record holding `image/encoded` (JPEG or PNG) and a 1-based `image/class/label`.
    `preprocess(image bytes, image_size, channels, jpeg)` makes the model's input from the
    encoded image (input_pipeline.imagenet_preprocessing's evaluation crop); by default the
    whole image is decoded, scaled to [0, 1] and resized. `training_crop(image bytes,
    image_size, channels, seed, jpeg)` instead decodes to (image bytes, label) and makes the
    input as the augmentation, for crops chosen before the image is decoded. `jpeg` says
    whether the first record is a JPEG: the converters of the layout (the Model Garden's,
    input_pipeline.to_tfrecord) write one format per data set. `input_scaling` is the
    per-channel (scale, offset) the model's first layer applies to what these make.

    Unless `num_examples` is given the shards are read once to count them, which also finds
    damaged files: a DamagedFileError names the first, or with `skip_corrupt` each damaged file is
    read up to its damage (TFRecord framing cannot be resynchronized after it) and records
    that do not decode are dropped; `Source.damaged` lists what was cut."""
    pattern = os.path.join(data_dir, f"{split}-*")
    files = tuple(sorted(glob.glob(pattern)))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern}")
    damaged = ()
    if num_examples is None or skip_corrupt:
        counts = scan_tfrecords(files)
        damaged = tuple(count for count in counts if count.error)
        if damaged and not skip_corrupt:
            raise DamagedFileError(str(damaged[0]))
        num_examples = sum(count.records for count in counts)
    shape = (image_size, image_size, channels)
    jpeg = _first_image_is_jpeg(files[0])

    def decode(record):
        example = tf.io.parse_single_example(record, IMAGENET_FEATURES)
        if training_crop is not None:
            return example["image/encoded"], example["image/class/label"] - 1
        if preprocess is not None:
            image = preprocess(example["image/encoded"], image_size, channels, jpeg)
        else:
            image = tf.io.decode_image(example["image/encoded"], channels=channels,
                                       expand_animations=False)
            image = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), shape[:2])
        return image, example["image/class/label"] - 1

    def read_file(path):
        records = tf.data.TFRecordDataset(path)
        return records.ignore_errors() if skip_corrupt else records

    augment = None
    if training_crop is not None:
        def augment(image_bytes, label, seed):
            return training_crop(image_bytes, image_size, channels, seed, jpeg), label
    return Source(f"tfrecord-{split}", num_examples, shape, num_outputs, files=files,
                  read_file=read_file, decode=decode, augment=augment,
                  skip_errors=skip_corrupt, damaged=damaged, input_scaling=input_scaling)


CLASS_NAMES = "classes.txt"


def written_beside(data_dir, name, converter_flags):
    """The path of the file `name` input_pipeline.to_tfrecord wrote beside its shards in
    `data_dir`; FileNotFoundError, saying how to write them, if it is not there."""
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}; write the shards with python -m "
                                f"input_pipeline.to_tfrecord {converter_flags} "
                                f"--output_dir={data_dir}")
    return path


def read_class_names(data_dir):
    """The class names written beside image shards (input_pipeline.to_tfrecord
    --image_folder), label 1 first."""
    with open(written_beside(data_dir, CLASS_NAMES, "--image_folder=FOLDER")) as names:
        return [name.rstrip("\n") for name in names if name.strip()]


def _first_image_is_jpeg(path):
    """Whether the first readable record of TFRecord file `path` holds a JPEG."""
    records = tf.data.TFRecordDataset(path).ignore_errors().take(1)
    for record in records:
        encoded = tf.io.parse_single_example(record, IMAGENET_FEATURES)["image/encoded"]
        return bool(tf.io.is_jpeg(encoded))
    return False


class DamagedFileError(ValueError):
    """A TFRecord file that cannot be read to its end."""


@dataclasses.dataclass(frozen=True)
class RecordCount:
    """How many records of `path` can be read, and, if reading stopped early, why and how
    many bytes of the file were left unread."""
    path: str
    records: int
    error: str = ""
    unread_bytes: int = 0

    def __str__(self):
        return (f"{self.path}: {self.error} after {self.records} good records "
                f"({self.unread_bytes} bytes unread)")


_RECORD_FRAMING = 16  # bytes around each TFRecord: length, its checksum, data checksum


def scan_tfrecords(files):
    """Reads every record of `files` once (checking TFRecord's length and data checksums)."""
    counts = []
    for path in files:
        records, offset, error = 0, 0, ""
        try:
            for record in tf.data.TFRecordDataset(path):
                records += 1
                offset += _RECORD_FRAMING + len(record.numpy())
        except tf.errors.DataLossError as loss:
            error = "corrupted record" if "corrupted record" in loss.message else "truncated"
        unread = os.path.getsize(path) - offset if error else 0
        counts.append(RecordCount(path, records, error, unread))
    return counts


def flip_and_crop(padding):
    """CIFAR-style augmentation: pad by `padding` pixels, random crop back, random flip."""
    def augment(image, label, seed):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        size = tf.shape(image)
        image = tf.image.pad_to_bounding_box(image, padding, padding,
                                             size[0] + 2 * padding, size[1] + 2 * padding)
        image = tf.image.stateless_random_crop(image, size, seed=crop_seed)
        return tf.image.stateless_random_flip_left_right(image, seed=flip_seed), label
    return augment


def _in_memory(name, features, labels, num_outputs):
    return Source(name, len(features), features.shape[1:], num_outputs,
                  records=lambda: tf.data.Dataset.from_tensor_slices((features, labels)))
