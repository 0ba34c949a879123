"""Models without convolutions: the linear neuron of Lab 1 and a multilayer perceptron."""
import tf_keras as keras


def linear(input_shape, num_outputs, normalization=None):
    """y = w*x + b: one Dense unit per output, no activation (a regression model)."""
    del normalization  # nothing to normalize in a linear neuron
    inputs = keras.Input(shape=input_shape)
    outputs = keras.layers.Dense(num_outputs, name="neuron", dtype="float32")(
        keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs, name="linear")


def mlp(input_shape, num_outputs, normalization=None, hidden=(256, 128)):
    """Flatten, ReLU hidden layers, softmax classifier; no normalization or dropout."""
    del normalization
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    for units in hidden:
        x = keras.layers.Dense(units, activation="relu")(x)
    outputs = keras.layers.Dense(num_outputs, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="mlp")
