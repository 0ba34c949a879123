"""Preemption and time limits: SIGTERM (what SLURM sends at the time limit or on preemption)
or SIGUSR1 (SLURM's `--signal=USR1@SECONDS`, sent ahead of it) reaching any rank stops every
rank at the same step, with a checkpoint of that step, and the exit code PREEMPTED, which a
job script can take as "requeue me" (scripts/slurm/*.sbatch do).

Keras' BackupAndRestore saves every N steps on every worker of a tf.distribute strategy, and
the TF Model Garden's preemption handling needs a tf.distribute cluster's coordination
service; with Horovod, the ranks agree through an allgather of the signal every
`check_steps` steps instead, so that they all stop at the same step and rank 0 alone saves.
"""
import math
import signal

import keras

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a signal, with a checkpoint of the step it stopped at."""


class StopOnSignal(keras.callbacks.Callback):
    """Records SIGNALS during fit; every `check_steps` steps, `agree(signal number or 0)`
    returns the largest over the ranks, and a non-zero one makes every rank call
    `save(epochs done, steps done)` (rank 0 writes and returns the path), wait for the
    others with `agree(0)`, and raise Preempted. The last step of an epoch is not a stop:
    the epoch's validation, checkpoint and logs come first, then the next check. Where the
    checks are an epoch or more apart (none falls within one), every epoch after the first
    begins with one instead, so that a signal is always acted on.

    With `accumulation_steps` batches per update, `check_steps` is rounded up to a multiple
    of them: a stop then follows an update, when no gradients are held between batches
    (Horovod's aggregation and the sharded optimizer's accumulators are not checkpointed)."""

    def __init__(self, agree, save, steps_per_epoch, check_steps=1, accumulation_steps=1):
        super().__init__()
        self.agree, self.save = agree, save
        self.steps_per_epoch = steps_per_epoch
        self.check_steps = math.ceil(check_steps / accumulation_steps) * accumulation_steps
        self._received, self._previous, self._epoch = 0, {}, 0
        self._epoch_ended = False

    def on_train_begin(self, logs=None):
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, self._record)

    def _record(self, number, frame):
        self._received = number

    def on_epoch_begin(self, epoch, logs=None):
        if self._epoch_ended and self.check_steps >= self.steps_per_epoch:
            # no check within an epoch; the epoch before is saved: nothing more to save
            received = self.agree(self._received)
            if received:
                raise Preempted(f"stopped by {signal.Signals(received).name} after epoch "
                                f"{epoch}, saved; the same command resumes there")
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_ended = True

    def on_train_batch_end(self, batch, logs=None):
        steps_done = batch + 1
        if steps_done % self.check_steps or steps_done == self.steps_per_epoch:
            return
        received = self.agree(self._received)
        if not received:
            return
        path = self.save(self._epoch, steps_done)
        self.agree(0)  # every rank waits until rank 0 has written the checkpoint
        raise Preempted(f"stopped by {signal.Signals(received).name} at epoch "
                        f"{self._epoch + 1}, step {steps_done}: saved {path}; the same command "
                        f"resumes there")

    def on_train_end(self, logs=None):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class ResumedCallbacks(keras.callbacks.CallbackList):
    """The callbacks of a run resumed at step `first_step` of an epoch, for the two fit()
    calls of fit_from_step(): they see one training, its first epoch's batches numbered
    from `first_step`, begun and ended once. Keras 3's fit() starts only at an epoch."""

    def __init__(self, callbacks, first_step, **arguments):
        super().__init__(callbacks, **arguments)
        self.offset = first_step
        self._begun, self._last_epoch = False, None

    def on_train_begin(self, logs=None):
        if not self._begun:
            self._begun = True
            super().on_train_begin(logs)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch + self.offset, logs)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch + self.offset, logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.offset, self._last_epoch = 0, epoch

    def on_train_end(self, logs=None):
        if self.model.stop_training or self._last_epoch + 1 >= self.params["epochs"]:
            super().on_train_end(logs)


def fit_from_step(trainer, first_epoch, first_step, batches, *, steps_per_epoch, epochs,
                  callbacks, verbose, **fit_arguments):
    """trainer.fit() from step `first_step` of epoch `first_epoch` to `epochs`; `batches`:
    the training data from there, then (resumed mid-epoch) from the next epoch's start.
    Returns the history."""
    if not first_step:
        return trainer.fit(batches[0], steps_per_epoch=steps_per_epoch, epochs=epochs,
                           initial_epoch=first_epoch, callbacks=callbacks, verbose=verbose,
                           **fit_arguments)
    resumed = ResumedCallbacks(callbacks, first_step, add_history=True,
                               add_progbar=verbose != 0, verbose=verbose, epochs=epochs,
                               steps=steps_per_epoch, model=trainer)
    trainer.fit(batches[0], steps_per_epoch=steps_per_epoch - first_step,
                epochs=first_epoch + 1, initial_epoch=first_epoch, callbacks=resumed,
                **fit_arguments)
    if first_epoch + 1 < epochs and not trainer.stop_training:
        trainer.fit(batches[1], steps_per_epoch=steps_per_epoch, epochs=epochs,
                    initial_epoch=first_epoch + 1, callbacks=resumed, **fit_arguments)
    return trainer.history
