"""Segmentation's losses and metrics: one label per voxel, one sigmoid output (faults:
two classes) or a softmax over K classes (facies).

The class-balanced cross-entropy is FaultSeg3D's (Wu et al. 2019), weighted per example:
each class by the share of the example's voxels that are not of it (two classes: beta, the
negatives' share, on the faults, 1 - beta on the rest). Per example rather than per batch,
so that the loss does not depend on how a global batch is shared among processes (FaultSeg3D
trains one volume a batch, where the two are the same).

The metrics are counted, not averaged: one confusion matrix of voxel counts, from which every
score is computed, so that summing the counts over the ranks (app.callbacks.
ExactValidationMetrics) gives the scores of all the voxels the ranks evaluated.
"""
import tensorflow as tf
import keras

LOSSES = ("balanced_crossentropy", "crossentropy", "dice")
_EPSILON = 1e-7


def _one_hot_probabilities(labels, outputs):
    """(one-hot labels, class probabilities), both [batch, voxels, classes] in the outputs'
    type: a sigmoid output is the two classes (1 - p, p)."""
    outputs = tf.reshape(outputs, [tf.shape(outputs)[0], -1, outputs.shape[-1]])
    if outputs.shape[-1] == 1:
        labels = tf.reshape(tf.cast(labels, outputs.dtype), tf.shape(outputs))
        return (tf.concat([1 - labels, labels], axis=-1),
                tf.concat([1 - outputs, outputs], axis=-1))
    labels = tf.reshape(tf.cast(labels, tf.int32), [tf.shape(outputs)[0], -1])
    return tf.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype), outputs


def loss(name, example_sum=None):
    """The per-example loss `name` (one of LOSSES) for Keras' compile. Where a model sees a
    part of each example (a slab: app.parallel.spatial), `example_sum` sums a tensor over the parts,
    with its gradient: the class shares and Dice's sums are then the whole example's, and a
    part's loss is its voxels' mean (the whole example's Dice), so that the parts' gradients
    add up to as many times the example's as there are parts."""
    def balanced_crossentropy(labels, outputs):
        one_hot, probabilities = _one_hot_probabilities(labels, outputs)
        if example_sum is None:
            share = tf.reduce_mean(one_hot, axis=1, keepdims=True)  # each class's, per example
        else:
            voxels = tf.cast(tf.shape(one_hot)[1], one_hot.dtype)
            share = (example_sum(tf.reduce_sum(one_hot, axis=1, keepdims=True))
                     / example_sum(voxels))
        weights = (1 - share) / (one_hot.shape[-1] - 1)
        log_likelihood = tf.math.log(tf.clip_by_value(probabilities, _EPSILON, 1.0))
        return -tf.reduce_mean(tf.reduce_sum(weights * one_hot * log_likelihood, -1), axis=1)

    def crossentropy(labels, outputs):
        one_hot, probabilities = _one_hot_probabilities(labels, outputs)
        log_likelihood = tf.math.log(tf.clip_by_value(probabilities, _EPSILON, 1.0))
        return -tf.reduce_mean(tf.reduce_sum(one_hot * log_likelihood, -1), axis=1)

    def dice(labels, outputs):
        """1 - the soft Dice coefficient, averaged over the classes (two: the faults')."""
        one_hot, probabilities = _one_hot_probabilities(labels, outputs)
        if outputs.shape[-1] == 1:  # the faults' Dice alone, as binary segmentation scores it
            one_hot, probabilities = one_hot[..., 1:], probabilities[..., 1:]
        overlap = tf.reduce_sum(one_hot * probabilities, axis=1)
        total = tf.reduce_sum(one_hot + probabilities, axis=1)
        if example_sum is not None:
            overlap, total = example_sum(overlap), example_sum(total)
        return 1 - tf.reduce_mean((2 * overlap + _EPSILON) / (total + _EPSILON), axis=-1)

    return {"balanced_crossentropy": balanced_crossentropy, "crossentropy": crossentropy,
            "dice": dice}[name]


class ConfusionCounts(keras.metrics.Metric):
    """The confusion matrix of the voxels seen (rows: label, columns: prediction, the
    argmax; a sigmoid output's class is p > 0.5) in `counts`, and the scores of it: for two
    classes (faults) the positive class's IoU, Dice, precision and recall and the mean IoU;
    for more (facies) pixel accuracy, mean class accuracy, mean IoU and frequency-weighted
    IoU, as the F3 benchmark (Alaudah et al. 2019) scores them, and each class's IoU."""

    def __init__(self, num_classes, name="confusion", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = max(num_classes, 2)
        self.counts = self.add_weight(name="counts", shape=[self.num_classes] * 2,
                                      dtype=tf.float64, initializer="zeros")

    def update_state(self, labels, outputs, sample_weight=None):
        del sample_weight
        outputs = tf.convert_to_tensor(outputs)
        if outputs.shape[-1] == 1:  # labels [..., 1] or [...]: as many either way
            predicted = tf.cast(outputs[..., 0] > 0.5, tf.int32)
        else:
            predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        self.counts.assign_add(tf.math.confusion_matrix(
            tf.reshape(tf.cast(labels, tf.int32), [-1]), tf.reshape(predicted, [-1]),
            self.num_classes, dtype=tf.float64))

    def result(self):
        return scores(self.counts, self.num_classes)

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))  # Keras' default assigns a scalar

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def scores(counts, num_classes):
    """{name: score} of a confusion matrix of voxel counts (ConfusionCounts')."""
    counts = tf.convert_to_tensor(counts, tf.float64)
    true_positives = tf.linalg.diag_part(counts)
    labelled, predicted = tf.reduce_sum(counts, 1), tf.reduce_sum(counts, 0)
    iou = tf.math.divide_no_nan(true_positives, labelled + predicted - true_positives)
    present = labelled > 0
    mean_iou = tf.reduce_mean(tf.boolean_mask(iou, present))
    if num_classes == 2:
        positives = true_positives[1]
        return {"iou": iou[1], "mean_iou": mean_iou,
                "dice": tf.math.divide_no_nan(2 * positives, labelled[1] + predicted[1]),
                "precision": tf.math.divide_no_nan(positives, predicted[1]),
                "recall": tf.math.divide_no_nan(positives, labelled[1])}
    total = tf.reduce_sum(counts)
    return {"pixel_accuracy": tf.reduce_sum(true_positives) / total,
            "mean_class_accuracy": tf.reduce_mean(tf.boolean_mask(
                true_positives / tf.maximum(labelled, 1), present)),
            "mean_iou": mean_iou,
            "fw_iou": tf.reduce_sum(labelled / total * iou),
            **{f"iou_{index}": iou[index] for index in range(num_classes)}}
