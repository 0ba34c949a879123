"""The model builders: pure Keras, right shapes, normalization swappable."""
import numpy as np
import pytest
import tf_keras as keras

import models


@pytest.mark.parametrize("name, input_shape", [
    ("linear", (1,)), ("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("resnet20", (32, 32, 3)),
    ("resnet56", (32, 32, 3)), ("wrn16_10", (28, 28, 1)), ("resnet50", (32, 32, 3))])
def test_builders_map_a_batch_to_one_output_row_per_example(name, input_shape):
    num_outputs = 1 if name == "linear" else 10
    model = models.build(name, input_shape, num_outputs)
    outputs = model.predict(np.zeros((2, *input_shape), "float32"), verbose=0)
    assert outputs.shape == (2, num_outputs)
    if name != "linear":
        np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-5)


def test_cifar_resnet_depths_follow_6n_plus_2():
    def depth(model):
        """As the paper counts it: 3x3 convolutions and the classifier, not 1x1 shortcuts."""
        return sum(isinstance(layer, keras.layers.Dense) or (
            isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (3, 3))
            for layer in model.layers)
    assert depth(models.build("resnet20", (32, 32, 3), 10)) == 20
    assert depth(models.build("resnet56", (32, 32, 3), 10)) == 56


class MarkedBatchNorm(keras.layers.BatchNormalization):
    """Stands for a synchronized batch norm: a BatchNormalization of another class."""


@pytest.mark.parametrize("name", ["resnet20", "wrn16_10", "resnet50"])
def test_normalization_layers_are_the_ones_asked_for(name):
    model = models.build(name, (32, 32, 3), 10, normalization=MarkedBatchNorm)
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(isinstance(layer, MarkedBatchNorm) for layer in norms)


def test_weight_decay_adds_half_the_squared_kernels():
    model = models.build("linear", (1,), 1)
    kernel, bias = model.get_weights()
    model.set_weights([np.full_like(kernel, 3.0), np.full_like(bias, 5.0)])
    models.add_weight_decay(model, 0.1)
    assert float(model.losses[0]) == pytest.approx(0.1 * 0.5 * 9.0)
