"""Checkpoints of model and optimizer after every epoch, and resume from the latest one.

tf.train.CheckpointManager writes each checkpoint's files first and only then points its
`checkpoint` index at them (an atomic rename), so a run stopped at any moment, mid-save
included, finds its last complete epoch. Each checkpoint also records the global batch it
was trained with, so that a run resumed on another number of processes keeps it."""
import os

import tensorflow as tf

KEEP = 3
_GLOBAL_BATCH_KEY = "global_batch_size/.ATTRIBUTES/VARIABLE_VALUE"


class MismatchError(ValueError):
    """A checkpoint that does not fit the model being built."""


def manager(model, optimizer, model_dir):
    """Saves model, optimizer and the global batch (see set_global_batch) under model_dir."""
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     global_batch_size=tf.Variable(0, dtype=tf.int64))
    return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, "checkpoints"),
                                      max_to_keep=KEEP, checkpoint_name="epoch")


def set_global_batch(checkpoint_manager, global_batch):
    """The global batch the next checkpoints record (it changes when an elastic job resizes)."""
    checkpoint_manager.checkpoint.global_batch_size.assign(global_batch)


def latest(model_dir):
    """(epochs done, global batch) of the latest checkpoint in `model_dir` (saved as epoch-N
    after N epochs), (0, 0) if there is none."""
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if not path:
        return 0, 0
    return int(path.rsplit("-", 1)[1]), int(tf.train.load_variable(path, _GLOBAL_BATCH_KEY))


def broadcast_latest(model_dir, hvd):
    """latest() of rank 0, on every rank (Horovod's broadcast: every rank calls it), so that
    all resume from the same checkpoint."""
    state = latest(model_dir) if hvd.rank() == 0 else (0, 0)
    return tuple(int(value) for value in hvd.broadcast(
        tf.constant(state, tf.int64), root_rank=0, name="resume_state"))


def restore(checkpoint_manager, epochs):
    """Restores the checkpoint taken after `epochs` epochs. The optimizer's slots do not exist
    until its first step; TensorFlow restores them when they are created."""
    path = os.path.join(checkpoint_manager.directory, f"epoch-{epochs}")
    _restore_matching(checkpoint_manager.checkpoint, path)


def initialize_from(model, path):
    """Starts `model` from the model weights of another run's checkpoint, and nothing else:
    they are read into an uncompiled twin, whose weights are then copied (restoring into
    `model` itself would also restore its optimizer's state, now or once it is created)."""
    twin = tf.keras.models.clone_model(model)
    _restore_matching(tf.train.Checkpoint(model=twin), path, expect_partial=True)
    model.set_weights(twin.get_weights())


def _restore_matching(checkpoint, path, expect_partial=False):
    try:
        status = checkpoint.restore(path)
        if expect_partial:
            status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise MismatchError(f"{path} does not match this model: {first_line}") from None


class SaveEveryEpoch(tf.keras.callbacks.Callback):
    def __init__(self, checkpoint_manager):
        super().__init__()
        self.checkpoint_manager = checkpoint_manager

    def on_epoch_end(self, epoch, logs=None):
        self.checkpoint_manager.save(checkpoint_number=epoch + 1)
