"""Pure tf.data input pipelines: sources by name, sharded for a given rank and size.

Nothing here imports Horovod or reads flags; app/ passes in what it knows."""
from input_pipeline import sources
from input_pipeline.pipeline import evaluation_dataset, shard_by_file, training_dataset

__all__ = ["DATASETS", "SPLITS", "evaluation_dataset", "load", "shard_by_file", "sources",
           "training_dataset"]

DATASETS = ("digits", "linear", "synthetic", "fashion_mnist", "cifar10", "imagenet")
SPLITS = ("train", "validation")
_TFDS_SPLITS = {"train": "train", "validation": "test"}


def load(dataset, split, *, data_dir=None, image_size=None, seed=0):
    """The `sources.Source` of `split` ("train" or "validation") of `dataset`.

    Raises FileNotFoundError, naming what is missing and how to prepare it, when the data is
    not there; reads nothing else."""
    if dataset == "digits":
        return sources.digits(split)
    if dataset == "linear":
        return sources.linear(split, seed=seed)
    if dataset == "synthetic":
        size = image_size or 224
        return sources.synthetic(split, (size, size, 3), num_classes=1000,
                                 num_examples=1024 if split == "train" else 256, seed=seed)
    if dataset == "fashion_mnist":
        return sources.tfds_dataset("fashion_mnist", _TFDS_SPLITS[split], data_dir, image_size)
    if dataset == "cifar10":
        return sources.tfds_dataset("cifar10", _TFDS_SPLITS[split], data_dir, image_size,
                                    augment=sources.flip_and_crop(4) if split == "train" else None)
    if dataset == "imagenet":
        return sources.tfrecord_images(
            split, data_dir, image_size or 224,
            num_examples={"train": 1_281_167, "validation": 50_000}[split]
            if _is_full_imagenet(data_dir, split) else None,
            augment=sources.flip_and_crop(0) if split == "train" else None)
    raise ValueError(f"unknown dataset {dataset!r}; one of {', '.join(DATASETS)}")


def _is_full_imagenet(data_dir, split):
    """The standard layout's full shard counts (1024 train, 128 validation) mean the full
    ImageNet, whose sizes are known; anything else is counted once by reading it."""
    import glob
    import os
    expected = {"train": 1024, "validation": 128}[split]
    return len(glob.glob(os.path.join(data_dir, f"{split}-*-of-{expected:05d}"))) == expected
