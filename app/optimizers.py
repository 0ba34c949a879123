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
