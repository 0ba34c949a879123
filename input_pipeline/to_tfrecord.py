"""Writes images to sharded TFRecord files in the standard ImageNet layout: your own images
in one folder per class, or a split of any image data set this project reads; and a seismic
survey with its label volume, cut into blocks (input_pipeline.volumes).

    python -m input_pipeline.to_tfrecord --image_folder=photos --output_dir=/data/photos_tfr
    python -m app.train --dataset=images --data_dir=/data/photos_tfr --model=resnet50 ...

    python -m input_pipeline.to_tfrecord --dataset=digits --output_dir=/tmp/digits_tfr

    python -m input_pipeline.to_tfrecord --seismic=survey.segy --labels=faults.segy \
        --target=faults --block_size=128 --output_dir=/data/survey_tfr
    python -m app.train --dataset=seismic_shards --data_dir=/data/survey_tfr --model=unet3d ...

`--image_folder` holds a folder per class (photos/cat/*.jpg, photos/dog/*.png: labels by
folder name, in sorted order), split into train and validation by --validation_fraction,
or already split into photos/train/CLASS/ and photos/validation/CLASS/ (the raw ImageNet
layout), which are kept. The class names are written beside the shards (classes.txt, label
1 first). An image that does not decode stops the conversion with one line naming it, and
nothing is written.

Each record is input_pipeline.shards' image record: `image/encoded` (PNG, or JPEG as
ImageNet's are; an image already in that format keeps its bytes), `image/class/label`
(1-based, as in ImageNet), `image/height`, `image/width` and `image/channels`; split S goes
to S-00000-of-0000N ...
"""
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import app, flags

import input_pipeline
from input_pipeline import sources
from input_pipeline.shards import ENCODERS, image_record, write_shards, write_split

FLAGS = flags.FLAGS
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageFolderError(ValueError):
    """A folder of class folders that cannot be converted: what and why, in one line."""


def image_folder_splits(folder, validation_fraction=0.1, seed=0):
    """(class names, {split: [(path, label)]}) of a folder of class folders, files sorted,
    label 1 the first class by name: the folder's own train/ and validation/ when it has
    them, else each class's files cut by `validation_fraction` (a seeded draw per class, so
    that both splits hold every class)."""
    if not os.path.isdir(folder):
        raise ImageFolderError(f"--image_folder={folder}: not a folder")
    if os.path.isdir(os.path.join(folder, "train")):
        found = {split: _class_files(os.path.join(folder, split)) for split in ("train",
                                                                              "validation")}
        names = sorted(found["train"])
        unknown = sorted(set(found["validation"]) - set(names))
        if unknown:
            raise ImageFolderError(f"--image_folder={folder}: validation/ has classes that "
                                   f"train/ has not: {', '.join(unknown)}")
        return names, {split: _labelled(files, names) for split, files in found.items()}
    by_class = _class_files(folder)
    names, rng = sorted(by_class), np.random.default_rng(seed)
    splits = {"train": {}, "validation": {}}
    for name in names:
        files = by_class[name]
        held_out = set(rng.permutation(len(files))[:round(validation_fraction * len(files))])
        for split, chosen in (("train", False), ("validation", True)):
            splits[split][name] = [path for index, path in enumerate(files)
                                   if (index in held_out) == chosen]
    return names, {split: _labelled(files, names) for split, files in splits.items()}


def _class_files(folder):
    """{class folder name: its files, sorted} of `folder` (hidden entries left out)."""
    if not os.path.isdir(folder):
        return {}
    classes = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not name.startswith("."):
            classes[name] = [os.path.join(path, file) for file in sorted(os.listdir(path))
                             if not file.startswith(".")
                             and os.path.isfile(os.path.join(path, file))]
    empty = [name for name, files in classes.items() if not files]
    if not classes or empty:
        raise ImageFolderError(f"--image_folder: {folder} has " + (
            f"empty class folders: {', '.join(empty)}" if empty else
            "no class folders (it should hold one folder of images per class)"))
    return classes


def _labelled(files_by_class, names):
    return [(path, names.index(name) + 1) for name in sorted(files_by_class)
            for path in files_by_class[name]]


def _encoded_image(path, encoding):
    """The image file at `path` as `encoding`'s bytes (its own, when it is in that format
    already) and its decoded shape; ImageFolderError naming it if it does not decode."""
    with open(path, "rb") as image_file:
        data = image_file.read()
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
        raise ImageFolderError(f"{path}: not a readable image ({sources.first_line(error)}); "
                               f"nothing was written") from None
    same_format = (bool(tf.io.is_jpeg(data)) if encoding == "jpeg"
                   else data.startswith(_PNG_SIGNATURE))
    return (data if same_format else ENCODERS[encoding](image).numpy()), tuple(image.shape)


