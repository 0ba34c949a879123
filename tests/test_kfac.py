"""K-FAC's factors and preconditioning (app.kfac), against computations by hand in float64.
Its distributed runs and resume are tests/test_preconditioners.py's."""
import itertools

import numpy as np
import pytest

from app.horovod import keras, tf
import models
from app import kfac


def mse_gradient(model, inputs, targets):
    """The gradients of the mean squared error over the batch, with the factors recorded."""
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(targets, model(inputs, training=True))
    return tape.gradient(loss, model.trainable_variables)


def test_a_dense_layers_factors_are_its_inputs_and_per_example_gradients_second_moments(
        float64):
    """A = mean of [a, 1][a, 1]^T over the batch; G = mean of g g^T, g = the per-example
    loss's gradient at the pre-activations, 2 (s - y) / outputs for the MSE of a linear
    layer; and the model's own gradient is untouched by the watching."""
    random = np.random.RandomState(0)
    inputs, targets = random.randn(7, 3), random.randn(7, 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = [gradient.numpy() for gradient in mse_gradient(model, inputs, targets)]
    [factors] = kfac.watch(model).values()
    after = [gradient.numpy() for gradient in mse_gradient(model, inputs, targets)]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)
    kernel, bias = (weight.numpy() for weight in model.weights)
    rows = np.hstack([inputs, np.ones((7, 1))])
    per_example = 2 * (inputs @ kernel + bias - targets) / 2
    np.testing.assert_allclose(factors.a.numpy(), rows.T @ rows / 7, rtol=1e-12)
    np.testing.assert_allclose(factors.g.numpy(), per_example.T @ per_example / 7, rtol=1e-12)


