"""What rank 0 writes for TensorBoard under MODEL_DIR/tensorboard: Keras' loss and metric
scalars per step and per epoch (train/ and validation/), the LR as applied, images/s and the
global batch per step, the run's flags as an hparams entry (its metrics: the last epoch's),
a profiler trace of --profile_steps, and segmentation's validation slices."""
import os

import keras
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from app import slices

# The hparams dashboard's metric columns: (tag, run group) of Keras' epoch scalars.
HPARAMS_METRICS = [("epoch_loss", "train"), ("epoch_accuracy", "train"),
                   ("epoch_loss", "validation"), ("epoch_accuracy", "validation")]


def log_dir(model_dir):
    return os.path.join(model_dir, "tensorboard")


def callbacks(model_dir, *, flag_values, every_steps, steps_per_epoch, global_batch,
              throughput, profile_steps=()):
    """Rank 0's TensorBoard callbacks; `flag_values` ({name: value}) become the hparams
    (written now: the dashboard's columns; at the start and end of training: this run's
    entry), `throughput` (callbacks.Throughput, earlier in the list) times the steps."""
    directory = log_dir(model_dir)
    write_hparams_config(directory, flag_values)
    return [
        EpochsRecordedTensorBoard(directory, update_freq=every_steps,
                                  profile_batch=tuple(profile_steps) or 0),
        StepScalars(os.path.join(directory, "train"), every_steps, steps_per_epoch,
                    global_batch, throughput),
        hparams_api.KerasCallback(directory, hparams(flag_values), trial_id=model_dir),
    ]


def profiler(model_dir, profile_steps):
    """A benchmark's callback: the profiler's trace of `profile_steps` (START, END) under
    MODEL_DIR/tensorboard, and nothing else."""
    return keras.callbacks.TensorBoard(log_dir(model_dir), profile_batch=tuple(profile_steps),
                                       write_graph=False, write_steps_per_second=False)


class EpochsRecordedTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, its epoch scalars recorded: Keras 3 writes them under the
    last batch's record_if, which drops them unless the epoch's steps are a multiple of
    update_freq."""

    def on_epoch_end(self, epoch, logs=None):
        with tf.summary.record_if(True):
            super().on_epoch_end(epoch, logs)


def hparams(flag_values):
    """Flag values as hparams, which take bool, int, float and str: lists become strings,
    unset flags are left out."""
    return {name: ",".join(map(str, value)) if isinstance(value, list) else value
            for name, value in sorted(flag_values.items()) if value is not None}


def write_hparams_config(directory, flag_values):
    """The hparams dashboard's columns: every flag of the run, and HPARAMS_METRICS."""
    with tf.summary.create_file_writer(directory).as_default():
        hparams_api.hparams_config(
            hparams=[hparams_api.HParam(name) for name in hparams(flag_values)],
            metrics=[hparams_api.Metric(tag, group=group, display_name=f"{group} {tag}")
                     for tag, group in HPARAMS_METRICS])


class StepScalars(keras.callbacks.Callback):
    """Every `every_steps` training steps: the learning rate the step used (after Horovod's
    warmup and schedule callbacks, which set it before each step), images/s over those steps
    on all ranks (this rank's rate times the ranks, as Throughput logs per epoch), and the
    global batch (which --accumulation_steps spreads over several steps). Steps count from
    the first epoch of the run, also after a resume."""

    def __init__(self, train_log_dir, every_steps, steps_per_epoch, global_batch, throughput):
        super().__init__()
        self.every_steps, self.steps_per_epoch = every_steps, steps_per_epoch
        self.global_batch, self.throughput = global_batch, throughput
        self.images_per_step = throughput.batch_size * throughput.world_size
        self.writer = tf.summary.create_file_writer(train_log_dir)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch * self.steps_per_epoch + batch + 1
        if step % self.every_steps:
            return
        with self.writer.as_default(step=step):
            tf.summary.scalar("learning_rate",
                              float(self.model.optimizer.learning_rate.numpy()))
            tf.summary.scalar("global_batch_size", self.global_batch)
            recent = self.throughput.step_seconds[-self.every_steps:]
            if recent:
                tf.summary.scalar("images_per_sec",
                                  self.images_per_step * len(recent) / sum(recent))

    def on_train_end(self, logs=None):
        self.writer.flush()


class ValidationSlices(keras.callbacks.Callback):
    """Each epoch, one validation volume's middle inline, crossline and time slice (a 2D
    section: itself), seismic, label and the model's prediction side by side, as an image
    in TensorBoard's run `slices` (segmentation only; a run of its own, as a second writer
    in Keras' validation folder can take its event file's name)."""

    def __init__(self, model_dir, seismic, label, whole_examples=lambda examples: examples,
                 channel=0):
        """`model_dir` None: only help put the volume together (`whole_examples`: a batch of
        this rank's parts of examples to the whole ones, a collective); `channel`, the
        input's channel drawn."""
        super().__init__()
        self.seismic, self.label, self.whole_examples = seismic, label, whole_examples
        self.channel = channel
        self.writer = (tf.summary.create_file_writer(os.path.join(log_dir(model_dir), "slices"))
                       if model_dir else None)

    def on_epoch_end(self, epoch, logs=None):
        output, seismic, label = (self.whole_examples(tensor[tf.newaxis])[0].numpy() for tensor in (
            self.model(self.seismic[tf.newaxis], training=False)[0], self.seismic, self.label))
        if self.writer is None:
            return
        prediction = output[..., 0] if output.shape[-1] == 1 else output.argmax(-1)
        png = slices.figure_png(slices.columns(
            seismic[..., self.channel], label[..., 0] if label.ndim == output.ndim else label,
            prediction))
        # record_if: Keras' TensorBoard callback records only every --summary_steps steps
        with self.writer.as_default(step=epoch + 1), tf.summary.record_if(True):
            tf.summary.image("slices", tf.image.decode_png(png)[tf.newaxis])
        self.writer.flush()
