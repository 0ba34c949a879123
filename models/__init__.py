"""Pure Keras model builders, chosen by name. No Horovod here: app/ wraps what these build.

Every builder takes the number of outputs and a `normalization` layer factory (Keras 3's
BatchNormalization in one fused kernel by default, models.normalization), so that app/ can
swap in a synchronized batch norm without this package knowing about Horovod, and returns
the model as a list of blocks: functions from one tensor to the next, each making its
layers when called. A model is its blocks chained; the places between blocks, where one
tensor passes, are where a pipeline can cut it into stages (build(first_block=,
last_block=)). A stage built alone starts from the weights the whole model would have: the
blocks before it are built first in a graph that is thrown away, which draws the same random
numbers as building them (and allocates no weight).
"""

import collections

import numpy as np
import tensorflow as tf
import keras

from models import user
from models.cnn import pooled_cnn, small_cnn
from models.dense import float_dtype, linear, mlp
from models.normalization import FusedBatchNormalization
from models.resnet import resnet20, resnet50, resnet56, wide_resnet16_10
from models.resunet import resunet3d, resunet3d_small
from models.unet import unet2d, unet2d_small, unet3d, unet3d_small



class Builder(collections.namedtuple(
        "Builder", "blocks description task downsampling example_dataset recomputes",
        defaults=("classification", 1, "synthetic", False))):
    """A model: `blocks(num_outputs, normalization=...)` gives its list of blocks; `task`,
    what it predicts (a name of app.tasks' table: classification, regression, segmentation);
    `downsampling`, by how much it divides its input's spatial extents (which must be
    divisible by it); `example_dataset`, a generated data set of the inputs it takes (the
    benchmarks'); `recomputes`, whether `blocks(..., recompute=True)` recomputes parts of
    its blocks in the backward pass itself (else pipeline stages recompute whole ones)."""


BUILDERS = {
    "linear": Builder(linear, "Lab 1's neuron y = w*x + b", task="regression"),
    "mlp": Builder(mlp, "a multilayer perceptron"),
    "cnn": Builder(small_cnn, "two convolutions at full resolution, for 8x8 digits"),
    "pooled_cnn": Builder(pooled_cnn, "two convolution and pooling stages, for 28x28 images"),
    "resnet20": Builder(resnet20, "CIFAR ResNet-20 (He et al.)"),
    "resnet56": Builder(resnet56, "CIFAR ResNet-56 (He et al.)"),
    "wrn16_10": Builder(wide_resnet16_10, "WideResNet-16-10 (Zagoruyko and Komodakis)"),
    "resnet50": Builder(resnet50, "ImageNet ResNet-50 v1.5"),
    "unet3d": Builder(unet3d, "FaultSeg3D's 3D U-Net, 16-32-64-128 filters (Wu et al.)",
                      "segmentation", 8, "seismic_faults", True),
    "unet3d_small": Builder(unet3d_small, "a 3D U-Net of 8-16-32 filters, for CPUs",
                            "segmentation", 4, "seismic_faults", True),
    "resunet3d": Builder(resunet3d, "a 3D residual U-Net (Zhang et al.'s ResUNet), "
                         "16-32-64-128 filters, batch norm", "segmentation", 8, "topology"),
    "resunet3d_small": Builder(resunet3d_small, "a 3D residual U-Net of 8-16-32 filters, "
                               "for CPUs", "segmentation", 4, "topology"),
    "unet2d": Builder(unet2d, "the 2D U-Net for sections, 16-32-64-128 filters",
                      "segmentation", 8, "seismic_facies_sections", True),
    "unet2d_small": Builder(unet2d_small, "a 2D U-Net of 8-16-32 filters, for CPUs",
                            "segmentation", 4, "seismic_facies_sections", True),
}


def use_float64():
    """float64 weights and computation (the exactness runs), and float64 losses, metrics and
    optimizer variables, which Keras 3 makes of floatx rather than of the policy."""
    keras.mixed_precision.set_global_policy("float64")
    keras.config.set_floatx("float64")


def all_layers(layer):
    """`layer`'s layers, and theirs, all the way down (a U-Net level's convolutions, a
    model's inside a model): Keras 3 has no public walk of them."""
    for inner in getattr(layer, "layers", None) or getattr(layer, "inner", None) or ():
        yield inner
        yield from all_layers(inner)


def builder(name):
    """The Builder of --model=`name`: BUILDERS's, or for a user's own model (models.user:
    package.module:function or path/to/model.keras) one whose blocks and task the model
    tells once it is built (blocks_of, build)."""
    if not user.is_user_model(name):
        return BUILDERS[name]
    return Builder(None, f"the user's model {name}", task=None, example_dataset=None)


