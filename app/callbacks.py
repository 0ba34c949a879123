"""Callbacks of app.train beside Horovod's own: the LR schedule and a throughput meter."""
import math
import time

import numpy as np
import keras
import tensorflow as tf

from app import cli


def learning_rate_schedule(hvd, scaled_lr, *, reference_lr, warmup_epochs, schedule, epochs,
                           steps_per_epoch, decay_epochs=(), decay_factor=0.1):
    """Horovod's schedule callbacks: a gradual warmup from `reference_lr` (the LR at the
    reference batch) to `scaled_lr` over `warmup_epochs` (Goyal et al.), then `schedule` from
    the end of warmup to the last epoch.

    Both depend on the global batch only, so that a run follows the same LR at every step on
    any number of processes; Horovod's own LearningRateWarmupCallback starts at LR /
    processes instead. Horovod's callbacks set the LR on every rank alike, correct the
    momentum for its changes and log it as `lr`."""
    callbacks = []
    if warmup_epochs:
        callbacks.append(hvd.callbacks.LearningRateScheduleCallback(
            initial_lr=scaled_lr, multiplier=warmup_multiplier(scaled_lr, reference_lr,
                                                               warmup_epochs, steps_per_epoch),
            start_epoch=0, end_epoch=warmup_epochs, staircase=False,
            steps_per_epoch=steps_per_epoch))
    if schedule == "constant":
        multiplier, staircase = (lambda epoch: 1.0), True
    elif schedule == "step":
        def multiplier(epoch):
            return decay_factor ** sum(epoch >= boundary for boundary in decay_epochs)
        staircase = True
    else:
        def multiplier(epoch):
            progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        staircase = False
    callbacks.append(hvd.callbacks.LearningRateScheduleCallback(
        initial_lr=scaled_lr, multiplier=multiplier, start_epoch=warmup_epochs,
        staircase=staircase, steps_per_epoch=steps_per_epoch))
    return callbacks


def learning_rate_before(schedule, epoch, steps_per_epoch, scaled_lr, step=0):
    """The LR `schedule` (learning_rate_schedule's callbacks) set for the step before step
    `step` of `epoch`, `scaled_lr` before the first: the optimizer's LR as an uninterrupted
    run leaves it there. A run resumed there starts from it, so that Horovod's momentum
    correction of its first step (by the new LR over the optimizer's) is the uninterrupted
    run's."""
    last_epoch, last_step = (epoch, step - 1) if step else (epoch - 1, steps_per_epoch - 1)
    learning_rate = scaled_lr
    for callback in schedule:
        if last_epoch >= callback.start_epoch and (callback.end_epoch is None
                                                   or last_epoch < callback.end_epoch):
            at = last_epoch if callback.staircase else last_epoch + last_step / steps_per_epoch
            learning_rate = callback.initial_lr * callback.multiplier(at)
    return learning_rate


def warmup_multiplier(scaled_lr, reference_lr, warmup_epochs, steps_per_epoch):
    """The warmup's fraction of `scaled_lr` at a (fractional) epoch: linear from
    reference_lr / scaled_lr at the first step to 1 at the last step of warmup, counting each
    step as done (as Horovod's warmup does, so that it ends exactly at scaled_lr). Flat at 1
    when the scaled LR is not above the reference's: there is nothing to warm up to."""
    start = min(reference_lr / scaled_lr, 1.0) if scaled_lr > 0 else 1.0

    def multiplier(epoch):
        done = min((epoch + 1.0 / steps_per_epoch) / warmup_epochs, 1.0)
        return start + (1.0 - start) * done
    return multiplier


