"""U-Nets for dense prediction: FaultSeg3D's simplified 3D U-Net (Wu et al., Geophysics
2019) for seismic volumes, and its 2D form for sections (Alaudah et al.'s section-based
facies setting). Each level is two `same` convolutions with ReLU; the encoder max-pools by 2,
the decoder upsamples by 2 and concatenates the encoder's level; a 1x1 convolution gives a
sigmoid (one output: faults) or a softmax (several: facies), in float32 under mixed
precision. The model is one block: the skip connections pass several tensors between its
levels, so a pipeline cannot cut it.
"""
import tensorflow as tf
import keras

from models.dense import float_dtype

FAULTSEG3D_WIDTHS = (16, 32, 64, 128)


class MaxPooling3D(keras.layers.Layer):
    """Max pooling by 2 along each spatial axis: TensorFlow's MaxPool3D (oneDNN's kernel on
    CPUs), and in float64, which it has no kernel for (the exactness tests), the maximum of
    neighbouring planes axis by axis, whose slices cost as much as the U-Net's convolutions
    (BENCHMARKS.md); the extents must be even, as the U-Net's are."""

    def call(self, inputs):
        if inputs.dtype != tf.float64:
            return tf.nn.max_pool3d(inputs, ksize=2, strides=2, padding="VALID")
        pooled = inputs
        for axis in (1, 2, 3):
            even, odd = ([slice(None)] * 5 for _ in range(2))
            even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
            pooled = tf.maximum(pooled[tuple(even)], pooled[tuple(odd)])
        return pooled


class Level(keras.layers.Layer):
    """A U-Net level: its convolutions run one after the other. With `recompute`, under
    tf.recompute_grad: the level keeps its input, not its activations, and recomputes those
    in the backward pass (one more forward). A level is one layer whether it recomputes or
    not, so that checkpoints have one layout with and without --recompute. The layers are
    built first: recompute_grad cannot create variables."""

    def __init__(self, layers, recompute=False, **kwargs):
        super().__init__(**kwargs)
        # a tuple: TensorFlow's checkpoints track a tuple's layers (inner/0, inner/1, as
        # tf_keras did), not those of the list Keras 3 makes of a list
        self.inner, self.recompute = tuple(layers), recompute

    def build(self, input_shape):
        shape = input_shape
        for layer in self.inner:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        super().build(input_shape)

    def call(self, inputs):
        def forward(x):
            for layer in self.inner:
                x = layer(x)
            return x
        return tf.recompute_grad(forward)(inputs) if self.recompute else forward(inputs)

    def get_config(self):
        """The inner layers as objects: Keras' clone_model (--init_checkpoint's twin) works
        from configs in memory, and from_config copies each from its own config."""
        return {**super().get_config(), "layers": self.inner, "recompute": self.recompute}

    @classmethod
    def from_config(cls, config):
        copies = [type(layer).from_config(layer.get_config()) for layer in config["layers"]]
        return cls(**{**config, "layers": copies})

    def compute_output_shape(self, input_shape):
        shape = input_shape
        for layer in self.inner:
            shape = layer.compute_output_shape(shape)
        return shape


def unet(num_outputs, normalization=None, dimensions=3, widths=FAULTSEG3D_WIDTHS,
         recompute=False):
    """Blocks: the whole U-Net, `len(widths)` levels of `widths` filters; the input's
    extent along every spatial axis must be divisible by 2 ** (levels - 1). `recompute`:
    each encoder and decoder level keeps only its input for the backward pass (Level), so
    that a level's inner activation is not held."""
    del normalization  # FaultSeg3D's U-Net has none
    convolution = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[dimensions]
    pooling = {2: keras.layers.MaxPooling2D, 3: lambda size: MaxPooling3D()}[dimensions]
    upsampling = {2: keras.layers.UpSampling2D, 3: keras.layers.UpSampling3D}[dimensions]

    def level(x, width):
        return Level([convolution(width, 3, padding="same", activation="relu")
                      for _ in range(2)], recompute)(x)

    def whole(x):
        skips = []
        for width in widths[:-1]:
            x = level(x, width)
            skips.append(x)
            x = pooling(2)(x)
        x = level(x, widths[-1])
        for width, skip in zip(reversed(widths[:-1]), reversed(skips)):
            x = level(keras.layers.Concatenate()([upsampling(2)(x), skip]), width)
        activation = "sigmoid" if num_outputs == 1 else "softmax"
        return convolution(num_outputs, 1, activation=activation, dtype=float_dtype())(x)
    return [whole]


def unet3d(num_outputs, normalization=None, recompute=False):
    """FaultSeg3D's 3D U-Net: 16-32-64-128 filters, 1,459,585 parameters with one output."""
    return unet(num_outputs, normalization, dimensions=3, recompute=recompute)


def unet3d_small(num_outputs, normalization=None, recompute=False):
    """An 8-16-32 3D U-Net, for the CPUs here."""
    return unet(num_outputs, normalization, dimensions=3, widths=(8, 16, 32),
                recompute=recompute)


def unet2d(num_outputs, normalization=None, recompute=False):
    """The 2D U-Net for sections, FaultSeg3D's widths."""
    return unet(num_outputs, normalization, dimensions=2, recompute=recompute)


def unet2d_small(num_outputs, normalization=None, recompute=False):
    """An 8-16-32 2D U-Net, for the CPUs here."""
    return unet(num_outputs, normalization, dimensions=2, widths=(8, 16, 32),
                recompute=recompute)
