"""Checkpoints of model and optimizer after every epoch, and resume from the latest one.

tf.train.CheckpointManager writes each checkpoint's files first and only then points its
`checkpoint` index at them, so a run stopped mid-save still finds its last complete epoch."""
import os

import tensorflow as tf

KEEP = 3


def manager(model, optimizer, model_dir):
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, "checkpoints"),
                                      max_to_keep=KEEP, checkpoint_name="epoch")


def completed_epochs(model_dir):
    """Epochs done by the latest checkpoint in `model_dir` (saved as epoch-N after N epochs),
    0 if there is none."""
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def restore(checkpoint_manager, epochs):
    """Restores the checkpoint taken after `epochs` epochs. The optimizer's slots do not exist
    until its first step; TensorFlow restores them when they are created."""
    path = os.path.join(checkpoint_manager.directory, f"epoch-{epochs}")
    checkpoint_manager.checkpoint.restore(path).assert_existing_objects_matched()


class SaveEveryEpoch(tf.keras.callbacks.Callback):
    def __init__(self, checkpoint_manager):
        super().__init__()
        self.checkpoint_manager = checkpoint_manager

    def on_epoch_end(self, epoch, logs=None):
        self.checkpoint_manager.save(checkpoint_number=epoch + 1)