class Throughput(keras.callbacks.Callback):
    """Training images per second of this process, from the time between consecutive
    training steps, so that validation, checkpoints and epoch ends are left out, after the
    first `warmup_steps` steps (tracing, first allreduces, pipeline fill).

    With steps_per_execution > 1 Keras calls it once per execution, with the index of the
    execution's last step: the execution's time is shared among its steps.
    Each epoch adds `images_per_sec` to the logs: this process's rate times `world_size`.
    It also adds up the process's CPU time (user and system, all its threads) over the same
    steps: what other load on a shared machine slows, but does not inflate."""

    WINDOW = 10  # steps per window; the spread is that of the windows' rates

    def __init__(self, batch_size, world_size, warmup_steps):
        super().__init__()
        self.batch_size, self.world_size, self.warmup_steps = batch_size, world_size, warmup_steps
        self.step_seconds, self.cpu_seconds = [], 0.0
        self._steps_done, self._epoch_steps, self._last_step_end = 0, 0, None
        self._last_cpu, self._epoch_start = None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._last_step_end, self._epoch_steps = None, 0
        self._epoch_start = len(self.step_seconds)

    def on_train_batch_end(self, batch, logs=None):
        now, cpu = time.perf_counter(), time.process_time()
        steps = batch + 1 - self._epoch_steps
        if self._last_step_end is not None and self._steps_done >= self.warmup_steps:
            self.step_seconds += [(now - self._last_step_end) / steps] * steps
            self.cpu_seconds += cpu - self._last_cpu
        self._last_step_end, self._last_cpu = now, cpu
        self._steps_done += steps
        self._epoch_steps = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        epoch_seconds = self.step_seconds[self._epoch_start:]
        if logs is not None and epoch_seconds:
            logs["images_per_sec"] = (self.world_size * self.batch_size * len(epoch_seconds)
                                      / sum(epoch_seconds))

    def images_per_sec(self):
        """Mean rate of this process over all measured steps, None if none was measured."""
        if not self.step_seconds:
            return None
        return self.batch_size * len(self.step_seconds) / sum(self.step_seconds)

    def cpu_seconds_per_image(self):
        """This process's CPU seconds per image it trained over the measured steps."""
        if not self.step_seconds:
            return None
        return self.cpu_seconds / (self.batch_size * len(self.step_seconds))

    def window_rates(self):
        """Rates over consecutive windows of WINDOW steps (the last partial one dropped)."""
        windows = len(self.step_seconds) // self.WINDOW
        seconds = np.array(self.step_seconds[:windows * self.WINDOW]).reshape(windows, self.WINDOW)
        return self.batch_size * self.WINDOW / seconds.sum(axis=1)


class ExactValidationMetrics(keras.callbacks.Callback):
    """Makes each epoch's validation metrics those of all the examples the ranks evaluated:
    every Keras metric that is a running mean (the loss, accuracy, MAE: a `total` and a
    `count`) has its sums and counts added up over the ranks with `sum_over_ranks` (a
    collective: every rank calls it), and its `val_` log becomes their quotient; a metric of
    `counts` (models.segmentation.ConfusionCounts: voxel counts) has them added up, and its
    `val_` logs become the scores of the sums.

    Horovod's MetricAverageCallback averages the ranks' means, which is the mean over the
    whole split only when every rank evaluated as many examples; the ranks' shards of a
    validation split differ when the split does not divide evenly (by example or by file).
    Put it after MetricAverageCallback, which still averages the training metrics: every
    rank runs the same steps at the same batch, so their mean is exact."""

    def __init__(self, sum_over_ranks):
        super().__init__()
        self.sum_over_ranks = sum_over_ranks

    def on_epoch_end(self, epoch, logs=None):
        # After validation, Keras' metric objects hold the validation run's sums.
        logs = {} if logs is None else logs
        metrics = _flat_metrics(self.model)
        means = [metric for metric in metrics
                 if f"val_{metric.name}" in logs
                 and hasattr(metric, "total") and hasattr(metric, "count")]
        counted = [metric for metric in metrics if hasattr(metric, "counts")
                   and any(name.startswith("val_") for name in logs)]
        if not means and not counted:
            return
        sums = self.sum_over_ranks(tf.concat(
            [tf.cast(tf.stack([metric.total.value, metric.count.value]), tf.float64)
             for metric in means]
            + [tf.reshape(metric.counts.value, [-1]) for metric in counted], axis=0)).numpy()
        for index, metric in enumerate(means):
            total, count = sums[2 * index:2 * index + 2]
            logs[f"val_{metric.name}"] = float(total / count) if count else float("nan")
        offset = 2 * len(means)
        for metric in counted:
            size = int(tf.size(metric.counts))
            metric.counts.assign(sums[offset:offset + size].reshape(metric.counts.shape))
            offset += size
            for name, value in metric.result().items():
                logs[f"val_{name}"] = float(value)


