"""Pure tf.data input pipelines: sources by name, sharded for a given rank and size.

Nothing here imports Horovod or reads flags; app/ passes in what it knows. A data set is one
entry of DATASETS: its loader and what it needs; the flags' choices and help come from it
(docs/extending.md shows how to add one).
"""
import dataclasses
import glob
import hashlib
import json
import os
from typing import Callable

from input_pipeline import imagenet_preprocessing, seismic, sources, topology
from input_pipeline.pipeline import evaluation_dataset, shard_by_file, training_dataset

__all__ = ["DATASETS", "SPLITS", "Dataset", "LoadOptions", "evaluation_dataset", "load",
           "name_damaged_file", "shard_by_file", "sources", "training_dataset"]

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What a loader may use besides the split: app.train's --data_dir, --image_size,
    --seed, --skip_corrupt, and the generated volumes' --volume_size, --num_volumes (seismic
    and topology), --patch_size and --num_facies (seismic)."""
    data_dir: str = None
    image_size: int = None
    seed: int = 0
    skip_corrupt: bool = False
    volume_size: int = 128
    patch_size: int = None  # None: the whole volume
    num_volumes: int = 200
    num_facies: int = 8


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set: `load(split, LoadOptions)` gives the split's sources.Source."""
    load: Callable
    description: str
    needs_data_dir: bool = False
    images: bool = True  # input_pipeline.to_tfrecord can write it as image shards
    task: str = "classification"  # a name of app.tasks' table (its sources' task)
    keeps_data: bool = False  # makes its data and keeps it in --data_dir (made if missing)
    patches: bool = False  # its examples are patches of --patch_size (of volumes)


_TFDS_SPLITS = {"train": "train", "validation": "test"}
# The full ImageNet in the standard layout: shards and examples per split. Its sizes are
# known; any other set of shards is counted once, by reading it.
_IMAGENET_SPLITS = {"train": (1024, 1_281_167), "validation": (128, 50_000)}


def _fashion_mnist(split, options):
    """IDX files (Debian's by default), or TFDS's data_dir."""
    if not options.data_dir or sources.has_idx_files(options.data_dir):
        return sources.fashion_mnist_idx(split,
                                         options.data_dir or sources.DEBIAN_FASHION_MNIST)
    return sources.tfds_dataset("fashion_mnist", _TFDS_SPLITS[split], options.data_dir,
                                options.image_size)


def _image_shards(split, options, num_outputs=1000, known_sizes=None):
    """Shards in ImageNet's TFRecord layout, with ImageNet's crops and statistics."""
    return sources.tfrecord_images(
        split, options.data_dir, options.image_size or 224, num_outputs=num_outputs,
        num_examples=_full_split_examples(options.data_dir, split, known_sizes),
        preprocess=imagenet_preprocessing.evaluation_image,
        training_crop=imagenet_preprocessing.training_image if split == "train" else None,
        input_scaling=imagenet_preprocessing.input_scaling(3),
        skip_corrupt=options.skip_corrupt)


