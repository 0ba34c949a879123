"""Applies a trained segmentation model to a whole survey, larger than its training patches:
sliding windows with overlap whose seams are blended (MONAI's sliding-window inference is
the reference behaviour: its Gaussian importance map, sigma 1/8 of the window), the windows
dealt out across the ranks under mpirun.

    python -m app.predict --model_dir=runs/seismic_faults_cpu --input=survey.segy \\
        --output_dir=runs/survey_faults
    mpirun -np 4 python -m app.predict --model_dir=... --input=survey.npy --output_dir=...

The model and its flags are the run's (MODEL_DIR/flags.cfg and its latest checkpoint). Every
rank reads the survey (a shared filesystem), predicts its windows and adds them up into the
blended sum, which Horovod's allreduce combines; rank 0 writes OUTPUT_DIR/probability.npy
(float32 [inlines, crosslines, samples], and [..., classes] for several classes),
probability.segy for a SEG-Y input (its geometry and headers; several classes: the most
probable one), and slices.png (the middle inline, crossline and time slice).
"""
import itertools
import os

from app.compat import hvd_tensorflow as hvd, tf  # first: it sets TF_USE_LEGACY_KERAS

import numpy as np
from absl import app, flags

import input_pipeline
import models
from app import checkpoints, cli, slices
from app import flags as app_flags
from input_pipeline import volumes

FLAGS = flags.FLAGS
BLENDS = ("gaussian", "constant")


def define_flags():
    flags.DEFINE_string("input", None, "The survey: a SEG-Y file, or a NumPy .npy of "
                        "[inlines, crosslines, samples].", required=True)
    flags.DEFINE_string("output_dir", None, "Where the prediction goes.", required=True)
    flags.DEFINE_integer("window", None, "The windows' side (default: the run's patches); "
                         "the model's down-sampling must divide it.", lower_bound=4)
    flags.DEFINE_float("overlap", 0.25, "The share of a window its neighbour overlaps.",
                       lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_enum("blend", "gaussian", list(BLENDS),
                      "How overlapping windows are weighted: a Gaussian importance map "
                      "(centres count most, seams fade) or alike.")
    flags.DEFINE_integer("windows_per_batch", 4, "Windows each forward pass takes.",
                         lower_bound=1)


def window_starts(extent, window, overlap):
    """Where the windows of one axis start: every window * (1 - overlap), the last at the
    end; one window where the axis is no longer than a window (padded)."""
    if extent <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, extent - window + 1, step))
    return starts if starts[-1] == extent - window else [*starts, extent - window]


def importance(window, spatial, blend):
    """The weight of each voxel of a window: MONAI's Gaussian (sigma window / 8, highest
    at the centre, never 0) or 1."""
    if blend == "constant":
        return np.ones((window,) * spatial)
    centre, sigma = (window - 1) / 2, window / 8
    line = np.exp(-((np.arange(window) - centre) ** 2) / (2 * sigma ** 2))
    weights = line
    for _ in range(spatial - 1):
        weights = np.multiply.outer(weights, line)
    return np.maximum(weights / weights.max(), 1e-3)


def sliding_window(predict, volume, window, *, overlap=0.25, blend="gaussian", rank=0,
                   size=1, windows_per_batch=4):
    """(blended sum [..., outputs], weights) of `predict` (windows [n, w, ..., 1] ->
    [n, w, ..., outputs]) over rank `rank`'s share of `volume`'s windows, in float64 on
    the volume padded with zeros to at least a window: added up over the ranks and divided,
    the blended prediction."""
    spatial = volume.ndim
    padded = np.pad(volume, [(0, max(0, window - extent)) for extent in volume.shape])
    corners = list(itertools.product(*(window_starts(extent, window, overlap)
                                       for extent in padded.shape)))[rank::size]
    weights = importance(window, spatial, blend)
    total, weight = None, np.zeros(padded.shape)
    for first in range(0, len(corners), windows_per_batch):
        batch = corners[first:first + windows_per_batch]
        places = [tuple(slice(start, start + window) for start in corner) for corner in batch]
        outputs = np.asarray(predict(np.stack([padded[place] for place in places])[..., None]),
                             np.float64)
        if total is None:
            total = np.zeros(padded.shape + outputs.shape[-1:])
        for place, output in zip(places, outputs):
            total[place] += output * weights[..., None]
            weight[place] += weights
    return total, weight


