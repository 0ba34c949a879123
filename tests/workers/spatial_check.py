"""Run under mpirun -np P: each model split into P slabs (app.parallel.spatial.split_model),
computing in float64 or under the Keras policy POLICY (mixed_bfloat16), against the whole model in
float64 on the whole batch, which every rank also computes alone: the slab of the output,
the gradient of a loss on the output with respect to every weight (summed over the ranks)
and to the slab of the input; and the split model's Keras clone (what --init_checkpoint
reads into) against the split model. Writes each case's largest relative errors to
OUT_DIR/rank-R.json.

    mpirun -np P python tests/workers/spatial_check.py OUT_DIR [POLICY]
"""
import json
import os
import sys

import numpy as np

from app.horovod import hvd, keras, tf  # first: it sets TF_XLA_FLAGS

import models
from app.parallel import spatial
from models.unet import MaxPooling3D


def convolution_stack_3d(shape):
    """Kernels 3 and 5, a strided convolution, pooling and upsampling, a `valid` strided
    convolution of one plane along the slabs' axis, a 1x1 output."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv3D(3, 5, padding="same", activation="tanh")(x)
    x = keras.layers.Conv3D(4, 3, strides=2, padding="same", activation="relu")(x)
    x = MaxPooling3D()(x)
    x = keras.layers.Conv3D(4, (3, 1, 3), padding="same")(x)
    x = keras.layers.UpSampling3D(4)(x)
    x = keras.layers.Conv3D(4, (1, 3, 3), strides=(2, 1, 1), padding="valid")(x)
    x = keras.layers.UpSampling3D((2, 1, 1))(x)
    return keras.Model(inputs, keras.layers.Conv3D(2, 1, activation="softmax")(x))


def convolution_stack_2d(shape):
    """Batch normalization over the slabs too, Keras' pooling, a strided kernel of 4 and a
    dilated kernel (both asymmetric about their centre plane)."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 4, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", activation="relu")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Conv2D(4, 5, padding="same")(x)
    x = keras.layers.UpSampling2D(4)(x)
    x = keras.layers.Concatenate()([x, inputs])
    return keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))


def unet(name):
    def build(shape):
        return models.build(name, shape, 1, seed=5)
    return build


CASES = {  # name: (builder, the whole example's shape), at every P of 2 and 4
    "stack3d": (convolution_stack_3d, (16, 8, 8, 1)),
    "stack2d": (convolution_stack_2d, (32, 8, 2)),
    "unet3d": (unet("unet3d"), (32, 8, 8, 1)),
    "unet3d_recompute": (lambda shape: models.build("unet3d_small", shape, 1, seed=5,
                                                    recompute=True), (16, 8, 8, 1)),
}


def relative_error(found, expected, scale=1e-300):
    """The largest difference relative to the largest expected value (at least `scale`:
    a gradient that is 0 but for rounding, a bias's before a batch norm, is judged by the
    others')."""
    found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(found - expected)) / max(np.max(np.abs(expected)), scale))


def check(builder, shape, policy):
    part, parts = hvd.rank(), hvd.size()
    keras.utils.set_random_seed(7)
    whole = builder(shape)
    batch = tf.random.stateless_normal([2, *shape], [1, 2], dtype=tf.float64)
    weights = tf.random.stateless_normal([2, *whole.output_shape[1:]], [3, 4], dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(batch)
        output = whole(batch, training=True)
        loss = tf.reduce_sum(output * weights)
    expected = [tape.gradient(loss, whole.trainable_variables), tape.gradient(loss, batch)]

    source = whole
    if policy != "float64":  # the same model and weights computing under `policy`
        keras.mixed_precision.set_global_policy(policy)
        source = builder(shape)
        source.set_weights(whole.get_weights())
        keras.mixed_precision.set_global_policy("float64")
    split = spatial.split_model(source, part, parts, hvd.global_process_set)
    rows = slice(part * shape[0] // parts, (part + 1) * shape[0] // parts)
    slab = tf.cast(batch[:, rows], split.inputs[0].dtype)
    with tf.GradientTape() as tape:
        tape.watch(slab)
        slab_output = split(slab, training=True)
        slab_loss = tf.reduce_sum(slab_output * tf.cast(weights[:, rows], slab_output.dtype))
    found = tape.gradient(slab_loss, [split.trainable_variables, slab])
    clone = keras.models.clone_model(split)
    clone.set_weights(split.get_weights())
    summed = [hvd.allreduce(gradient, op=hvd.Sum) for gradient in found[0]]
    scale = 1e-3 * max(float(np.max(np.abs(gradient))) for gradient in expected[0])
    return {"output": relative_error(slab_output, output[:, rows]),
            "weights": max(relative_error(f, e, scale) for f, e in zip(summed, expected[0])),
            "input": relative_error(found[1], expected[1][:, rows]),
            "clone": relative_error(clone(slab, training=True), slab_output),
            "variables": [v.name for v in split.variables] == [v.name for v in source.variables],
            "slab_shape": list(split.input_shape[1:])}


def main(out_dir, policy="float64"):
    hvd.init()
    keras.mixed_precision.set_global_policy("float64")
    tf.config.experimental.enable_op_determinism()
    errors = {name: check(*case, policy) for name, case in CASES.items()}
    with open(os.path.join(out_dir, f"rank-{hvd.rank()}.json"), "w") as out:
        json.dump(errors, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