def _flat_metrics(model):
    """The model's metric objects: Keras 3 holds the compiled ones in a container metric."""
    return [inner for metric in model.metrics for inner in getattr(metric, "metrics", [metric])]


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Ends training at the end of the epoch whose loss (averaged over the ranks by
    Horovod's MetricAverageCallback, which must come before this one) is not finite, by
    raising NonFiniteLoss naming the first bad step over all ranks. Raising before the
    checkpoint callback runs keeps the last good checkpoint the latest.

    Deciding on the averaged epoch loss, not on each rank's batch loss, makes every rank stop
    at the same point: a NaN on one rank reaches the others through the averaged gradients
    one step later, so their own first bad steps can differ by one."""

    def __init__(self, gather, steps_per_epoch):
        super().__init__()
        self.gather, self.steps_per_epoch = gather, steps_per_epoch
        self._epoch, self._first_bad_step = 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._first_bad_step is None and not math.isfinite(float(logs["loss"])):
            self._first_bad_step = self._epoch * self.steps_per_epoch + batch + 1

    def on_epoch_end(self, epoch, logs=None):
        if math.isfinite(float(logs["loss"])):
            return
        local = self._first_bad_step or (epoch + 1) * self.steps_per_epoch
        first = int(np.min(self.gather(tf.constant([local], tf.int64))))
        raise NonFiniteLoss(f"{cli.DIVERGED} {float(logs['loss'])} at step {first} "
                            f"(epoch {epoch + 1}, step {first - epoch * self.steps_per_epoch}); "
                            f"the checkpoints keep the epochs before it")


class UpdateEpochState(keras.callbacks.Callback):
    """Records each finished epoch in Horovod's elastic state, for a run whose fit() is given
    initial_epoch=state.epoch: Keras' epoch numbers are then those of the whole run, which
    checkpoints, logs and LR schedules need. (hvd.elastic.UpdateEpochStateCallback counts
    from 0 at every restart instead.) Put it just before CommitStateCallback, so that the
    epoch end's commit holds the finished epoch."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch = epoch + 1


class TimeToAccuracy(keras.callbacks.Callback):
    """Adds `wall_seconds`, the training time so far, to every epoch's logs, and ends
    training after the epoch whose validation `metric` (app.tasks' headline: accuracy, IoU,
    mean IoU, a compliance ratio) reaches `target_accuracy` or in which `time_budget`
    seconds ran out (either may be None).

    Every rank must stop after the same epoch: the metric is the one MetricAverageCallback
    and ExactValidationMetrics leave on every rank (they must come first), and the clock is
    rank 0's, sent to all by `broadcast`. `at_target(value, target)` says whether the
    metric's value is at the target (app.tasks.reached: at least it, or at most it for an
    error).
    `reached` holds (epoch, seconds) of the first epoch at the target."""

    def __init__(self, target_accuracy, metric, time_budget, broadcast, at_target):
        super().__init__()
        self.target_accuracy, self.metric, self.at_target = target_accuracy, metric, at_target
        self.time_budget, self.broadcast = time_budget, broadcast
        self.reached, self._started = None, None

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["wall_seconds"] = time.perf_counter() - self._started
        if self.time_budget is not None:
            logs["wall_seconds"] = float(self.broadcast(tf.constant(logs["wall_seconds"])))
        if (self.target_accuracy is not None and self.reached is None
                and f"val_{self.metric}" in logs
                and self.at_target(logs[f"val_{self.metric}"], self.target_accuracy)):
            self.reached = (epoch + 1, logs["wall_seconds"])
            self.model.stop_training = True
        if self.time_budget is not None and logs["wall_seconds"] >= self.time_budget:
            self.model.stop_training = True