def write_image_folder(folder, output_dir, num_shards=4, validation_fraction=0.1, seed=0,
                       encoding="png"):
    """Converts a folder of class folders (image_folder_splits) to shards of each split in
    `output_dir`, with CLASS_NAMES beside them; returns {split: examples}. Everything is
    written to a temporary folder first and moved in place only when every image decoded."""
    names, splits = image_folder_splits(folder, validation_fraction, seed)
    if any(os.path.exists(os.path.join(output_dir, name)) for name in
           (sources.CLASS_NAMES, *(f"{split}-00000-of-{num_shards:05d}" for split in splits))):
        raise ImageFolderError(f"--output_dir={output_dir}: holds shards already")
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".to_tfrecord-", dir=output_dir)
    try:
        for split, files in splits.items():
            records = (_record(path, label, encoding) for path, label in files)
            write_shards(records, len(files), split, staging,
                          max(1, min(num_shards, len(files))), interleave=True)
        with open(os.path.join(staging, sources.CLASS_NAMES), "w") as class_names:
            class_names.write("".join(f"{name}\n" for name in names))
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {split: len(files) for split, files in splits.items()}


def _record(path, label, encoding):
    encoded, shape = _encoded_image(path, encoding)
    return image_record(encoded, label, shape)


def main(_):
    try:
        if FLAGS.seismic:
            from input_pipeline import volumes  # segyio only for surveys
            if not FLAGS.labels:
                raise ValueError("--labels: the label volume of --seismic is required")
            counts = volumes.write_survey(FLAGS.seismic, FLAGS.labels, FLAGS.output_dir,
                                          FLAGS.target, FLAGS.block_size,
                                          FLAGS.validation_fraction, FLAGS.num_shards)
            for split, count in counts.items():
                print(f"{count} {split} blocks of {FLAGS.block_size}^3 -> {FLAGS.output_dir}")
            return
        if FLAGS.image_folder:
            counts = write_image_folder(FLAGS.image_folder, FLAGS.output_dir, FLAGS.num_shards,
                                        FLAGS.validation_fraction, FLAGS.seed, FLAGS.encoding)
            for split, count in counts.items():
                print(f"{count} {split} examples -> {FLAGS.output_dir}")
            return
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        for split in FLAGS.split:
            source = input_pipeline.load(FLAGS.dataset, split, data_dir=FLAGS.data_dir,
                                         image_size=FLAGS.image_size)
            paths = write_split(source, split, FLAGS.output_dir, FLAGS.num_shards,
                                FLAGS.encoding)
            print(f"{source.num_examples} {split} examples -> {len(paths)} files in "
                  f"{FLAGS.output_dir}")
    except (ValueError, FileNotFoundError, OSError) as error:  # ImageFolderError, VolumeError
        print(f"input_pipeline.to_tfrecord: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    """The command line; its flags are defined here, not on import, so that importing this
    module beside app.train's flags defines nothing twice."""
    flags.DEFINE_string("image_folder", None,
                        "A folder of class folders of your images (or of train/ and "
                        "validation/ holding class folders) to convert instead of --dataset.")
    flags.DEFINE_string("seismic", None,
                        "A seismic volume (SEG-Y, or a NumPy .npy of [inlines, crosslines, "
                        "samples]) to cut into --block_size blocks for --dataset=seismic_shards, "
                        "with its --labels.")
    flags.DEFINE_string("labels", None, "--seismic's label volume (SEG-Y or .npy), of its "
                        "shape: faults 0/1, or facies classes from 0.")
    flags.DEFINE_enum("target", "faults", ["faults", "facies"], "What --labels holds.")
    flags.DEFINE_integer("block_size", 128, "--seismic: the side of the blocks written.",
                         lower_bound=4)
    flags.DEFINE_float("validation_fraction", 0.1,
                       "--image_folder without train/ and validation/: each class's share "
                       "held out for validation; --seismic: the share of the inlines' "
                       "blocks (the last ones).", lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_integer("seed", 0, "Seed of --validation_fraction's draw.")
    flags.DEFINE_enum("dataset", "digits",
                      [name for name, dataset in input_pipeline.DATASETS.items()
                       if dataset.images],
                      "Image data set to convert (without --image_folder).")
    flags.DEFINE_multi_enum("split", list(input_pipeline.SPLITS), input_pipeline.SPLITS,
                            "Splits to write (--dataset).")
    flags.DEFINE_string("data_dir", None, "Where --dataset is prepared, if it needs one.")
    flags.DEFINE_integer("image_size", None, "Resize --dataset's images to this side first.",
                         lower_bound=8)
    flags.DEFINE_string("output_dir", None, "Folder for the shards.", required=True)
    flags.DEFINE_integer("num_shards", 4, "Files per split (at most one per image).",
                         lower_bound=1)
    flags.DEFINE_enum("encoding", "png", list(ENCODERS),
                      "How each image is encoded (png: lossless; jpeg: as ImageNet's are).")
    app.run(main)


if __name__ == "__main__":
    run()