def _surveys(target, sections=False):
    """FaultSeg3D's synthetic surveys (input_pipeline.seismic): --num_volumes for training,
    a tenth as many (at least 2) for validation."""
    def load(split, options):
        volumes = (options.num_volumes if split == "train"
                   else max(2, options.num_volumes // 10))
        return seismic.synthetic_surveys(
            split, volume_size=options.volume_size,
            patch_size=options.patch_size or options.volume_size, num_volumes=volumes,
            target=target, num_facies=options.num_facies, seed=options.seed,
            sections=sections)
    return load


def _designs(split, options):
    """SIMP's designs (input_pipeline.topology): --num_volumes for training, an eighth as
    many (at least 2) for validation, the same whatever --seed (topology.SEED)."""
    return topology.designs(
        split, volume_size=options.volume_size,
        num_volumes=options.num_volumes if split == "train" else max(2, options.num_volumes // 8),
        cache_dir=options.data_dir)


def _own_images(split, options):
    """to_tfrecord --image_folder's shards: their classes.txt says how many classes."""
    return _image_shards(split, options,
                         num_outputs=len(sources.read_class_names(options.data_dir)))


DATASETS = {
    "digits": Dataset(lambda split, options: sources.digits(split),
                      "scikit-learn's bundled 8x8 digits (offline)"),
    "linear": Dataset(lambda split, options: sources.linear(split, seed=options.seed),
                      "Lab 1's y = 2x + 1 + noise, a regression", images=False,
                      task="regression"),
    "synthetic": Dataset(
        lambda split, options: sources.synthetic(
            split, (options.image_size or 224,) * 2 + (3,), num_classes=1000,
            num_examples=1024 if split == "train" else 256, seed=options.seed),
        "random images generated on the fly, for benchmarks"),
    "fashion_mnist": Dataset(_fashion_mnist, "Fashion-MNIST from Debian's "
                             "dataset-fashion-mnist, or IDX files or TFDS in --data_dir"),
    "cifar10": Dataset(
        lambda split, options: sources.tfds_dataset(
            "cifar10", _TFDS_SPLITS[split], options.data_dir, options.image_size,
            augment=sources.flip_and_crop(4) if split == "train" else None),
        "CIFAR-10 prepared by TFDS in --data_dir", needs_data_dir=True),
    "imagenet": Dataset(
        lambda split, options: _image_shards(split, options, known_sizes=_IMAGENET_SPLITS),
        "ImageNet's TFRecord shards in --data_dir", needs_data_dir=True),
    "images": Dataset(_own_images, "your own images, written to shards in --data_dir by "
                      "python -m input_pipeline.to_tfrecord --image_folder", needs_data_dir=True),
    "seismic_faults": Dataset(
        _surveys("faults"), "synthetic seismic surveys with fault labels (FaultSeg3D's recipe), "
        "--volume_size voxels a side, --patch_size patches", images=False, task="segmentation",
        patches=True),
    "seismic_facies": Dataset(
        _surveys("facies"), "the same surveys with --num_facies facies labels",
        images=False, task="segmentation", patches=True),
    "seismic_shards": Dataset(
        lambda split, options: seismic.survey_blocks(split, options.data_dir,
                                                     options.patch_size, options.skip_corrupt),
        "your own survey's blocks, written to --data_dir by python -m "
        "input_pipeline.to_tfrecord --seismic=VOLUME --labels=LABELS", needs_data_dir=True,
        images=False, task="segmentation", patches=True),
    "seismic_facies_sections": Dataset(
        _surveys("facies", sections=True), "inline sections of those surveys, facies labels",
        images=False, task="segmentation", patches=True),
    "topology": Dataset(
        _designs, "3D SIMP designs of random load cases on cubes of --volume_size elements, "
        "kept in --data_dir when given", images=False, task="topology", keeps_data=True),
}


def load(dataset, split, **options):
    """The `sources.Source` of `split` ("train" or "validation") of `dataset`; `options`,
    those of LoadOptions. Its cache_key is a digest of all three: what made its examples.

    Raises FileNotFoundError, naming what is missing and how to prepare it, when the data is
    not there, and sources.DamagedFileError naming a damaged TFRecord file found while
    counting records (`skip_corrupt`: read such files up to the damage instead)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; one of {', '.join(DATASETS)}")
    load_options = LoadOptions(**options)
    made_of = json.dumps([dataset, split, dataclasses.asdict(load_options)], sort_keys=True)
    return dataclasses.replace(DATASETS[dataset].load(split, load_options),
                               cache_key=hashlib.sha256(made_of.encode()).hexdigest()[:16])


def name_damaged_file(split_sources, error):
    """One line for a DataLossError met while reading `split_sources`: the damaged file,
    found by reading their TFRecord files again, else the error's own first line."""
    files = [path for source in split_sources for path in source.files]
    damaged = [count for count in sources.scan_tfrecords(files) if count.error]
    return str(damaged[0]) if damaged else sources.first_line(error)


def _full_split_examples(data_dir, split, known_sizes):
    """The known size of the split when `data_dir` holds a whole data set of `known_sizes`
    ({split: (shards, examples)}), else None (the shards are counted by reading them)."""
    if not known_sizes:
        return None
    shards, examples = known_sizes[split]
    found = glob.glob(os.path.join(data_dir, f"{split}-*-of-{shards:05d}"))
    return examples if len(found) == shards else None
