"""The model builders: pure Keras, right shapes, normalization swappable."""
import numpy as np
import pytest
import keras
import tensorflow as tf

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


@pytest.mark.parametrize("policy, shape, tolerance, epsilon", [
    ("float32", (8, 6, 5, 4), 1e-5, 1e-3), ("float32", (8, 6, 5, 4), 1e-5, 1e-5),
    ("mixed_bfloat16", (4, 3, 5, 6, 7), 2 ** -8, 1e-3), ("float64", (8, 6, 5, 4), 0, 1e-3)])
def test_the_fused_batch_norm_computes_what_keras_3s_does(policy, shape, tolerance, epsilon):
    """models.FusedBatchNormalization against keras.layers.BatchNormalization, on the same
    inputs (large mean, odd shapes; 5D too): outputs, gradients and moving statistics (Keras
    3's, of the biased variance) agree to float32's rounding, and bfloat16's outputs to one
    bfloat16 step (2^-8 of their largest); float64 takes Keras' own path (the kernel has
    none), to the bit. ResNet-50's epsilon, 1e-5, runs the fused kernel too."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        dtype = keras.mixed_precision.global_policy().compute_dtype
        inputs = tf.constant(np.random.RandomState(0).randn(*shape) * 3 + 5, dtype)
        layers = [kind(momentum=0.9, epsilon=epsilon)
                  for kind in (keras.layers.BatchNormalization, models.FusedBatchNormalization)]
        found = []
        for layer in layers:
            layer.build(shape)
            layer.gamma.assign(np.linspace(0.5, 2, shape[-1]))
            layer.beta.assign(np.linspace(-1, 1, shape[-1]))
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                outputs = layer(inputs, training=True)
                loss = tf.reduce_sum(tf.cast(outputs, tf.float32) ** 2)
            gradients = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
            found.append([outputs, *gradients, layer.moving_mean, layer.moving_variance,
                          layer(inputs, training=False)])
        for keras_value, fused_value in zip(*found):
            keras_value, fused_value = (np.asarray(tf.cast(value, tf.float64))
                                        for value in (keras_value, fused_value))
            scale = max(1.0, np.abs(keras_value).max())
            np.testing.assert_allclose(fused_value, keras_value, rtol=0, atol=tolerance * scale)
        assert np.abs(found[0][-2].numpy() - 1).max() > 0.5  # the variance moved
        traced = tf.function(lambda values: layers[1](values, training=True))
        operations = {operation.type for operation
                      in traced.get_concrete_function(inputs).graph.get_operations()}
        assert ("FusedBatchNormV3" in operations) == (policy != "float64")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_weight_decay_adds_half_the_squared_kernels():
    model = models.build("linear", (1,), 1)
    kernel, bias = model.get_weights()
    model.set_weights([np.full_like(kernel, 3.0), np.full_like(bias, 5.0)])
    models.add_weight_decay(model, 0.1)
    assert float(model.losses[0]) == pytest.approx(0.1 * 0.5 * 9.0)


def test_resnet50_is_v1_5_as_goyal_et_al_train_it():
    model = models.build("resnet50", (224, 224, 3), 1000)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 25_557_032  # the published 25.6M
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convolutions) == 53 and not any(layer.use_bias for layer in convolutions)
    assert all(isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
               for layer in convolutions)
    strided = [(layer.kernel_size, layer.strides) for layer in convolutions
               if layer.strides != (1, 1)]
    # the stem, then per downsampling stage the 3x3 convolution and the projection shortcut
    assert strided == [((7, 7), (2, 2))] + [((3, 3), (2, 2)), ((1, 1), (2, 2))] * 3
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.momentum == 0.9 and layer.epsilon == 1e-5 for layer in norms)
    zero_gamma = [layer for layer in norms
                  if isinstance(layer.gamma_initializer, keras.initializers.Zeros)]
    assert len(zero_gamma) == 16  # one per residual block: the last of its branch
    for layer in zero_gamma:
        branch_end = layer._outbound_nodes[0].operation
        assert isinstance(branch_end, keras.layers.Add)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name, input_shape", [
    ("linear", (1,)), ("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("resnet20", (32, 32, 3)),
    ("wrn16_10", (28, 28, 1)), ("resnet50", (32, 32, 3))])
def test_outputs_are_float32_under_mixed_precision(policy, name, input_shape):
    """The softmax (and so the loss) in float32, whatever the layers compute in."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = models.build(name, input_shape, 1 if name == "linear" else 10)
        computing = {layer.compute_dtype for layer in model.layers[1:-1]}
        assert computing <= {policy.split("_")[1]}
        assert model.output.dtype == "float32"
        assert model.layers[-1].compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