def blended(total, weight, shape):
    """The prediction from sliding_window's sums (over every rank), cut to `shape`."""
    probability = total / weight[..., None]
    return probability[tuple(slice(0, extent) for extent in shape)]


def main(_):
    model_dir, output_dir = FLAGS.model_dir, FLAGS.output_dir
    run_flags = os.path.join(model_dir or "", "flags.cfg")
    if not model_dir or not os.path.isfile(run_flags):
        cli.fail(f"--model_dir={model_dir}: no flags.cfg (not a model_dir of app.train)")
    window, overlap, blend = FLAGS.window, FLAGS.overlap, FLAGS.blend
    FLAGS([cli.program(), f"--flagfile={run_flags}"], known_only=True)
    builder = models.BUILDERS[FLAGS.model]
    if builder.task != "segmentation":
        cli.fail(f"--model_dir={model_dir}: trained --model={FLAGS.model}, a "
                 f"{builder.task} model; app.predict applies segmentation models")
    window = window or FLAGS.patch_size or FLAGS.volume_size
    if window % builder.downsampling:
        cli.fail(f"--window={window}: --model={FLAGS.model} divides its input's extents by "
                 f"{builder.downsampling}")
    epochs, steps, _ = checkpoints.latest(model_dir)
    if not epochs and not steps:
        cli.fail(f"--model_dir={model_dir}: no checkpoint to predict with")
    try:
        survey = volumes.read_volume(FLAGS.input)
    except volumes.VolumeError as error:
        cli.fail(f"--input: {error}")

    hvd.init()
    if FLAGS.float64:
        tf.keras.mixed_precision.set_global_policy("float64")
    source = input_pipeline.load(FLAGS.dataset, "train", **app_flags.load_options())
    spatial = len(source.feature_shape) - 1  # a model of sections: 2
    model = models.build(FLAGS.model, (window,) * spatial + (1,), source.num_outputs)
    try:
        checkpoints.initialize_from(model, os.path.join(
            model_dir, "checkpoints", checkpoints.checkpoint_name(epochs, steps)))
    except checkpoints.MismatchError as error:
        cli.fail(f"--model_dir={model_dir}: {error}", cli.RUN_ERROR)
    infer = tf.function(lambda windows: model(windows, training=False), reduce_retracing=True)
    sections = [survey] if spatial == 3 else list(survey)  # a 2D model: inline by inline
    outputs = []
    for section in sections:
        total, weight = sliding_window(
            lambda windows: infer(tf.constant(windows, tf.float32)).numpy(), section, window,
            overlap=overlap, blend=blend, rank=hvd.rank(), size=hvd.size(),
            windows_per_batch=FLAGS.windows_per_batch)
        if hvd.size() > 1:
            total = hvd.allreduce(tf.constant(total), op=hvd.Sum, name="blended_sum").numpy()
            weight = hvd.allreduce(tf.constant(weight), op=hvd.Sum, name="weights").numpy()
        outputs.append(blended(total, weight, section.shape))
    probability = (outputs[0] if spatial == 3 else np.stack(outputs)).astype(np.float32)
    if probability.shape[-1] == 1:
        probability = probability[..., 0]
    if hvd.rank() == 0:
        write_prediction(output_dir, probability, survey)


def write_prediction(output_dir, probability, survey):
    """probability.npy, probability.segy (a SEG-Y input's geometry), slices.png."""
    os.makedirs(output_dir, exist_ok=True)
    np.save(os.path.join(output_dir, "probability.npy"), probability)
    single = probability if probability.ndim == survey.ndim else probability.argmax(-1)
    if not FLAGS.input.endswith(".npy"):
        volumes.write_like(FLAGS.input, os.path.join(output_dir, "probability.segy"),
                           single.astype(np.float32))
    with open(os.path.join(output_dir, "slices.png"), "wb") as png:
        png.write(slices.figure_png(slices.columns(survey, prediction=single)))
    print(f"{FLAGS.input} -> {output_dir}: probability.npy {probability.shape}"
          f"{', probability.segy' if not FLAGS.input.endswith('.npy') else ''}, slices.png")


def run():
    app_flags.define_training_flags()
    define_flags()
    app.run(main, flags_parser=app_flags.parser(lambda argv: None))


if __name__ == "__main__":
    run()
