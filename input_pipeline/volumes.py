"""Users' seismic volumes: SEG-Y files (Equinor's segyio) and NumPy arrays, with their label
volumes, cut into blocks and written as TFRecord shards that `--dataset=seismic_shards`
reads; and SEG-Y written with another file's geometry and headers (app.predict's output).

A volume is [inlines, crosslines, samples], as segyio's cube of a post-stack file sorted by
inline. A survey larger than the patches a model trains on is cut into cubes of
`block_size` voxels a side (the last block of each axis moved inward to end at the edge);
the last `validation_fraction` of the inlines' blocks are the validation split, so that
validation is a part of the survey training never sees.
"""
import json
import os

import numpy as np
import segyio
import tensorflow as tf

from input_pipeline.shards import bytes_feature, int64_feature, serialized, write_shards
from input_pipeline.sources import first_line, written_beside

SURVEY_FILE = "survey.json"
FEATURES = {"seismic": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.string),
            "shape": tf.io.FixedLenFeature([3], tf.int64)}


class VolumeError(ValueError):
    """A volume file that cannot be used, named with the reason in one line."""


def read_volume(path):
    """The float32 volume [inlines, crosslines, samples] of a SEG-Y file or a .npy array."""
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: no such file")
    if path.endswith(".npy"):
        try:
            volume = np.load(path)
        except (OSError, ValueError, EOFError) as error:
            raise VolumeError(f"{path}: not a readable NumPy array ({first_line(error)})"
                              ) from None
        if volume.ndim != 3:
            raise VolumeError(f"{path}: an array of {volume.ndim} dimensions, not a volume "
                              f"[inlines, crosslines, samples]")
        return volume.astype(np.float32)
    try:
        with segyio.open(path, "r") as segy:
            return np.asarray(segyio.tools.cube(segy), np.float32)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise VolumeError(f"{path}: not a readable 3D SEG-Y volume sorted by inline or "
                          f"crossline ({first_line(error)})") from None


def write_like(template, path, volume):
    """Writes `volume` ([inlines, crosslines, samples] as `template`'s) as a SEG-Y file
    with the template's text, binary and trace headers, so that it lands where the input
    survey lies; float32 samples (IEEE)."""
    with segyio.open(template, "r") as source:
        spec = segyio.tools.metadata(source)
        spec.format = 5  # 4-byte IEEE floats, whatever the template's
        if volume.shape != (len(spec.ilines), len(spec.xlines), len(spec.samples)):
            raise VolumeError(f"{path}: a volume of shape {volume.shape} cannot take "
                              f"{template}'s geometry")
        with segyio.create(path, spec) as target:
            target.text[0] = source.text[0]
            target.bin = source.bin
            target.bin[segyio.BinField.Format] = 5
            target.header = source.header
            traces = volume.reshape(-1, volume.shape[-1])
            if source.sorting == segyio.TraceSortingFormat.CROSSLINE_SORTING:
                traces = volume.transpose(1, 0, 2).reshape(-1, volume.shape[-1])
            target.trace = np.ascontiguousarray(traces, np.float32)


def block_starts(extent, block_size):
    """Where the blocks of one axis start: every block_size, the last moved to end at the
    extent."""
    starts = list(range(0, extent - block_size + 1, block_size))
    if starts[-1] + block_size < extent:
        starts.append(extent - block_size)
    return starts


def write_survey(seismic_path, label_path, output_dir, target, block_size=128,
                 validation_fraction=0.1, num_shards=4):
    """Cuts a seismic volume and its label volume (faults: 0/1; facies: classes from 0)
    into blocks, written as shards of each split in `output_dir` with SURVEY_FILE beside
    them; returns {split: blocks}. VolumeError for a volume that does not fit."""
    seismic, labels = read_volume(seismic_path), read_volume(label_path)
    if labels.shape != seismic.shape:
        raise VolumeError(f"{label_path}: a label volume of shape {labels.shape}; the "
                          f"seismic {seismic_path} is {seismic.shape}")
    small = [axis for axis, extent in enumerate(seismic.shape) if extent < block_size]
    if small:
        raise VolumeError(f"--block_size={block_size}: larger than {seismic_path}'s "
                          f"{seismic.shape[small[0]]} voxels along axis {small[0]}")
    if labels.min() < 0 or not np.array_equal(labels, np.round(labels)) or (
            target == "faults" and labels.max() > 1):
        raise VolumeError(f"{label_path}: labels must be whole numbers from 0 "
                          f"(faults: 0 or 1)")
    inline_starts = block_starts(seismic.shape[0], block_size)
    held_out = max(1, round(validation_fraction * len(inline_starts))) if len(
        inline_starts) > 1 else 0
    corners = {"train": [], "validation": []}
    for index, i in enumerate(inline_starts):
        split = "validation" if index >= len(inline_starts) - held_out else "train"
        corners[split] += [(i, j, k) for j in block_starts(seismic.shape[1], block_size)
                           for k in block_starts(seismic.shape[2], block_size)]
    os.makedirs(output_dir, exist_ok=True)
    for split, found in corners.items():
        windows = (np.s_[i:i + block_size, j:j + block_size, k:k + block_size]
                   for i, j, k in found)
        write_shards((_record(seismic[window], labels[window]) for window in windows),
                     len(found), split, output_dir, max(1, min(num_shards, len(found))),
                     interleave=True)
    num_classes = 1 if target == "faults" else int(labels.max()) + 1
    with open(os.path.join(output_dir, SURVEY_FILE), "w") as survey:
        json.dump({"target": target, "num_classes": num_classes, "block_size": block_size,
                   "blocks": {split: len(found) for split, found in corners.items()},
                   "seismic": os.path.abspath(seismic_path), "shape": list(seismic.shape)},
                  survey, indent=2)
    return {split: len(found) for split, found in corners.items()}


def _record(seismic, labels):
    return serialized({
        "seismic": bytes_feature(np.ascontiguousarray(seismic, np.float32).tobytes()),
        "label": bytes_feature(np.ascontiguousarray(labels, np.uint8).tobytes()),
        "shape": int64_feature(seismic.shape)})


def read_survey(data_dir):
    """SURVEY_FILE of shards written by write_survey."""
    with open(written_beside(data_dir, SURVEY_FILE, "--seismic=VOLUME --labels=LABELS")) as survey:
        return json.load(survey)


def parse_block(record):
    """(seismic [b, b, b, 1] float32, label [b, b, b, 1] uint8) of one record."""
    example = tf.io.parse_single_example(record, FEATURES)
    shape = tf.concat([example["shape"], [1]], axis=0)
    seismic = tf.reshape(tf.io.decode_raw(example["seismic"], tf.float32), shape)
    label = tf.reshape(tf.io.decode_raw(example["label"], tf.uint8), shape)
    return seismic, label
