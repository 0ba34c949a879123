"""Synthetic seismic surveys with fault and facies labels, after FaultSeg3D's recipe (Wu et
al., Geophysics 2019), and the patches a segmentation network trains on.

A survey is made, deterministically from its seed, in the order of the recipe:
1. a random 1D reflectivity series, spread laterally (every trace alike);
2. folding: a vertical shift by a sum of 2D Gaussians that grows linearly with depth,
   plus planar shearing;
3. planar faults of random strike, dip (60-85 degrees) and throw: the hanging wall slides
   along the dip by the throw;
4. convolution with a Ricker wavelet of peak 20-35 Hz (2 ms samples);
5. band-limited noise at a random signal-to-noise ratio;
6. the central crop (the survey is made larger, so that no edge effect enters it),
   standardized as every survey is, the user's and those app.predict reads included
   (survey_scaling: clipped to its 0.1-99.9 percentiles, then mean 0 and standard
   deviation 1).
What moves the reflectors moves the labels alike: `layers` is the depth in the original
series that each voxel came from, `facies` its bin among K, `faults` 1 within a voxel of a
fault plane. Axes: inline, crossline, time (depth), as in a SEG-Y volume read by segyio.
"""
import dataclasses
import glob
import os

import numpy as np
import tensorflow as tf
from scipy import ndimage

from input_pipeline.sources import Source

SAMPLE_SECONDS = 0.002
DIP_DEGREES = (60.0, 85.0)
PEAK_HERTZ = (20.0, 35.0)
# How every survey's amplitudes are scaled before a model sees them (a run records it, and
# app.predict applies it): a few huge spikes of a real survey must not set its scale.
STANDARDIZATION = "per-survey, clipped to its 0.1-99.9 percentiles, mean 0 and std 1"
CLIP_PERCENTILE = 99.9
SCALING_SAMPLE_VALUES = 1 << 22  # statistics from at most this many amplitudes of a survey


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A survey's standardization: amplitudes clipped to [low, high], then minus `centre`
    and divided by `scale`."""
    centre: float
    scale: float
    low: float
    high: float

    def apply(self, volume):
        clipped = np.clip(np.asarray(volume, np.float64), self.low, self.high)
        return ((clipped - self.centre) / self.scale).astype(np.float32)


def survey_scaling(amplitudes):
    """The Scaling of a survey from its `amplitudes` (all of them, or a sample): statistics of
    the values clipped to the CLIP_PERCENTILE range, so that spikes count as its edges. Scaling
    every amplitude by a factor scales all four alike: the standardized survey is the same."""
    values = np.asarray(amplitudes, np.float64).ravel()
    low, high = np.percentile(values, [100 - CLIP_PERCENTILE, CLIP_PERCENTILE])
    clipped = np.clip(values, low, high)
    scale = clipped.std()
    return Scaling(float(clipped.mean()), float(scale) if scale > 0 else 1.0, float(low),
                   float(high))


@dataclasses.dataclass(frozen=True)
class Survey:
    seismic: np.ndarray  # float32, standardized (survey_scaling)
    faults: np.ndarray  # uint8: 1 within a voxel of a fault plane
    facies: np.ndarray  # uint8: the layer's bin among num_facies
    layers: np.ndarray  # float32: the depth in the reflectivity series each voxel came from


def synthetic_survey(size, seed, num_facies=8):
    """A survey of `size`^3 voxels made by the recipe above from `seed`."""
    rng = np.random.default_rng(seed)
    margin = max(4, size // 4)
    extent = size + 2 * margin
    x, y, z = np.meshgrid(*(np.arange(extent, dtype=np.float64),) * 3, indexing="ij")

    # 1-2: the depth each voxel's reflector had before folding and shearing
    bumps = rng.integers(2, 6)
    folding = np.zeros_like(x)
    for _ in range(bumps):
        centre = rng.uniform(0, extent, 2)
        width = rng.uniform(0.1, 0.3) * extent
        height = rng.uniform(-0.12, 0.12) * extent
        folding += height * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
                                   / (2 * width ** 2))
    shear = rng.uniform(-0.1, 0.1, 2)
    layers = z + 1.5 * z / extent * folding + shear[0] * x + shear[1] * y
    layers -= layers.min()

    # 3: faults, each moving what came before it (the layers and earlier faults' planes)
    faults = np.zeros(x.shape, np.uint8)
    for _ in range(rng.integers(2, 5)):
        layers, faults = _fault(layers, faults, rng, extent, (x, y, z))

    # 4-5: reflectivity through a Ricker wavelet along time, and band-limited noise
    series = rng.uniform(-1.0, 1.0, int(np.ceil(layers.max())) + 2)
    reflectivity = np.interp(layers, np.arange(series.size), series)
    wavelet = ricker(rng.uniform(*PEAK_HERTZ) * SAMPLE_SECONDS)
    seismic = ndimage.convolve1d(reflectivity, wavelet, axis=2, mode="reflect")
    noise = ndimage.convolve1d(rng.normal(size=seismic.shape), wavelet, axis=2, mode="reflect")
    seismic += noise * seismic.std() / noise.std() / rng.uniform(2.0, 10.0)

    # 6: the centre, standardized; facies bins over the layers the crop holds
    centre = (slice(margin, margin + size),) * 3
    seismic, faults, layers = seismic[centre], faults[centre], layers[centre]
    seismic = survey_scaling(seismic).apply(seismic)
    span = layers.max() - layers.min()
    facies = np.minimum((layers - layers.min()) / span * num_facies, num_facies - 1)
    return Survey(seismic.astype(np.float32), faults, facies.astype(np.uint8),
                  layers.astype(np.float32))


def _fault(layers, faults, rng, extent, grid):
    """`layers` and `faults` after one planar fault of random strike, dip and throw through
    the central half: the hanging wall's voxels take what was one throw up the dip."""
    strike = rng.uniform(0, 2 * np.pi)
    dip = np.radians(rng.uniform(*DIP_DEGREES))
    along_strike = np.array([np.cos(strike), np.sin(strike), 0.0])
    down_dip = np.array([-np.sin(strike) * np.cos(dip), np.cos(strike) * np.cos(dip),
                         np.sin(dip)])
    normal = np.cross(along_strike, down_dip)
    origin = rng.uniform(0.25, 0.75, 3) * extent
    throw = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.08) * extent
    distance = sum(normal[axis] * (grid[axis] - origin[axis]) for axis in range(3))
    hanging = distance > 0
    source = [grid[axis] - hanging * throw * down_dip[axis] for axis in range(3)]
    layers = ndimage.map_coordinates(layers, source, order=1, mode="nearest")
    faults = ndimage.map_coordinates(faults, source, order=0, mode="nearest")
    faults[np.abs(distance) < 1.0] = 1
    return layers, faults


