"""Callbacks of app.train beside Horovod's own: the LR schedule and a throughput meter."""
import math
import time

import numpy as np
import tensorflow as tf


def learning_rate_schedule(hvd, scaled_lr, *, warmup_epochs, schedule, epochs, steps_per_epoch,
                           decay_epochs=(), decay_factor=0.1):
    """Horovod's warmup (from scaled_lr / processes to scaled_lr over `warmup_epochs`), then
    Horovod's schedule callback holding `schedule` from the end of warmup to the last epoch.

    Both are Horovod's callbacks, so the LR is set on every rank alike and logged as `lr`."""
    callbacks = []
    if warmup_epochs:
        callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=scaled_lr, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch))
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


class Throughput(tf.keras.callbacks.Callback):
    """Training images per second over all processes, per epoch (validation excluded), added
    to the logs as `images_per_sec`; `mean()` leaves out the first epoch, which pays for
    tracing and warm-up, when there is more than one."""

    def __init__(self, global_batch, steps_per_epoch):
        super().__init__()
        self.images_per_epoch = global_batch * steps_per_epoch
        self.rates = []
        self._started = self._training_ended = None

    def on_epoch_begin(self, epoch, logs=None):
        self._started, self._training_ended = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        self._training_ended = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = (self._training_ended or time.perf_counter()) - self._started
        self.rates.append(self.images_per_epoch / seconds)
        if logs is not None:
            logs["images_per_sec"] = self.rates[-1]

    def mean(self):
        rates = self.rates[1:] if len(self.rates) > 1 else self.rates
        return float(np.mean(rates)) if rates else None
