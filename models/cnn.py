"""Small CNNs for small images (8x8 digits, 28x28 MNIST-like): fast on CPU, no dropout or
batch norm, so that runs with the same global batch give the same weights at any process
count."""
import keras

from models.dense import float_dtype


def small_cnn(num_outputs, normalization=None):
    """Blocks: each convolution, then pooling with the hidden dense layer, then the
    classifier."""
    del normalization
    return [
        lambda x: keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x),
        lambda x: keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x),
        lambda x: keras.layers.Dense(128, activation="relu")(
            keras.layers.Flatten()(keras.layers.MaxPooling2D()(x))),
        _classifier(num_outputs),
    ]


def pooled_cnn(num_outputs, normalization=None, filters=(16, 32)):
    """Two convolution and max-pooling stages, then a hidden dense layer (the classic MNIST
    convnet, at half its width): for 28x28 images such as Fashion-MNIST, cheaper per image
    than small_cnn, which convolves at full resolution."""
    del normalization

    def convolution(width):
        return lambda x: keras.layers.MaxPooling2D()(
            keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x))

    return [
        *(convolution(width) for width in filters),
        lambda x: keras.layers.Dense(128, activation="relu")(keras.layers.Flatten()(x)),
        _classifier(num_outputs),
    ]


def _classifier(num_outputs):
    return lambda x: keras.layers.Dense(num_outputs, activation="softmax",
                                        dtype=float_dtype())(x)
