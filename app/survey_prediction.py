"""Segmentation's app.predict: a trained segmentation model applied to a whole survey, larger
than its training patches: sliding windows with overlap whose seams are blended (MONAI's
sliding-window inference is the reference behaviour: its Gaussian importance map, sigma 1/8
of the window), the survey's inlines dealt out across the ranks under mpirun.

The survey is scaled as the run's inputs were (input_pipeline.seismic.survey_scaling, from a
sample of its amplitudes that every rank reads alike), and a window reaching past its end is
filled by reflecting the survey, as if it went on, not by zeros, which a model reads as an
edge. Each rank predicts the windows over its own range of inlines, reading only the inlines
those need (a shared filesystem), and writes its rows of OUTPUT_DIR/probability.npy (float32
[inlines, crosslines, samples], and [..., classes] for several classes); rank 0 then writes
probability.segy for a SEG-Y input (its geometry and headers; several classes: the most
probable one), slices.png (the middle inline, crossline and time slice) and prediction.json
(what was done to the survey: its scaling and padding, the windows).
"""
import itertools
import json
import os

from app.horovod import hvd_tensorflow as hvd, tf  # first: it sets TF_XLA_FLAGS

import numpy as np

import models
from app import checkpoints, cli, slices
from input_pipeline import seismic, volumes

BLENDS = ("gaussian", "constant")


def window_starts(extent, window, overlap):
    """Where the windows of one axis start: every window * (1 - overlap), the last at the
    end; one window where the axis is no longer than a window (filled by reflection)."""
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


def reflected(indices, extent):
    """`indices` along an axis of `extent`, those past its end mirrored back into it (as
    numpy's `reflect` padding, repeated for indices more than an extent past it)."""
    if extent == 1:
        return np.zeros_like(indices)
    period = 2 * (extent - 1)
    folded = np.asarray(indices) % period
    return np.where(folded < extent, folded, period - folded)


def sliding_window(predict, read_rows, shape, window, rows, write_rows, *, overlap=0.25,
                   blend="gaussian", windows_per_batch=4):
    """Writes the blended prediction of rows [rows[0], rows[1]) along axis 0 of a volume of
    `shape`: write_rows(first row, [rows, ..., outputs] float64) once the rows are final.
    `predict` maps windows [n, w, ..., 1] to [n, w, ..., outputs]; `read_rows(start, stop)`
    gives the volume's rows [start, stop) (float32). Every window that overlaps the rows is
    predicted, whatever other rows another rank predicts, so that every voxel adds up the
    same windows in the same order on any number of ranks. Held at a time: a window's rows
    of the volume and the sums of the rows its windows cover."""
    first, last = rows
    if first >= last:
        return
    spatial = len(shape)
    starts = [window_starts(extent, window, overlap) for extent in shape]
    row_starts = [start for start in starts[0] if start < last and start + window > first]
    corners = list(itertools.product(*starts[1:]))
    weights = importance(window, spatial, blend)
    total = weight = None  # the sums of rows [done, ...)
    done = first
    for index, row_start in enumerate(row_starts):
        row_indices = reflected(np.arange(row_start, row_start + window), shape[0])
        block = read_rows(row_indices.min(), row_indices.max() + 1)[
            row_indices - row_indices.min()]
        for axis in range(1, spatial):
            block = np.take(block, reflected(np.arange(max(shape[axis], window)),
                                             shape[axis]), axis=axis)
        outputs = []
        for batch in range(0, len(corners), windows_per_batch):
            places = [tuple(slice(start, start + window) for start in corner)
                      for corner in corners[batch:batch + windows_per_batch]]
            windows = np.stack([block[(slice(None), *place)] for place in places])
            outputs += zip(places, np.asarray(predict(windows[..., None]), np.float64))
        cover = slice(max(row_start, done), min(row_start + window, last, shape[0]))
        if total is None:
            total = np.zeros((0, *shape[1:], outputs[0][1].shape[-1]))
            weight = np.zeros((0, *shape[1:]))
        grow = cover.stop - done - len(total)
        if grow > 0:
            total = np.concatenate([total, np.zeros((grow, *total.shape[1:]))])
            weight = np.concatenate([weight, np.zeros((grow, *weight.shape[1:]))])
        window_rows = slice(cover.start - row_start, cover.stop - row_start)
        sums_rows = slice(cover.start - done, cover.stop - done)
        for place, output in outputs:
            inside = tuple(slice(part.start, min(part.stop, extent))
                           for part, extent in zip(place, shape[1:]))
            cut = tuple(slice(0, part.stop - part.start) for part in inside)
            total[(sums_rows, *inside)] += (output * weights[..., None])[(window_rows, *cut)]
            weight[(sums_rows, *inside)] += weights[(window_rows, *cut)]
        final = row_starts[index + 1] if index + 1 < len(row_starts) else last
        final = min(max(final, done), last)
        if final > done:
            write_rows(done, total[:final - done] / weight[:final - done, ..., None])
            total, weight, done = total[final - done:], weight[final - done:], final


