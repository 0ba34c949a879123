"""A residual encoder-decoder for dense prediction in 3D: Zhang, Liu and Wang's deep residual
U-Net (ResUNet, IEEE GRSL 2018), its 2D units made 3D. Each level is a pre-activation
residual unit (He et al. 2016: batch norm, ReLU, convolution, twice, beside a 1x1x1
projection); the encoder halves the extents by a stride-2 first convolution instead of
pooling, the decoder upsamples by 2 and concatenates the encoder's level before its unit; a
1x1x1 convolution gives a sigmoid (one output) or a softmax, in float32 under mixed
precision. One block, as the U-Net: the skips pass several tensors between levels.
"""
import keras

from models.dense import float_dtype
from models.normalization import FusedBatchNormalization


def resunet3d(num_outputs, normalization=FusedBatchNormalization, widths=(16, 32, 64, 128)):
    """Blocks: the whole network, `len(widths)` levels of `widths` filters; the input's
    extents must be divisible by 2 ** (levels - 1)."""
    normalization = normalization or FusedBatchNormalization

    def unit(x, width, stride, first=False):
        """A residual unit: (norm, ReLU, conv) twice, the first conv by `stride`, plus the
        input projected to `width` (the first unit convolves the raw input first, as
        ResUNet's does, with no activation before it)."""
        y = x if first else keras.layers.ReLU()(normalization()(x))
        y = keras.layers.Conv3D(width, 3, strides=stride, padding="same")(y)
        y = keras.layers.Conv3D(width, 3, padding="same")(
            keras.layers.ReLU()(normalization()(y)))
        shortcut = normalization()(keras.layers.Conv3D(width, 1, strides=stride)(x))
        return keras.layers.Add()([y, shortcut])

    def whole(x):
        x = unit(x, widths[0], 1, first=True)
        skips = [x]
        for width in widths[1:]:
            x = unit(x, width, 2)
            skips.append(x)
        for width, skip in zip(reversed(widths[:-1]), reversed(skips[:-1])):
            x = unit(keras.layers.Concatenate()([keras.layers.UpSampling3D(2)(x), skip]),
                     width, 1)
        activation = "sigmoid" if num_outputs == 1 else "softmax"
        return keras.layers.Conv3D(num_outputs, 1, activation=activation,
                                   dtype=float_dtype())(x)
    return [whole]


def resunet3d_small(num_outputs, normalization=FusedBatchNormalization):
    """An 8-16-32 residual U-Net, for the CPUs here."""
    return resunet3d(num_outputs, normalization, widths=(8, 16, 32))
