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

import tensorflow as tf

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a signal, with a checkpoint of the step it stopped at."""


class StopOnSignal(tf.keras.callbacks.Callback):
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


class ResumeAt:
    """Starts Keras' fit at step `step` of its initial epoch, as model._training_state:
    Keras has no public way to, and this is the hook its own BackupAndRestore sets."""

    def __init__(self, epoch, step):
        self.epoch, self.step = epoch, step

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch, initial_epoch, mode=None):
        return self.epoch, self.step
