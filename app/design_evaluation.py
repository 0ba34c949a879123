"""The topology task's physics: predicted designs scored by the finite-element solver that
made SIMP's (input_pipeline.topology.design_scores), over the validation designs in
training."""
import keras
import numpy as np
import tensorflow as tf

from input_pipeline import topology

# The validation logs DesignScores adds; the first is the topology task's headline
SCORES = ("compliance_ratio", "compliance_ratio_p90", "volume_fraction_error", "connected")


class DesignScores(keras.callbacks.Callback):
    """Each epoch with validation, every validation design predicted by the model and scored
    on its load case (`cases`, index -> topology.LoadCase): its compliance over that of
    SIMP's thresholded design (the median and the 90th percentile: `val_compliance_ratio`,
    `val_compliance_ratio_p90`), the volume-fraction error (the mean) and the share of
    designs whose solid connects every load to a support (`val_connected`).

    `batches` are this rank's shard of the `num_examples` designs, in order: design
    `replica`, `replica` + `replicas`, ... (input_pipeline's sharding by example), from its
    start again where --validation_steps repeats it; `whole_examples` puts together
    the parts of a spatial group (a collective), whose first rank (`scores`) scores them.
    The ranks' scores are gathered with `gather` (hvd.allgather) by design, so that every
    rank logs the same values, those of the whole split at any number of processes. Put it
    before whatever reads the logs (the target, the CSV and TensorBoard writers)."""

    def __init__(self, cases, num_examples, batches, replica, replicas, whole_examples, gather,
                 scores=True):
        super().__init__()
        self.cases, self.batches, self.whole_examples = cases, batches, whole_examples
        self.shard = list(range(replica, num_examples, replicas))
        self.gather, self.scores = gather, scores
        self._references = {}  # design -> SIMP's design's compliance, solved once

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not any(name.startswith("val_") for name in logs):
            return  # no validation this epoch
        rows, position = [], 0
        for inputs, labels in self.batches:
            predicted = self.whole_examples(self.model(inputs, training=False)).numpy()
            solids = self.whole_examples(labels).numpy()
            for design, solid in zip(predicted[..., 0], solids[..., 0]):
                index = self.shard[position % len(self.shard)]
                if self.scores:
                    rows.append([index, *self._scored(index, design.astype(np.float64),
                                                      solid > 0.5)])
                position += 1
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
        scores = topology.design_scores(case, design, self._references[index])
        return (scores["compliance_ratio"], scores["volume_fraction_error"],
                float(scores["connected"]))
