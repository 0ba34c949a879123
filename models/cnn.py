"""Small CNNs for small images (8x8 digits, 28x28 MNIST-like): fast on CPU, no dropout or
batch norm, so that runs with the same global batch give the same weights at any process
count."""
import tf_keras as keras


def small_cnn(input_shape, num_outputs, normalization=None):
    del normalization
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(num_outputs, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def pooled_cnn(input_shape, num_outputs, normalization=None, filters=(16, 32)):
    """Two convolution and max-pooling stages, then a hidden dense layer (the classic MNIST
    convnet, at half its width): for 28x28 images such as Fashion-MNIST, several times
    cheaper per image than small_cnn, which convolves at full resolution."""
    del normalization
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(filters[0], 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(filters[1], 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(num_outputs, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="pooled_cnn")