def rows_of_rank(extent, rank, size):
    """This rank's range of rows along axis 0: as equal as they come, in rank order."""
    bounds = np.linspace(0, extent, size + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def predict(record, checkpoint, options):
    """Applies the run of `record` (its model, restored from `checkpoint`) to the survey
    --input, into --output_dir (`options`: app.predict's flag values): segmentation's
    app.predict."""
    if record["standardization"] not in (None, seismic.STANDARDIZATION):
        cli.fail(f"--model_dir={options.model_dir}: its inputs were scaled "
                 f"'{record['standardization']}', which this version cannot repeat (it scales "
                 f"'{seismic.STANDARDIZATION}')")
    builder = models.builder(record["model"])
    window = options.window or record["input_shape"][0]
    if record["model"].endswith(".keras") and window != record["input_shape"][0]:
        cli.fail(f"--window={window}: --model={record['model']} takes windows of "
                 f"{record['input_shape'][0]} only, as it was saved")
    if window % builder.downsampling:
        cli.fail(f"--window={window}: --model={record['model']} divides its input's extents "
                 f"by {builder.downsampling}")
    try:
        survey = volumes.Survey(options.input)
    except volumes.VolumeError as error:
        cli.fail(f"--input: {error}")

    hvd.init()
    spatial = len(record["input_shape"]) - 1  # a model of sections: 2
    model = checkpoints.prediction_model(record, (window,) * spatial + (1,), checkpoint,
                                         options.model_dir)
    scaling = (seismic.survey_scaling(survey.sample(seismic.SCALING_SAMPLE_VALUES))
               if record["standardization"] else None)
    prepared = _agree(lambda: _create_outputs(survey.shape, record["num_outputs"],
                                                options.output_dir))
    if prepared:
        cli.fail(f"--output_dir={options.output_dir}: {prepared}", cli.RUN_ERROR)
    predict_own_rows(model, survey, scaling, window, spatial, options)
    hvd.allreduce(tf.constant(0), name="rows_written")  # every rank's rows are on disk
    if hvd.rank() == 0:
        write_beside(survey, scaling, window, options)
    survey.close()


def predict_own_rows(model, survey, scaling, window, spatial, options):
    """This rank's inlines of OUTPUT_DIR/probability.npy, predicted by sliding windows (a
    model of sections: inline by inline)."""
    infer = tf.function(lambda windows: model(windows, training=False), reduce_retracing=True)
    probability = np.load(os.path.join(options.output_dir, "probability.npy"), mmap_mode="r+")

    def writer(inline=None):
        """write_rows for the volume's rows, or for one inline's."""
        def write_rows(start, sums):
            place = np.s_[start:start + len(sums)] if inline is None else np.s_[
                inline, start:start + len(sums)]
            probability[place] = sums.reshape(probability[place].shape)
        return write_rows

    first, last = rows_of_rank(survey.shape[0], hvd.rank(), hvd.size())
    blending = dict(overlap=options.overlap, blend=options.blend,
                    windows_per_batch=options.windows_per_batch)
    predict = lambda windows: infer(tf.constant(windows, tf.float32)).numpy()  # noqa: E731
    if spatial == 3:
        sliding_window(predict, lambda start, stop: scaled(survey.inlines(start, stop), scaling),
                       survey.shape, window, (first, last), writer(), **blending)
    else:
        for inline in range(first, last):
            section = scaled(survey.inlines(inline, inline + 1)[0], scaling)
            sliding_window(predict, lambda start, stop: section[start:stop], section.shape,
                           window, (0, section.shape[0]), writer(inline), **blending)
    probability.flush()


def scaled(rows, scaling):
    return rows if scaling is None else scaling.apply(rows)


def middle_planes(inline, shape):
    """slices.middle_slices of the volume of `shape` whose inline i is inline(i), read an
    inline at a time."""
    middle = [extent // 2 for extent in shape]
    crossline, time_slice = np.zeros((shape[0], shape[2])), np.zeros(shape[:2])
    for index in range(shape[0]):
        rows = inline(index)
        crossline[index], time_slice[index] = rows[middle[1]], rows[:, middle[2]]
        if index == middle[0]:
            middle_inline = rows
    return [("inline", middle_inline), ("crossline", crossline), ("time slice", time_slice)]


def _agree(prepare):
    """Rank 0's prepare() (an error message, or "" when it went well), on every rank, so
    that no rank waits for a rank 0 that failed."""
    message = ""
    if hvd.rank() == 0:
        message = prepare()
    return hvd.broadcast_object(message, root_rank=0, name="outputs_created")


def _create_outputs(shape, num_outputs, output_dir):
    """OUTPUT_DIR/probability.npy of `shape`, for the ranks to fill; "" or why it failed."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        np.lib.format.open_memmap(
            os.path.join(output_dir, "probability.npy"), mode="w+", dtype=np.float32,
            shape=shape + ((num_outputs,) if num_outputs > 1 else ())).flush()
    except OSError as error:
        return cli.first_line(error)
    return ""


def write_beside(survey, scaling, window, options):
    """probability.segy (a SEG-Y input's geometry), slices.png and prediction.json beside
    probability.npy, holding an inline at a time (and the slices)."""
    output_dir = options.output_dir
    probability = np.load(os.path.join(output_dir, "probability.npy"), mmap_mode="r")
    most_probable = (lambda rows: rows) if probability.ndim == 3 else (
        lambda rows: rows.argmax(-1))
    written = ["probability.npy"]
    if not options.input.endswith(".npy"):
        volumes.write_like(options.input, os.path.join(output_dir, "probability.segy"),
                           lambda inline: most_probable(probability[inline]))
        written.append("probability.segy")
    seismic_planes = middle_planes(lambda i: scaled(survey.inlines(i, i + 1)[0], scaling),
                                   survey.shape)
    predicted_planes = middle_planes(lambda i: most_probable(probability[i]), survey.shape)
    with open(os.path.join(output_dir, "slices.png"), "wb") as png:
        png.write(slices.figure_png(slices.columns(seismic_planes,
                                                   prediction=predicted_planes)))
    written.append("slices.png")
    padded = [axis for axis, extent in enumerate(survey.shape) if extent < window]
    done = {"input": os.path.abspath(options.input), "shape": list(survey.shape),
            "scaling": ({"standardization": seismic.STANDARDIZATION,
                         **vars(scaling)} if scaling else "none: the run's inputs were not "
                        "scaled"),
            "padding": {"mode": "reflect", "axes_shorter_than_a_window": padded},
            "window": window, "overlap": options.overlap, "blend": options.blend,
            "model_dir": os.path.abspath(options.model_dir), "ranks": hvd.size()}
    with open(os.path.join(output_dir, "prediction.json"), "w") as described:
        json.dump(done, described, indent=2)
    written.append("prediction.json")
    what = (f"scaled (clip {scaling.low:.4g}..{scaling.high:.4g}, centre {scaling.centre:.4g}, "
            f"scale {scaling.scale:.4g})" if scaling else "not scaled")
    padding = (f"axes {padded} shorter than the {window}-voxel window filled by reflection"
               if padded else "no padding")
    print(f"{options.input} -> {output_dir}: {', '.join(written)}; survey {survey.shape} "
          f"{what}; {padding}")
