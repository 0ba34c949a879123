"""Optimizers by name. They are the tf.keras legacy optimizers, which Horovod 0.28.1's Keras
layer was written for: their LR and momentum are variables, so LearningRateWarmupCallback can
apply its momentum correction."""
import tensorflow as tf


def build(name, learning_rate, momentum=0.0):
    legacy = tf.keras.optimizers.legacy
    if name == "sgd":
        return legacy.SGD(learning_rate)
    if name == "momentum":
        return legacy.SGD(learning_rate, momentum=momentum)
    if name == "adam":
        return legacy.Adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def create_slots(optimizer, variables):
    """Creates the optimizer's variables (iterations, momentum or moment slots) now, which
    legacy Keras optimizers defer to their first step: Horovod's elastic sync broadcasts
    them, so a worker that joins a running job must already hold the same ones."""
    optimizer._create_all_weights(variables)
