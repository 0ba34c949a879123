"""The topology task's physics: predicted designs scored by the finite-element solver that
made SIMP's (input_pipeline.topology.design_scores), over the validation designs in
training, and app.predict for a load case file."""
import io
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

import models
from app import checkpoints, cli
from input_pipeline import simp, topology


class DesignScores(keras.callbacks.Callback):
    """Each epoch with validation, every validation design predicted by the model and scored
    on its load case (`cases`, index -> topology.LoadCase): its compliance over that of
    SIMP's thresholded design (the median and the 90th percentile: `val_compliance_ratio`,
    `val_compliance_ratio_p90`; infinite where the solver fails on it), the volume-fraction
    error (the mean) and the share of designs whose solid connects every load to a support
    (`val_connected`).

    `batches` are this rank's shard of the designs, in order: design `replica`, `replica` +
    `replicas`, ... (input_pipeline's sharding by example); `whole_examples` puts together
    the parts of a spatial group (a collective), whose `parts` ranks deal its designs out to
    score (rank `part` of the group scores every `parts`-th, from its `part`-th), each
    calling `progressed()` after each design it scores (the stall watchdog's mark: a solve
    at 128^3 takes a minute, and every rank of a group solves its share and marks its
    own progress, waiting for the others' at most a solve or two). The ranks'
    scores are gathered with `gather` (hvd.allgather) by design, so that every rank logs the
    same values, those of the whole split at any number of processes. Put it before whatever
    reads the logs (the target, the CSV and TensorBoard writers)."""

    def __init__(self, cases, batches, replica, replicas, whole_examples, gather, part=0,
                 parts=1, progressed=lambda: None):
        super().__init__()
        self.cases, self.batches, self.whole_examples = cases, batches, whole_examples
        self.replica, self.replicas, self.gather = replica, replicas, gather
        self.part, self.parts, self.progressed = part, parts, progressed
        self._references = {}  # design -> SIMP's design's compliance, solved once

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not any(name.startswith("val_") for name in logs):
            return  # no validation this epoch
        rows, dealt = [], 0  # dealt: the designs of this replica's shard so far
        for inputs, labels in self.batches:
            predicted = self.whole_examples(self.model(inputs, training=False)).numpy()
            solids = self.whole_examples(labels).numpy()
            for design, solid in zip(predicted[..., 0], solids[..., 0]):
                if dealt % self.parts == self.part:
                    index = self.replica + dealt * self.replicas  # in the whole split
                    rows.append([index, *self._scored(index, design.astype(np.float64),
                                                      solid > 0.5)])
                    self.progressed()
                dealt += 1
        # rows of (design, ratio, error, connected), in the designs' order on every rank
        gathered = self.gather(tf.constant(np.reshape(rows, (-1, 4)), tf.float64)).numpy()
        ratio, error, connected = gathered[np.argsort(gathered[:, 0])][:, 1:].T
        logs.update({"val_compliance_ratio": float(np.median(ratio)),
                     "val_compliance_ratio_p90": float(np.percentile(ratio, 90)),
                     "val_volume_fraction_error": float(error.mean()),
                     "val_connected": float(connected.mean())})

    def _scored(self, index, design, reference_solid):
        """(compliance ratio, volume-fraction error, connected) of design `index`."""
        case = self.cases(index)
        if index not in self._references:
            self._references[index] = topology.solid_compliance(case, reference_solid)
        try:
            scores = topology.design_scores(case, design, self._references[index])
        except simp.SolveError:  # a design the solver cannot solve carries nothing
            return np.inf, topology.volume_fraction_error(case, design), 0.0
        return (scores["compliance_ratio"], scores["volume_fraction_error"],
                float(scores["connected"]))


def predict(record, checkpoint, options):
    """Applies the run of `record` (its model, restored from `checkpoint`) to the load case
    file --input (input_pipeline.topology.read_load_case), into --output_dir: topology's
    app.predict. Writes density.npy (float32 [x, y, z], the solid's probability), design.npy
    (the design thresholded to the volume fraction), design.png, and prediction.json (the
    design's compliance, volume fraction and whether it connects the loads to the supports;
    with --simp, SIMP's design of the case too, beside it, and the ratio of the
    compliances). One process: a design is one forward pass."""
    if cli.world_size_from_environment() > 1:
        cli.fail(f"a topology run's design is one forward pass: run app.predict on one "
                 f"process, not {cli.world_size_from_environment()}")
    try:
        case = topology.read_load_case(options.input)
    except topology.LoadCaseError as error:
        cli.fail(f"--input={options.input}: {error}")
    builder = models.builder(record["model"])
    if any(extent % builder.downsampling for extent in case.shape):
        cli.fail(f"--input={options.input}: a box of {list(case.shape)} elements; "
                 f"--model={record['model']} divides each extent by {builder.downsampling}")
    model = checkpoints.prediction_model(record, case.shape + (len(topology.CHANNELS),),
                                         checkpoint, options.model_dir)
    started = time.perf_counter()
    density = model(topology.inputs_of(case)[np.newaxis], training=False)[0, ..., 0]
    density = np.asarray(density, np.float32)
    seconds = time.perf_counter() - started
    solid = topology.thresholded(density, case.volume_fraction)
    found = {"input": options.input, "shape": list(case.shape),
             "volume_fraction": case.volume_fraction, "prediction_seconds": seconds,
             "compliance": topology.solid_compliance(case, solid),
             "volume_fraction_predicted": float((density > 0.5).mean()),
             "connected": bool(topology.connects(case, solid))}
    designs = [("predicted", solid)]
    if options.simp:
        started = time.perf_counter()
        simp_design = topology.example(case, **topology.SIMP_SETTINGS)
        found.update(simp_seconds=time.perf_counter() - started,
                     simp_iterations=simp_design.iterations,
                     simp_compliance=topology.solid_compliance(case, simp_design.solid))
        found["compliance_ratio"] = found["compliance"] / found["simp_compliance"]
        designs.append(("SIMP's", simp_design.solid))
    try:
        os.makedirs(options.output_dir, exist_ok=True)
        np.save(os.path.join(options.output_dir, "density.npy"), density)
        np.save(os.path.join(options.output_dir, "design.npy"), solid)
        with open(os.path.join(options.output_dir, "design.png"), "wb") as figure:
            figure.write(design_png(case, designs))
        with open(os.path.join(options.output_dir, "prediction.json"), "w") as written:
            json.dump(found, written, indent=2)
    except OSError as error:
        cli.fail(f"--output_dir={options.output_dir}: {error}", cli.RUN_ERROR)
    print(json.dumps(found))


def design_png(case, designs):
    """PNG bytes of `designs` [(title, solid [x, y, z])] of `case` side by side in 3D, the
    supported nodes grey and the loaded ones red."""
    import matplotlib  # only where a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure = plt.figure(figsize=(4 * len(designs), 4))
    for column, (title, solid) in enumerate(designs, 1):
        axis = figure.add_subplot(1, len(designs), column, projection="3d")
        axis.voxels(solid, facecolors="#4c72b0", edgecolor="#2a3f66", linewidth=0.2)
        for nodes, colour in ((case.fixed.any(-1), "grey"), ((case.forces != 0).any(-1), "red")):
            axis.scatter(*np.nonzero(nodes), color=colour, s=4, depthshade=False)
        axis.set_title(title, fontsize=9)
        axis.set_box_aspect(case.shape)
        axis.set_axis_off()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
