"""Residual networks: CIFAR ResNet-20/56 (He et al. 2016, v1 with projection shortcuts),
WideResNet-16-10 (Zagoruyko and Komodakis 2016, pre-activation) and ImageNet ResNet-50 v1.5
(as Goyal et al. 2017 and NVIDIA's and the TF Model Garden's recipes train it)."""
import keras

from models.dense import float_dtype
from models.normalization import FusedBatchNormalization

_CONV = dict(padding="same", use_bias=False, kernel_initializer="he_normal")


def _cifar_resnet(num_outputs, blocks_per_stage, normalization):
    """Blocks: the stem, each residual block, the pooled classifier."""
    def stem(x):
        return keras.layers.ReLU()(normalization()(keras.layers.Conv2D(16, 3, **_CONV)(x)))

    def residual_block(filters, strides):
        def block(x):
            shortcut = x
            y = keras.layers.Conv2D(filters, 3, strides=strides, **_CONV)(x)
            y = keras.layers.ReLU()(normalization()(y))
            y = normalization()(keras.layers.Conv2D(filters, 3, **_CONV)(y))
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = normalization()(
                    keras.layers.Conv2D(filters, 1, strides=strides, **_CONV)(shortcut))
            return keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
        return block

    return [stem,
            *(residual_block(filters, 2 if stage > 0 and block == 0 else 1)
              for stage, filters in enumerate((16, 32, 64)) for block in range(blocks_per_stage)),
            _pooled_classifier(num_outputs)]


def _pooled_classifier(num_outputs, normalization=None):
    def head(x):
        if normalization:
            x = keras.layers.ReLU()(normalization()(x))
        return keras.layers.Dense(num_outputs, activation="softmax", dtype=float_dtype())(
            keras.layers.GlobalAveragePooling2D()(x))
    return head


def resnet20(num_outputs, normalization=FusedBatchNormalization):
    return _cifar_resnet(num_outputs, 3, normalization)


def resnet56(num_outputs, normalization=FusedBatchNormalization):
    return _cifar_resnet(num_outputs, 9, normalization)


def wide_resnet16_10(num_outputs, normalization=FusedBatchNormalization):
    """WRN-16-10: 2 pre-activation blocks per stage, widths 160/320/640, no dropout."""
    depth, width = 16, 10
    blocks_per_stage = (depth - 4) // 6

    def residual_block(filters, strides):
        def block(x):
            activated = keras.layers.ReLU()(normalization()(x))
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(filters, 1, strides=strides, **_CONV)(activated)
            y = keras.layers.Conv2D(filters, 3, strides=strides, **_CONV)(activated)
            y = keras.layers.ReLU()(normalization()(y))
            y = keras.layers.Conv2D(filters, 3, **_CONV)(y)
            return keras.layers.Add()([shortcut, y])
        return block

    return [lambda x: keras.layers.Conv2D(16, 3, **_CONV)(x),
            *(residual_block(filters, 2 if stage > 0 and block == 0 else 1)
              for stage, filters in enumerate((16 * width, 32 * width, 64 * width))
              for block in range(blocks_per_stage)),
            _pooled_classifier(num_outputs, normalization)]


# ResNet-50 v1.5 batch norm: Goyal et al.'s and the TF Model Garden's momentum and epsilon
# (Keras' defaults, 0.99 and 1e-3, average over ten times as many steps).
_IMAGENET_BATCH_NORM = dict(momentum=0.9, epsilon=1e-5)


def resnet50(num_outputs, normalization=FusedBatchNormalization):
    """ResNet-50 v1.5: bottleneck blocks (3, 4, 6, 3) whose stride is on the 3x3 convolution
    (v1 strides the first 1x1, which skips three quarters of its input), convolutions without
    bias and He-normal initialized, and the last batch norm of every residual branch
    initialized to gamma = 0, so that each block starts as the identity (Goyal et al.).
    Blocks: the stem, each bottleneck block, the pooled classifier."""
    def stem(x):
        x = keras.layers.Conv2D(64, 7, strides=2, **_CONV)(x)
        x = keras.layers.ReLU()(normalization(**_IMAGENET_BATCH_NORM)(x))
        return keras.layers.MaxPooling2D(3, strides=2, padding="same")(x)

    def bottleneck(filters, strides):
        return lambda x: _bottleneck(x, filters, strides, normalization)

    return [stem,
            *(bottleneck(filters, 2 if stage > 0 and block == 0 else 1)
              for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)))
              for block in range(blocks)),
            _pooled_classifier(num_outputs)]


def _bottleneck(x, filters, strides, normalization):
    shortcut = x
    y = keras.layers.Conv2D(filters, 1, **_CONV)(x)
    y = keras.layers.ReLU()(normalization(**_IMAGENET_BATCH_NORM)(y))
    y = keras.layers.Conv2D(filters, 3, strides=strides, **_CONV)(y)
    y = keras.layers.ReLU()(normalization(**_IMAGENET_BATCH_NORM)(y))
    y = keras.layers.Conv2D(4 * filters, 1, **_CONV)(y)
    y = normalization(gamma_initializer="zeros", **_IMAGENET_BATCH_NORM)(y)
    if strides != 1 or shortcut.shape[-1] != 4 * filters:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=strides, **_CONV)(shortcut)
        shortcut = normalization(**_IMAGENET_BATCH_NORM)(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
