"""Pure Keras model builders, chosen by name. No Horovod here: app/ wraps what these build.

Every builder takes the input shape, the number of outputs and a `normalization` layer
factory (BatchNormalization by default), so that app/ can swap in a synchronized batch norm
without this package knowing about Horovod.
"""
import tensorflow as tf
import tf_keras as keras

from models.cnn import pooled_cnn, small_cnn
from models.dense import linear, mlp
from models.resnet import resnet20, resnet50, resnet56, wide_resnet16_10

BUILDERS = {
    "linear": linear,
    "mlp": mlp,
    "cnn": small_cnn,
    "pooled_cnn": pooled_cnn,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "wrn16_10": wide_resnet16_10,
    "resnet50": resnet50,
}


def build(name, input_shape, num_outputs, normalization=keras.layers.BatchNormalization):
    """Returns the uncompiled Keras model `name`."""
    return BUILDERS[name](input_shape, num_outputs, normalization=normalization)


def compile_for_task(model, optimizer, task, steps_per_execution=1):
    """Compiles with the loss and metrics of `task`: classification (softmax outputs, integer
    labels: cross-entropy and accuracy) or regression (MSE and MAE)."""
    loss, metrics = (("mse", ["mae"]) if task == "regression"
                     else ("sparse_categorical_crossentropy", ["accuracy"]))
    model.compile(optimizer, loss=loss, metrics=metrics, steps_per_execution=steps_per_execution)


def add_weight_decay(model, weight_decay):
    """Adds L2 weight decay, weight_decay * sum(||w||^2) / 2 over the kernels (not biases or
    normalization parameters), as a model loss."""
    kernels = [w for w in model.trainable_weights if "kernel" in w.name]
    if weight_decay > 0 and kernels:
        model.add_loss(lambda: weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in kernels]))
