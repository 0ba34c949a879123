"""Models without convolutions: the linear neuron of Lab 1 and a multilayer perceptron."""
import keras


def float_dtype():
    """float32, or float64 when the model computes in float64: the type of the output layer
    (under mixed precision too, so that the softmax and the loss keep float32's range) and of
    a pipeline stage's input."""
    return "float64" if keras.mixed_precision.global_policy().compute_dtype == "float64" \
        else "float32"


def linear(num_outputs, normalization=None):
    """y = w*x + b: one Dense unit per output, no activation (a regression model)."""
    del normalization  # nothing to normalize in a linear neuron
    return [lambda x: keras.layers.Dense(num_outputs, name="neuron", dtype=float_dtype())(
        keras.layers.Flatten()(x))]


def mlp(num_outputs, normalization=None, hidden=(256, 128)):
    """Flatten, ReLU hidden layers, softmax classifier; no normalization or dropout. Blocks:
    one per Dense layer."""
    del normalization

    def hidden_block(units, flatten):
        def block(x):
            return keras.layers.Dense(units, activation="relu")(
                keras.layers.Flatten()(x) if flatten else x)
        return block

    return [*(hidden_block(units, index == 0) for index, units in enumerate(hidden)),
            lambda x: keras.layers.Dense(num_outputs, activation="softmax",
                                         dtype=float_dtype())(x)]