def ricker(peak_cycles_per_sample):
    """The Ricker wavelet of peak frequency `peak_cycles_per_sample`, to 1.5 periods on
    each side, unit peak."""
    half = int(np.ceil(1.5 / peak_cycles_per_sample))
    t = np.arange(-half, half + 1) * np.pi * peak_cycles_per_sample
    return (1 - 2 * t ** 2) * np.exp(-t ** 2)


def augmented_patch(seismic, label, size, seed):
    """A random `size`-sided patch of a (inline, crossline, time, 1) `seismic` volume and
    its label volume of the same extent, flipped and rotated by 90 degrees in the
    horizontal plane alike (the eight symmetries of the square, from stateless draws of
    `seed`); 2D sections (crossline, time, 1) are cropped and flipped along the crossline."""
    crop_seed, turn_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    label = tf.cast(label, seismic.dtype)
    stacked = tf.concat([seismic, label], axis=-1)
    spatial = len(seismic.shape) - 1
    stacked = tf.image.stateless_random_crop(stacked, [size] * spatial + [2], seed=crop_seed)
    coins = tf.random.stateless_uniform([3], turn_seed) < 0.5
    horizontal = 2 if spatial == 3 else 1
    for axis in range(horizontal):
        stacked = tf.where(coins[axis], tf.reverse(stacked, [axis]), stacked)
    if spatial == 3:  # swapping inline and crossline, with the flips: every rotation
        stacked = tf.where(coins[2], tf.transpose(stacked, [1, 0, 2, 3]), stacked)
    return stacked[..., :1], stacked[..., 1:]