def build(name, input_shape, num_outputs, normalization=FusedBatchNormalization,
          seed=None, first_block=0, last_block=None, input_scaling=None, recompute=False,
          task=None, output_shape=None):
    """Returns the uncompiled Keras model `name` on inputs of `input_shape`, or the stage of
    it that runs blocks first_block to last_block (exclusive; None: to the end), which takes
    the tensor block `first_block` takes; its random initial weights from `seed` (None: from
    Keras' random state as it is). `input_scaling`, (scale, offset) per channel, makes the
    first layer normalize the inputs (the data source's, e.g. ImageNet's statistics);
    `recompute`, for a model that `recomputes`, recomputes parts of it in the backward
    pass. A user's model is checked to give `output_shape` per example (if given: what
    `task`, its name, needs: app.tasks.output_shape), and returned as it is
    where nothing goes before it. Raises user.UserModelError for a user's model that
    cannot be had or does not fit."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if user.is_user_model(name):
        return _user_stage(name, input_shape, num_outputs, first_block, last_block,
                           input_scaling, task, output_shape)
    extra = {"recompute": True} if recompute else {}
    blocks = builder(name).blocks(num_outputs, normalization=normalization, **extra)
    stage = range(len(blocks))[first_block:last_block]
    if first_block:
        with tf.Graph().as_default():
            before = keras.Input(input_shape)
            for block in blocks[:first_block]:
                before = block(before)
            input_shape = tuple(before.shape[1:])
    inputs = outputs = keras.Input(input_shape, dtype=float_dtype() if first_block else None)
    if input_scaling is not None and not first_block:
        outputs = _rescaling(input_scaling, input_shape)(outputs)
    for index in stage:
        outputs = blocks[index](outputs)
    whole = len(stage) == len(blocks)
    return keras.Model(inputs, outputs,
                       name=name if whole else f"{name}_blocks_{stage.start}_{stage.stop}")


def _user_stage(name, input_shape, num_outputs, first_block, last_block, input_scaling,
                task, output_shape):
    """build()'s for a user's model: the model as it is, or its layers between two of its
    crossings (the stage holds only their weights; the others go with the whole model)."""
    model = user.load(name, input_shape, num_outputs)
    if output_shape:
        user.check_outputs(model, output_shape, task)
    whole = (first_block, last_block) == (0, None)
    if not whole:
        crossings = user.crossings(model)
        stop = len(crossings) - 1 if last_block is None else last_block
        model = keras.Model(crossings[first_block], crossings[stop],
                            name=f"user_model_blocks_{first_block}_{stop}")
    if input_scaling is not None and not first_block:
        inputs = keras.Input(input_shape)
        model = keras.Model(inputs, model(_rescaling(input_scaling, input_shape)(inputs)),
                            name="user_model" if whole else model.name)
    return model


def _rescaling(input_scaling, input_shape):
    """keras.layers.Rescaling by a per-channel (scale, offset) spread over the whole input
    shape, because TensorFlow's CPU kernels broadcasting along a last axis of 3 are slower
    (BENCHMARKS.md, ImageNet preprocessing)."""
    scale, offset = (np.broadcast_to(np.asarray(values, np.float32), input_shape).copy()
                     for values in input_scaling)
    return keras.layers.Rescaling(scale, offset, dtype=float_dtype(), name="input_scaling")


def count_blocks(name):
    """How many blocks the project's model `name` has: at most that many pipeline stages (a
    user's model tells its own once built: blocks_of)."""
    return len(builder(name).blocks(1))


Block = collections.namedtuple("Block", "input_shape parameters flops")


def blocks_of(name, input_shape, num_outputs):
    """[Block(input shape, parameters, forward FLOPs per example)] of each of the model's
    blocks, worked out in a graph that is thrown away, without allocating any weight (a
    user's model's, between its crossings, once the model is built)."""
    if user.is_user_model(name):
        crossings = user.crossings(user.load(name, input_shape, num_outputs))
        blocks = [keras.Model(start, end) for start, end in zip(crossings, crossings[1:])]
        return [Block(tuple(block.input_shape[1:]), block.count_params(),
                      forward_flops(block, tuple(block.input_shape[1:]))) for block in blocks]
    with tf.Graph().as_default():
        blocks = builder(name).blocks(num_outputs)
        x, found = keras.Input(input_shape), []
        for block in blocks:
            shape = tuple(x.shape[1:])
            model = keras.Model(inputs := keras.Input(shape), block(inputs))
            found.append(Block(shape, model.count_params(), forward_flops(model, shape)))
            x = model(x)
        return found


def forward_flops(model, input_shape):
    """FLOPs of one example's forward pass through `model`, as TensorFlow's profiler counts
    the graph's ops."""
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, *input_shape], tf.float32)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph=graph, cmd="op", options=options).total_float_ops


def add_weight_decay(model, weight_decay):
    """Adds L2 weight decay, weight_decay * sum(||w||^2) / 2 over the kernels (not biases or
    normalization parameters), as a model loss; a kernel that has a regularizer of its own
    (a user's model's) keeps it."""
    if weight_decay > 0:
        for weight in model.trainable_weights:
            # Keras adds each regularizer's loss to the model's
            if "kernel" in weight.name and weight.regularizer is None:
                weight.regularizer = keras.regularizers.L2(weight_decay / 2)
