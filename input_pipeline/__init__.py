"""Pure tf.data input pipelines: sources by name, sharded for a given rank and size.

Nothing here imports Horovod or reads flags; app/ passes in what it knows."""
import glob
import os

from input_pipeline import imagenet_preprocessing, sources
from input_pipeline.pipeline import evaluation_dataset, shard_by_file, training_dataset

__all__ = ["DATASETS", "SPLITS", "evaluation_dataset", "load", "name_damaged_file",
           "shard_by_file", "sources", "training_dataset"]

DATASETS = ("digits", "linear", "synthetic", "fashion_mnist", "cifar10", "imagenet")
SPLITS = ("train", "validation")
_TFDS_SPLITS = {"train": "train", "validation": "test"}
# The full ImageNet in the standard layout: shards and examples per split. Its sizes are
# known; any other set of shards is counted once, by reading it.
_IMAGENET_SPLITS = {"train": (1024, 1_281_167), "validation": (128, 50_000)}


def load(dataset, split, *, data_dir=None, image_size=None, seed=0, skip_corrupt=False):
    """The `sources.Source` of `split` ("train" or "validation") of `dataset`.

    Raises FileNotFoundError, naming what is missing and how to prepare it, when the data is
    not there, and sources.DamagedFileError naming a damaged TFRecord file found while
    counting records (`skip_corrupt`: read such files up to the damage instead)."""
    if dataset == "digits":
        return sources.digits(split)
    if dataset == "linear":
        return sources.linear(split, seed=seed)
    if dataset == "synthetic":
        size = image_size or 224
        return sources.synthetic(split, (size, size, 3), num_classes=1000,
                                 num_examples=1024 if split == "train" else 256, seed=seed)
    if dataset == "fashion_mnist":  # IDX files (Debian's by default), or TFDS's data_dir
        if not data_dir or sources.has_idx_files(data_dir):
            return sources.fashion_mnist_idx(split, data_dir or sources.DEBIAN_FASHION_MNIST)
        return sources.tfds_dataset("fashion_mnist", _TFDS_SPLITS[split], data_dir, image_size)
    if dataset == "cifar10":
        return sources.tfds_dataset("cifar10", _TFDS_SPLITS[split], data_dir, image_size,
                                    augment=sources.flip_and_crop(4) if split == "train" else None)
    if dataset == "imagenet":
        return sources.tfrecord_images(
            split, data_dir, image_size or 224,
            num_examples=_imagenet_examples(data_dir, split),
            preprocess=imagenet_preprocessing.evaluation_image,
            training_crop=imagenet_preprocessing.training_image if split == "train" else None,
            input_scaling=imagenet_preprocessing.input_scaling(3),
            skip_corrupt=skip_corrupt)
    raise ValueError(f"unknown dataset {dataset!r}; one of {', '.join(DATASETS)}")


def name_damaged_file(split_sources, error):
    """One line for a DataLossError met while reading `split_sources`: the damaged file,
    found by reading their TFRecord files again, else the error's own first line."""
    files = [path for source in split_sources for path in source.files]
    damaged = [count for count in sources.scan_tfrecords(files) if count.error]
    return str(damaged[0]) if damaged else str(error).strip().splitlines()[0]


def _imagenet_examples(data_dir, split):
    """The known size of the split when `data_dir` holds the full ImageNet, else None."""
    shards, examples = _IMAGENET_SPLITS[split]
    found = glob.glob(os.path.join(data_dir, f"{split}-*-of-{shards:05d}"))
    return examples if len(found) == shards else None
