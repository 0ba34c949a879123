"""A user's own Keras 3 models, trained by the project with nothing added to it:

    PYTHONPATH=examples mpirun -np 2 python -m app.train \
        --flagfile=configs/seismic_faults_cpu.cfg --model=own_model:fault_net
    PYTHONPATH=examples python -m app.predict --model_dir=runs/seismic_faults_cpu \
        --input=survey.segy --output_dir=predicted

A model function takes the input shape (without the batch) and the number of outputs and
returns a keras.Model; ScaledSwish is a layer of its own, written with keras.ops.
"""
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="own_model")
class ScaledSwish(keras.layers.Layer):
    """x * sigmoid(beta * x), with one learned beta per channel."""

    def build(self, input_shape):
        self.beta = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="beta")

    def call(self, inputs):
        return inputs * ops.sigmoid(ops.cast(self.beta, inputs.dtype) * inputs)


def output_dtype():
    """float32 outputs under mixed precision, as Keras' guide asks of a model's last layer;
    otherwise the policy's (float64 in the project's exactness runs)."""
    mixed = keras.mixed_precision.global_policy().compute_dtype in ("float16", "bfloat16")
    return "float32" if mixed else None


def fault_net(input_shape, num_outputs):
    """Two 3x3(x3) convolutions with ScaledSwish, then one per-voxel output: a probability
    (one output) or a softmax over classes; for volumes or sections alike."""
    convolution = {3: keras.layers.Conv2D, 4: keras.layers.Conv3D}[len(input_shape)]
    inputs = keras.Input(input_shape)
    x = inputs
    for width in (8, 8):
        x = ScaledSwish()(convolution(width, 3, padding="same")(x))
    outputs = convolution(num_outputs, 1, dtype=output_dtype(),
                          activation="sigmoid" if num_outputs == 1 else "softmax")(x)
    return keras.Model(inputs, outputs, name="fault_net")


def digits_net(input_shape, num_outputs):
    """A classifier: flatten, a hidden layer with ScaledSwish, a softmax."""
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(32),
        ScaledSwish(), keras.layers.Dense(num_outputs, activation="softmax",
                                          dtype=output_dtype()),
    ], name="digits_net")
