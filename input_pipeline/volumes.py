"""Users' seismic volumes: SEG-Y files (Equinor's segyio) and NumPy arrays, with their label
volumes, cut into blocks and written as TFRecord shards that `--dataset=seismic_shards`
reads (standardized as the synthetic surveys are); surveys read in parts (app.predict); and
SEG-Y written with another file's geometry and headers (app.predict's output).

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

from input_pipeline import seismic as seismic_scaling
from input_pipeline.shards import bytes_feature, int64_feature, serialized, write_shards
from input_pipeline.sources import first_line, written_beside

SURVEY_FILE = "survey.json"
FEATURES = {"seismic": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.string),
            "shape": tf.io.FixedLenFeature([3], tf.int64)}


class VolumeError(ValueError):
    """A volume file that cannot be used, named with the reason in one line."""


class Survey:
    """A volume file [inlines, crosslines, samples] opened to be read in parts: a rank reads
    only the inlines it needs (a .npy through a memory map, a SEG-Y inline by inline through
    segyio), so that a survey larger than one process's memory can be predicted. Checked
    whole when opened: a file that ends early is a VolumeError."""

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            raise VolumeError(f"{path}: no such file")
        self._segy = None
        if path.endswith(".npy"):
            try:
                self._array = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as error:
                raise VolumeError(f"{path}: not a readable NumPy array ({first_line(error)})"
                                  ) from None
            if self._array.ndim != 3:
                raise VolumeError(f"{path}: an array of {self._array.ndim} dimensions, not a "
                                  f"volume [inlines, crosslines, samples]")
            if not np.issubdtype(self._array.dtype, np.number):
                raise VolumeError(f"{path}: an array of {self._array.dtype}, not numbers")
            self.shape = self._array.shape
            return
        try:
            self._segy = segyio.open(path, "r")
            self.shape = (len(self._segy.ilines), len(self._segy.xlines),
                          len(self._segy.samples))
            if self.shape[0] * self.shape[1] != self._segy.tracecount:
                raise ValueError(f"{self._segy.tracecount} traces for {self.shape[0]} inlines "
                                 f"x {self.shape[1]} crosslines")
            self._segy.trace[self._segy.tracecount - 1]  # the last trace is all there
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            self.close()
            raise VolumeError(f"{path}: not a readable 3D SEG-Y volume sorted by inline or "
                              f"crossline ({first_line(error)})") from None

    def inlines(self, start, stop):
        """float32 inlines [start, stop) of the volume."""
        if self._segy is None:
            return np.asarray(self._array[start:stop], np.float32)
        numbers = self._segy.ilines[start:stop]
        return np.stack([self._segy.iline[number] for number in numbers]).astype(
            np.float32, copy=False) if len(numbers) else np.zeros((0, *self.shape[1:]),
                                                                   np.float32)

    def sample(self, max_values):
        """At most about `max_values` amplitudes: every k-th trace in the file's order, all
        of them where they are fewer; the same on every rank."""
        traces = self.shape[0] * self.shape[1]
        every = max(1, -(-traces * self.shape[2] // max_values))
        if self._segy is None:
            return np.asarray(self._array.reshape(traces, -1)[::every], np.float32)
        return np.stack([self._segy.trace[index] for index in range(0, traces, every)])

    def close(self):
        if self._segy is not None:
            self._segy.close()
            self._segy = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def read_volume(path):
    """The whole float32 volume [inlines, crosslines, samples] of a SEG-Y file or a .npy
    array."""
    with Survey(path) as survey:
        return survey.inlines(0, survey.shape[0])


def write_like(template, path, inlines):
    """Writes a volume of `template`'s geometry ([inlines, crosslines, samples]), whose
    inline i is `inlines(i)`, as a SEG-Y file with the template's text, binary and trace
    headers, so that it lands where the input survey lies; float32 samples (IEEE). One
    inline is held at a time."""
    with segyio.open(template, "r") as source:
        spec = segyio.tools.metadata(source)
        spec.format = 5  # 4-byte IEEE floats, whatever the template's
        with segyio.create(path, spec) as target:
            target.text[0] = source.text[0]
            target.bin = source.bin
            target.bin[segyio.BinField.Format] = 5
            target.header = source.header
            for index, number in enumerate(source.ilines):
                target.iline[number] = np.ascontiguousarray(inlines(index), np.float32)


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
    seismic = seismic_scaling.survey_scaling(seismic).apply(seismic)  # as app.predict will
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
                   "seismic": os.path.abspath(seismic_path), "shape": list(seismic.shape),
                   "standardization": seismic_scaling.STANDARDIZATION},
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
