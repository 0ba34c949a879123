"""The table of tasks: what a model is trained to predict, each an entry that owns its loss,
its metrics, the headline metric --target_accuracy reaches and results.json names, what
TensorBoard shows of it each epoch and what app.predict writes for it. A data set and a
model name their task (input_pipeline.Dataset.task, models.Builder.task); everything that
differs by task asks this table (docs/extending.md, "Adding an application").
"""
import collections
import math

import keras

from app import design_evaluation, summaries, survey_prediction
from input_pipeline import topology
from models import segmentation


class Task(collections.namedtuple(
        "Task", "description per_voxel loss metrics headline epoch_callbacks predict "
                "validation_callbacks lower_is_better",
        defaults=(None, None, None, None, False))):
    """A task: `per_voxel`, whether a label (and the model's outputs) go with each voxel of
    an input rather than with the whole example; `loss(options)`, the Keras loss
    (`options`: segmentation_loss, and example_sum where a model sees parts of examples);
    `metrics(num_outputs)`, Keras' metrics; `headline(num_outputs)`, the name of the one
    that says how good a model is (None: no metric of it has a target to reach);
    `epoch_callbacks(model_dir, example, whole_examples)`, the callbacks that show one
    validation example in TensorBoard each epoch (None: none); `predict(record,
    checkpoint, flag_values)`, app.predict for its runs (None: app.predict refuses them);
    `validation_callbacks(source, batches, where, whole_examples, gather, progressed)`, the
    callbacks that add scores of the whole validation split `source` to each epoch's logs
    (`batches`: this rank's shard of it; `where`: the rank's Position; `progressed()`: marks
    progress for the stall watchdog), before anything reads them (None: none; a task with
    them refuses --validation_steps); `lower_is_better`, whether the headline is an error
    to bring down to --target_accuracy rather than a score to raise to it."""


def _voxel_loss(options):
    return segmentation.loss(options.segmentation_loss, options.example_sum)


def _voxel_counts(num_outputs):
    return [segmentation.ConfusionCounts(num_outputs)]


def _segmentation_headline(num_outputs):
    """One output (faults): the positive class's IoU; several classes (facies): mean IoU."""
    return "iou" if num_outputs == 1 else "mean_iou"


def _validation_slices(model_dir, example, whole_examples):
    return [summaries.ValidationSlices(model_dir, *example, whole_examples)]


def _design_scores(source, batches, where, whole_examples, gather, progressed):
    """Every validation design scored by its compliance (a spatial group's ranks deal out
    the designs the group put together)."""
    return [design_evaluation.DesignScores(
        source.cases, batches, where.replica, where.replicas, whole_examples, gather,
        where.part, where.parts, progressed)]


def _design_slices(model_dir, example, whole_examples):
    """A validation design's slices over its strain energy: SIMP's design, the prediction."""
    return [summaries.ValidationSlices(model_dir, *example, whole_examples,
                                       channel=topology.CHANNELS.index("log_strain_energy"))]


TASKS = {
    "classification": Task(
        "one class per example: softmax outputs, integer labels; cross-entropy, accuracy",
        False, lambda options: "sparse_categorical_crossentropy",
        lambda num_outputs: ["accuracy"], lambda num_outputs: "accuracy"),
    "regression": Task(
        "real targets per example: mean squared error, mean absolute error (no headline: "
        "an error has no accuracy to reach)", False, lambda options: "mse",
        lambda num_outputs: ["mae"]),
    "segmentation": Task(
        "one class per voxel (one sigmoid output: faults; a softmax: facies): "
        "--segmentation_loss, voxel confusion counts (IoU; mean IoU for several classes); "
        "each epoch a validation volume's slices; app.predict applies it to a whole survey",
        True, _voxel_loss, _voxel_counts, _segmentation_headline, _validation_slices,
        survey_prediction.predict),
    "topology": Task(
        "a design per voxel (one sigmoid output: solid or void) from the load case's voxels "
        "(input_pipeline.topology): --segmentation_loss, the solid's IoU; each epoch every "
        "validation design's compliance over SIMP's (median, the headline: lower is better; "
        "90th percentile), volume-fraction error and whether it connects the loads to the "
        "supports, and a design's slices; app.predict designs for a load case file", True,
        _voxel_loss, _voxel_counts,
        lambda num_outputs: "compliance_ratio", _design_slices, design_evaluation.predict,
        validation_callbacks=_design_scores, lower_is_better=True),
}


LossOptions = collections.namedtuple("LossOptions", "segmentation_loss example_sum",
                                     defaults=("balanced_crossentropy", None))


def compile_for(model, optimizer, task, num_outputs, options=LossOptions(),
                steps_per_execution=1):
    """Compiles `model` (of `num_outputs` outputs, or a pipeline stage of it) with `task`'s
    loss (`options`, LossOptions) and metrics."""
    entry = TASKS[task]
    # No XLA around the whole step: Horovod's allreduce in it has no XLA kernel on CPUs (and
    # Keras 3's "auto" would compile it on GPUs); --jit_compile clusters around it instead.
    model.compile(optimizer, loss=entry.loss(options),
                  metrics=entry.metrics(num_outputs),
                  steps_per_execution=steps_per_execution, jit_compile=False)


def build_compiled_state(model, element_spec):
    """Makes the compiled loss's and metrics' variables for batches of `element_spec` before
    fit(), as Keras 3 does only under a tf.distribute strategy: made inside the step's first
    trace instead, they have TensorFlow trace the whole step a second time. Only for Keras'
    own step (a pipeline stage builds its metrics in its own)."""
    if type(model).train_step is keras.Model.train_step:
        model._symbolic_build(data_batch=element_spec)  # private: what fit() calls there


def headline(task, num_outputs):
    """The metric that says how good a model of `task` with `num_outputs` outputs is (what
    --target_accuracy reaches), None where the task has none."""
    found = TASKS[task].headline
    return found and found(num_outputs)


def reached(task, value, target):
    """Whether `task`'s headline metric at `value` has reached `target`."""
    return value <= target if TASKS[task].lower_is_better else value >= target


def headlines():
    """Each task's headline metrics, as validation reports them (--target_accuracy's help)."""
    return "; ".join(
        f"{name}: {' or '.join(sorted({'val_' + task.headline(outputs) for outputs in (1, 2)}))}"
        f"{' (at most)' if task.lower_is_better else ''}"
        for name, task in TASKS.items() if task.headline)


def output_shape(task, input_shape, num_outputs):
    """The outputs per example a model of `task` gives: `num_outputs` per voxel of the input,
    or per example."""
    if TASKS[task].per_voxel:
        return (*tuple(input_shape)[:-1], num_outputs)
    return (num_outputs,)


def voxels_per_example(task, feature_shape):
    """A per-voxel task's voxels in an example (None for the others)."""
    return math.prod(feature_shape[:-1]) if TASKS[task].per_voxel else None


def with_predict():
    """The tasks app.predict applies, as words."""
    return ", ".join(name for name, task in TASKS.items() if task.predict) + " models"
