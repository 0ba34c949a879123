"""U-Nets for dense prediction: FaultSeg3D's simplified 3D U-Net (Wu et al., Geophysics
2019) for seismic volumes, and its 2D form for sections (Alaudah et al.'s section-based
facies setting). Each level is two `same` convolutions with ReLU; the encoder max-pools by 2,
the decoder upsamples by 2 and concatenates the encoder's level; a 1x1 convolution gives a
sigmoid (one output: faults) or a softmax (several: facies), in float32 under mixed
precision. The model is one block: the skip connections pass several tensors between its
levels, so a pipeline cannot cut it.
"""
import tf_keras as keras

from models.dense import float_dtype

FAULTSEG3D_WIDTHS = (16, 32, 64, 128)


def unet(num_outputs, normalization=None, dimensions=3, widths=FAULTSEG3D_WIDTHS):
    """Blocks: the whole U-Net, `len(widths)` levels of `widths` filters; the input's
    extent along every spatial axis must be divisible by 2 ** (levels - 1)."""
    del normalization  # FaultSeg3D's U-Net has none
    convolution = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[dimensions]
    pooling = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}[dimensions]
    upsampling = {2: keras.layers.UpSampling2D, 3: keras.layers.UpSampling3D}[dimensions]

    def level(x, width):
        for _ in range(2):
            x = convolution(width, 3, padding="same", activation="relu")(x)
        return x

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


def unet3d(num_outputs, normalization=None):
    """FaultSeg3D's 3D U-Net: 16-32-64-128 filters, 1,459,585 parameters with one output."""
    return unet(num_outputs, normalization, dimensions=3)


def unet3d_small(num_outputs, normalization=None):
    """An 8-16-32 3D U-Net, for the CPUs here."""
    return unet(num_outputs, normalization, dimensions=3, widths=(8, 16, 32))


def unet2d(num_outputs, normalization=None):
    """The 2D U-Net for sections, FaultSeg3D's widths."""
    return unet(num_outputs, normalization, dimensions=2)


def unet2d_small(num_outputs, normalization=None):
    """An 8-16-32 2D U-Net, for the CPUs here."""
    return unet(num_outputs, normalization, dimensions=2, widths=(8, 16, 32))