def patches_by_hand(images, size, stride, padding):
    """Each output position's receptive field, flattened as (position..., channel), for
    examples of any number of spatial axes."""
    spatial = images.shape[1:-1]
    if padding == "same":
        total = [max((-(-extent // stride) - 1) * stride + size - extent, 0)
                 for extent in spatial]
        images = np.pad(images, [(0, 0), *((t // 2, t - t // 2) for t in total), (0, 0)])
    rows = []
    for image in images:
        starts = [range(0, extent - size + 1, stride) for extent in image.shape[:-1]]
        for corner in itertools.product(*starts):
            window = tuple(slice(start, start + size) for start in corner)
            rows.append(image[window].reshape(-1))
    return np.array(rows)


@pytest.mark.parametrize("shape, stride, padding", [
    ((7, 2), 1, "valid"), ((5, 6, 2), 1, "valid"), ((5, 6, 2), 2, "same"),
    ((4, 5, 3, 2), 1, "same")])
def test_a_convolutions_factors_are_kfcs(float64, shape, stride, padding):
    """Conv1D, Conv2D and Conv3D, as Grosse and Martens' KFC: A = the mean over the examples of
    the sum over their output positions of [patch, 1][patch, 1]^T (Omega), G = the mean over
    examples and positions of the per-example gradients' g g^T (Gamma), the patches cut by
    hand (odd extents, zero padding where 'same' pads)."""
    random = np.random.RandomState(1)
    images = random.randn(2, *shape)
    convolution = {2: keras.layers.Conv1D, 3: keras.layers.Conv2D, 4: keras.layers.Conv3D}
    layer = convolution[len(shape)](3, 3, strides=stride, padding=padding)
    model = keras.Sequential([keras.Input(shape), layer])
    targets = random.randn(*model.output_shape[1:])[None].repeat(2, axis=0)
    [factors] = kfac.watch(model).values()
    mse_gradient(model, images, targets)
    patches = patches_by_hand(images, 3, stride, padding)
    rows = np.hstack([patches, np.ones((len(patches), 1))])
    np.testing.assert_allclose(factors.a.numpy(), rows.T @ rows / len(images), rtol=1e-12)
    assert len(rows) > 2 * len(images)  # several positions an example
    outputs = model(images).numpy()
    per_example = (2 * (outputs - targets) / outputs[0].size).reshape(-1, 3)
    np.testing.assert_allclose(factors.g.numpy(), per_example.T @ per_example / len(rows),
                               rtol=1e-12, atol=1e-15)
    kernel_rows = layer.kernel.numpy().reshape(-1, 3)  # the kernel's rows match the patches'
    np.testing.assert_allclose(rows[:, :-1] @ kernel_rows + layer.bias.numpy(),
                               outputs.reshape(-1, 3), rtol=1e-12, atol=1e-15)


def test_every_dense_and_convolution_is_watched_inside_a_u_nets_levels():
    """The 3D U-Net keeps each level's convolutions inside a layer of its own (models.unet's
    Level): K-FAC finds every one of them, so that no kernel is left to the base update."""
    model = models.build("unet3d_small", (16, 16, 16, 1), 2)
    watched = kfac.watch(model)
    kernels = [layer.kernel for layer in models.all_layers(model)
               if isinstance(layer, kfac.CURVED_LAYERS)]
    assert len(kernels) > 8 and len(watched) == len(kernels)
    assert all(hasattr(kernel, "kfac_factors") for kernel in kernels)


def test_a_layer_kfac_cannot_take_is_refused_by_name():
    model = keras.Sequential([keras.Input((8, 2)), keras.layers.Conv1D(2, 3, padding="causal",
                                                                       name="causal")])
    with pytest.raises(ValueError, match="layer 'causal' .Conv1D.: its padding is causal"):
        kfac.watch(model)
    pooling = keras.Sequential([keras.Input((8, 2)), keras.layers.GlobalAveragePooling1D()])
    with pytest.raises(ValueError, match="no Dense or convolution layer"):
        kfac.watch(pooling)


def test_the_preconditioned_gradient_solves_the_damped_kronecker_system(float64):
    """precondition(gradient) = (A (x) G + damping I)^-1 applied to the gradient, as the
    Kronecker product built whole and solved by hand: row-major vec(A X G) = (A (x) G)
    vec(X) for symmetric A and G."""
    random = np.random.RandomState(2)
    inputs, targets = random.randn(9, 3), random.randn(9, 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh")])
    [factors] = kfac.watch(model).values()
    kernel_gradient, bias_gradient = mse_gradient(model, inputs, targets)
    gradient = kfac.layer_gradient(model.layers[0], kernel_gradient, bias_gradient).numpy()
    damping = 1e-3
    system = np.kron(factors.a.numpy(), factors.g.numpy()) + damping * np.eye(4 * 2)
    expected = np.linalg.solve(system, gradient.reshape(-1)).reshape(4, 2)
    found = kfac.precondition(tf.constant(gradient), tf.linalg.eigh(factors.a),
                              tf.linalg.eigh(factors.g), damping).numpy()
    np.testing.assert_allclose(found, expected, rtol=1e-9)
    assert np.abs(found - gradient).max() > 1e-3  # preconditioning moved it


def test_the_factors_are_written_inside_fits_compiled_step(float64):
    """Keras' fit() traces its step into a graph: the factors are written there too (a
    stateful operation of the backward pass), from the step's batch."""
    random = np.random.RandomState(3)
    inputs, targets = random.randn(6, 3), random.randn(6, 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    [factors] = kfac.watch(model).values()
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=False)
    model.fit(inputs, targets, batch_size=6, epochs=1, verbose=0, shuffle=False)
    rows = np.hstack([inputs, np.ones((6, 1))])
    np.testing.assert_allclose(factors.a.numpy(), rows.T @ rows / 6, rtol=1e-12)
    kernel, bias = (weight.numpy() for weight in model.weights)
    per_example = inputs @ kernel + bias - targets  # 2 (s - y) / 2 outputs
    np.testing.assert_allclose(factors.g.numpy(), per_example.T @ per_example / 6, rtol=1e-12)


def test_only_the_batches_of_factor_updates_record_factors(float64):
    """factor_steps=2 over fit()'s 4 steps: steps 0 and 2 take their batch's A (running: the
    first, then decay 0.5 of it and 0.5 of the third); steps 1 and 3 record nothing, so no
    sum is left pending between two factor updates (a checkpoint there misses none)."""
    inputs = np.random.RandomState(5).randn(16, 3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    [factors] = kfac.watch(model).values()
    optimizer = kfac.preconditioning(keras.optimizers.SGD(0.0), factor_decay=0.5,
                                     factor_steps=2, inverse_steps=2)
    model.compile(optimizer, "mse", jit_compile=False)
    model.fit(inputs, np.zeros((16, 2)), batch_size=4, epochs=1, verbose=0, shuffle=False)
    rows = [np.hstack([batch, np.ones((4, 1))]) for batch in np.split(inputs, 4)]
    second_moments = [batch.T @ batch / 4 for batch in rows]
    np.testing.assert_allclose(optimizer.curvature[factors]["a"].numpy(),
                               0.5 * second_moments[0] + 0.5 * second_moments[2], rtol=1e-12)
    assert factors.batches.numpy() == 0 and not factors.a.numpy().any()


def test_under_bfloat16_the_factors_are_taken_in_float32_from_the_bfloat16_inputs():
    """mixed_bfloat16: the layers compute in bfloat16, the factors and decompositions are
    float32 (the variables' type), and one fit() step's running A of the Dense layer is the
    second moment of its bfloat16 inputs taken in float32."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((5, 5, 2)),
                                  keras.layers.Conv2D(3, 3, activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(4)])
        watched = kfac.watch(model)
        optimizer = kfac.preconditioning(keras.optimizers.SGD(0.1, momentum=0.9))
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
        random = np.random.RandomState(0)
        images, labels = random.randn(8, 5, 5, 2).astype("float32"), random.randint(0, 4, 8)
        flattened = keras.Model(model.inputs, model.layers[1].output)(images)
        assert flattened.dtype == tf.bfloat16
        model.fit(images, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
        assert {variable.dtype for variable in optimizer.variables} == {"float32", "int64"}
        rows = np.hstack([np.asarray(tf.cast(flattened, tf.float32)), np.ones((8, 1))])
        dense = watched[model.layers[2]]
        np.testing.assert_allclose(optimizer.curvature[dense]["a"].numpy(), rows.T @ rows / 8,
                                   rtol=1e-5, atol=1e-6)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_one_update_of_sgd_preconditioned_by_kfac_is_the_hand_computed_step(float64):
    """kfac.preconditioning(SGD) on a Dense layer with a tanh, first step (the running
    factors are the batch's): w1 = w0 - lr (A (x) G + damping I)^-1 grad, the system built
    whole and solved by hand; the bias's row with the kernel's; its config keeps K-FAC's
    settings (Horovod rebuilds an optimizer from it)."""
    random = np.random.RandomState(4)
    inputs, targets = random.randn(8, 3), random.randn(8, 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh")])
    [factors] = kfac.watch(model).values()
    optimizer = kfac.preconditioning(keras.optimizers.SGD(0.5), damping=1e-2)
    rebuilt = type(optimizer).from_config(optimizer.get_config())
    assert rebuilt.kfac_damping == 1e-2 and isinstance(rebuilt, keras.optimizers.SGD)
    before = [weight.numpy() for weight in model.weights]
    gradients = mse_gradient(model, inputs, targets)
    gradient = kfac.layer_gradient(model.layers[0], *gradients)
    a, g = factors.a.numpy(), factors.g.numpy()  # this batch's, which the step takes
    system = np.kron(a, g) + 1e-2 * np.eye(8)
    step = np.linalg.solve(system, gradient.numpy().reshape(-1)).reshape(4, 2)
    optimizer.build(model.trainable_variables)
    tf.function(lambda: optimizer.apply_gradients(  # as in fit()'s compiled step
        zip(gradients, model.trainable_variables)))()
    np.testing.assert_allclose(model.weights[0].numpy(), before[0] - 0.5 * step[:3],
                               rtol=1e-12)
    np.testing.assert_allclose(model.weights[1].numpy(), before[1] - 0.5 * step[3],
                               rtol=1e-12)


def test_kl_clipping_scales_the_preconditioned_step_down_to_its_bound(float64):
    """With kl_clip, the preconditioned gradient P (kernel and bias) is scaled by
    min(1, sqrt(kl_clip / (lr^2 <P, grad>))), by hand from the unclipped step; a bound the
    step is under leaves it as it was."""
    random = np.random.RandomState(6)
    inputs, targets = random.randn(8, 3), random.randn(8, 2)
    steps = {}
    for kl_clip in (None, 1e-4, 1e6):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        kfac.watch(model)
        optimizer = kfac.preconditioning(keras.optimizers.SGD(0.5), damping=1e-2,
                                         kl_clip=kl_clip)
        before = [weight.numpy() for weight in model.weights]
        gradients = mse_gradient(model, inputs, targets)
        optimizer.build(model.trainable_variables)
        tf.function(lambda: optimizer.apply_gradients(
            zip(gradients, model.trainable_variables)))()
        steps[kl_clip] = ([(old - weight.numpy()) / 0.5
                           for old, weight in zip(before, model.weights)],
                          [gradient.numpy() for gradient in gradients])
    (preconditioned, gradients), clipped = steps[None], steps[1e-4][0]
    inner = sum(np.sum(p * g) for p, g in zip(preconditioned, gradients))
    scale = min(1.0, np.sqrt(1e-4 / (0.5 ** 2 * inner)))
    assert scale < 0.5
    for found, plain in zip(clipped, preconditioned):
        np.testing.assert_allclose(found, scale * plain, rtol=1e-10)
    for found, plain in zip(steps[1e6][0], preconditioned):
        np.testing.assert_array_equal(found, plain)
