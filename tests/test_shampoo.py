"""Shampoo (app.shampoo) against a NumPy transcription: the blocks, the inverse fourth roots
against eigendecompositions by hand, and several steps of the grafted, blocked update in
float64. Its distributed runs and resume are tests/test_preconditioners.py's."""
import numpy as np
import pytest

from app.horovod import keras, tf
from app import shampoo

EPSILON = 1e-6


def test_a_matrix_is_cut_into_blocks_of_at_most_the_block_size():
    found = [(rows.start, rows.stop, columns.start, columns.stop)
             for rows, columns in shampoo.blocks(5, 7, 3)]
    assert found == [(0, 3, 0, 3), (0, 3, 3, 6), (0, 3, 6, 7),
                     (3, 5, 0, 3), (3, 5, 3, 6), (3, 5, 6, 7)]
    assert [(r.stop, c.stop) for r, c in shampoo.blocks(4, 2, 128)] == [(4, 2)]


def numpy_root(statistic):
    values, vectors = np.linalg.eigh(statistic)
    values = np.maximum(values, 0)
    return (vectors * (values + EPSILON * values.max()) ** -0.25) @ vectors.T


@pytest.mark.parametrize("rank", [6, 2])
def test_the_inverse_fourth_root_is_the_eigendecompositions(rank):
    """Of a full-rank and of a rank-2 statistic G G^T: the root by hand from NumPy's
    eigendecomposition, to 1e-9 relative (two LAPACKs' rounding of the zero eigenvalues,
    which the ridge's -1/4 power amplifies); its fourth power is the inverse of the
    statistic with its relative ridge."""
    gradient = np.random.RandomState(rank).randn(6, rank)
    statistic = gradient @ gradient.T
    found = shampoo.inverse_fourth_root(tf.constant(statistic), EPSILON).numpy()
    np.testing.assert_allclose(found, numpy_root(statistic), rtol=1e-9, atol=0)
    ridged = statistic + EPSILON * np.linalg.eigvalsh(statistic).max() * np.eye(6)
    fourth = np.linalg.matrix_power(found, 4)
    np.testing.assert_allclose(fourth @ ridged, np.eye(6), atol=1e-6)


def numpy_shampoo(weights, gradients, block_size, beta2, grafting, root_steps, lr):
    """The kernel and bias after plain SGD on Shampoo's grafted, blocked directions."""
    kernel, bias = (weight.copy() for weight in weights)
    cuts = shampoo.blocks(*kernel.shape, block_size)
    left = [np.zeros((r.stop - r.start,) * 2) for r, _ in cuts]
    right = [np.zeros((c.stop - c.start,) * 2) for _, c in cuts]
    roots = [(np.eye(len(a)), np.eye(len(b))) for a, b in zip(left, right)]
    accumulated = [np.zeros_like(kernel), np.zeros_like(bias)]
    for step, (kernel_gradient, bias_gradient) in enumerate(gradients):
        grafted = []
        for index, gradient in enumerate((kernel_gradient, bias_gradient)):
            if grafting == "adagrad":
                accumulated[index] += gradient ** 2
                gradient = gradient / (np.sqrt(accumulated[index]) + 1e-10)
            grafted.append(gradient)
        direction = np.zeros_like(kernel)
        for number, (rows, columns) in enumerate(cuts):
            piece = kernel_gradient[rows, columns]
            for statistic, product in ((left, piece @ piece.T), (right, piece.T @ piece)):
                statistic[number] = (statistic[number] + product if beta2 == 1
                                     else beta2 * statistic[number] + (1 - beta2) * product)
            if step % root_steps == 0:
                roots[number] = (numpy_root(left[number]), numpy_root(right[number]))
            preconditioned = roots[number][0] @ piece @ roots[number][1]
            direction[rows, columns] = (preconditioned * np.linalg.norm(grafted[0][rows, columns])
                                        / np.linalg.norm(preconditioned))
        kernel -= lr * direction
        bias -= lr * grafted[1]
    return kernel, bias


@pytest.mark.parametrize("beta2, grafting, root_steps", [
    (1.0, "sgd", 1), (0.5, "sgd", 1), (1.0, "adagrad", 1), (1.0, "sgd", 2)])
def test_three_steps_are_the_numpy_transcriptions(beta2, grafting, root_steps):
    """A 5 x 3 kernel in blocks of 2 (2 x 2, 2 x 1, 1 x 2, 1 x 1) and its bias, three steps of
    plain SGD on Shampoo's directions in float64, compiled as fit() compiles them: the
    statistics summed (beta2 1) or averaged, the roots taken every step or every other
    (stale in between), each block's step grafted to SGD's or AdaGrad's norm, the bias
    taking the grafted method's step. To 1e-10 relative (the LR is 1/8: Keras keeps it in
    float32)."""
    random = np.random.RandomState(1)
    weights = [random.randn(5, 3), random.randn(3)]
    gradients = [(random.randn(5, 3), random.randn(3)) for _ in range(3)]
    variables = [keras.Variable(weight, dtype="float64", name=name)
                 for weight, name in zip(weights, ("kernel", "bias"))]
    optimizer = shampoo.preconditioning(keras.optimizers.SGD(0.125), block_size=2, beta2=beta2,
                                        epsilon=EPSILON, root_steps=root_steps,
                                        grafting=grafting)
    optimizer.build(variables)

    @tf.function
    def step(kernel_gradient, bias_gradient):
        optimizer.apply([kernel_gradient, bias_gradient], variables)
    for kernel_gradient, bias_gradient in gradients:
        step(tf.constant(kernel_gradient), tf.constant(bias_gradient))
    expected = numpy_shampoo(weights, gradients, 2, beta2, grafting, root_steps, 0.125)
    for variable, value in zip(variables, expected):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-10)
    # and preconditioning changed the step: plain SGD's kernel is elsewhere
    plain = weights[0] - 0.125 * sum(kernel_gradient for kernel_gradient, _ in gradients)
    assert np.abs(variables[0].numpy() - plain).max() > 1e-2
    rebuilt = type(optimizer).from_config(optimizer.get_config())
    assert (rebuilt.shampoo_block_size, rebuilt.shampoo_grafting) == (2, grafting)