SPLIT_IDS = {"train": 0, "validation": 1}


def synthetic_surveys(split, *, volume_size, patch_size, num_volumes, target, num_facies=8,
                      seed=0, sections=False):
    """A sources.Source of `num_volumes` surveys (synthetic_survey) of `volume_size`, made
    from their index in the input pipeline's parallel workers (its `prepare`: with --cache,
    once), so that making them stays off the training's critical path. `target` is "faults"
    (one sigmoid output) or "facies" (`num_facies` classes); the examples are
    segmentation_examples'."""
    split_id = SPLIT_IDS[split]

    def generate(index):
        survey = synthetic_survey(volume_size, [seed, split_id, int(index)], num_facies)
        label = survey.facies if target == "facies" else survey.faults
        return survey.seismic[..., np.newaxis], label[..., np.newaxis]

    def volume(index):
        seismic, label = tf.numpy_function(generate, [index], [tf.float32, tf.uint8],
                                           stateful=False)
        shape = [volume_size] * 3 + [1]
        return tf.ensure_shape(seismic, shape), tf.ensure_shape(label, shape)

    return Source(f"seismic_{target}{'_sections' if sections else ''}-{split}", num_volumes,
                  (), num_facies if target == "facies" else 1,
                  records=lambda: tf.data.Dataset.range(num_volumes), prepare=volume,
                  task="segmentation", standardization=STANDARDIZATION).with_examples(
        segmentation_examples(split, volume_size, patch_size, target, sections))


def survey_blocks(split, data_dir, patch_size=None, skip_corrupt=False):
    """A sources.Source of the blocks of a user's survey, written by
    input_pipeline.volumes.write_survey into `data_dir` (one record a block, sharded by
    file across the ranks); the examples are segmentation_examples' of `patch_size`
    (default: the block's side)."""
    from input_pipeline import volumes  # segyio only where a survey is read
    survey = volumes.read_survey(data_dir)
    block = survey["block_size"]
    patch_size = patch_size or block
    if patch_size > block:
        raise ValueError(f"--patch_size={patch_size}: larger than the blocks of "
                         f"{data_dir}/{volumes.SURVEY_FILE} ({block} a side)")
    files = tuple(sorted(glob.glob(os.path.join(data_dir, f"{split}-*"))))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {data_dir}")

    def read_file(path):
        records = tf.data.TFRecordDataset(path)
        return records.ignore_errors() if skip_corrupt else records
    return Source(f"survey-{split}", survey["blocks"][split], (), survey["num_classes"],
                  files=files, read_file=read_file, prepare=volumes.parse_block,
                  task="segmentation", skip_errors=skip_corrupt,
                  standardization=survey.get("standardization")).with_examples(
        segmentation_examples(split, block, patch_size, survey["target"]))


def segmentation_examples(split, volume_size, patch_size, target, sections=False):
    """(feature shape, decode, augment) of segmentation's examples from volumes of
    `volume_size`: training's augmented_patch's patches of `patch_size`, validation's each
    volume's central patch; `sections`, 2D inline sections instead (a random inline for
    training, the central one for validation). Labels: faults [..., 1] floats, facies
    [...] class numbers."""
    spatial = 2 if sections else 3

    def example(seismic, label):
        label = tf.cast(label, tf.float32)
        return seismic, (tf.cast(label[..., 0], tf.int64) if target == "facies" else label)

    def central(seismic, label):
        middle = (volume_size - patch_size) // 2
        window = ([volume_size // 2] if sections else []) + [
            slice(middle, middle + patch_size)] * spatial
        return example(seismic[tuple(window)], label[tuple(window)])

    def augment(seismic, label, example_seed):
        if sections:
            inline_seed, example_seed = tf.unstack(
                tf.random.experimental.stateless_split(example_seed, 2))
            inline = tf.random.stateless_uniform([], inline_seed, 0, volume_size, tf.int32)
            seismic, label = seismic[inline], label[inline]
        return example(*augmented_patch(seismic, label, patch_size, example_seed))

    shape = (patch_size,) * spatial + (1,)
    if split == "train":
        return shape, (lambda *pair: pair), augment
    return shape, central, None
