"""K-FAC's curvature for Keras 3 models (Martens and Grosse 2015; convolutions as Grosse and
Martens 2016): each Dense or Conv2D layer's Fisher block approximated by the Kronecker
product of A, the second moment of its inputs (with a 1 appended where it has a bias), and
G, that of the loss's gradients with respect to its pre-activations, per example; the
gradient preconditioned by (A + d I)^-1 grad (G + d I)^-1 through the factors'
eigendecompositions, with the damping on the eigenvalues' products (as KAISA,
Pauloski et al. 2021).

Work in progress for issue 42 (branch wt-k42): the factors of one batch and the
preconditioning, on one process; the optimizer entry, the running averages across steps and
ranks and KAISA's placement of the eigendecompositions are not written yet.

The factors come from the layers as they are: `watch` wraps each layer's `call` (to keep its
inputs) and its `activation` (to see the gradient of its pre-activations in the backward
pass), and leaves the model's code and weights alone.
"""
import tensorflow as tf
import keras

CURVED_LAYERS = (keras.layers.Dense, keras.layers.Conv2D)


class LayerFactors:
    """One layer's factors of the last batch it was trained on: `a` and `g`, variables
    written in the backward pass."""

    def __init__(self, layer):
        self.layer = layer
        inputs = layer.kernel.shape[:-1].num_elements() + int(layer.use_bias)
        outputs = layer.kernel.shape[-1]
        dtype = layer.kernel.dtype
        self.a = tf.Variable(tf.zeros([inputs, inputs], dtype), trainable=False,
                             name=f"{layer.name}_a")
        self.g = tf.Variable(tf.zeros([outputs, outputs], dtype), trainable=False,
                             name=f"{layer.name}_g")
        self._inputs = None

    def rows(self, inputs):
        """The layer's inputs as the rows its kernel multiplies: a Dense layer's, or a
        convolution's patches (one row per output position), with a 1 for the bias."""
        if isinstance(self.layer, keras.layers.Conv2D):
            layer = self.layer
            inputs = tf.image.extract_patches(
                inputs, sizes=[1, *layer.kernel_size, 1], strides=[1, *layer.strides, 1],
                rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
        rows = tf.reshape(inputs, [-1, inputs.shape[-1]])
        if self.layer.use_bias:
            rows = tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
        return rows

    def record(self, outputs_gradient, examples):
        """Writes the batch's factors from the kept inputs and the gradient of the loss (a
        mean over `examples`) with respect to the pre-activations: per-example gradients
        are `examples` times it. A convolution's are averaged over its output positions,
        A's and G's alike (Grosse and Martens' spatially uncorrelated derivatives)."""
        rows = self.rows(tf.cast(self._inputs, self.a.dtype))
        per_example = tf.reshape(tf.cast(outputs_gradient, self.g.dtype) * examples,
                                 [-1, outputs_gradient.shape[-1]])
        positions = tf.cast(tf.shape(rows)[0], self.a.dtype)
        self.a.assign(tf.matmul(rows, rows, transpose_a=True) / positions)
        self.g.assign(tf.matmul(per_example, per_example, transpose_a=True) / positions)


def watch(model):
    """{layer: LayerFactors} of `model`'s Dense and Conv2D layers with a trainable kernel,
    their `call` and `activation` wrapped so that every gradient taken through them writes
    their factors."""
    found = {}
    for layer in _layers(model):
        if isinstance(layer, CURVED_LAYERS) and layer.trainable and layer.built:
            found[layer] = factors = LayerFactors(layer)
            layer.call = _keeping_inputs(layer.call, factors)
            layer.activation = _seeing_gradients(layer.activation, factors)
    return found


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def _keeping_inputs(call, factors):
    def kept(inputs, *args, **kwargs):
        factors._inputs = inputs
        return call(inputs, *args, **kwargs)
    return kept


def _seeing_gradients(activation, factors):
    @tf.custom_gradient
    def identity(pre_activations):
        def gradient(upstream):
            examples = tf.shape(pre_activations)[0]
            factors.record(upstream, tf.cast(examples, factors.g.dtype))
            return upstream
        return tf.identity(pre_activations), gradient

    def seen(pre_activations):
        if isinstance(pre_activations, keras.KerasTensor):  # building the model: no data
            return activation(pre_activations)
        return activation(identity(pre_activations))
    return seen


def precondition(gradient, factors, damping):
    """(A + ...)^-1 gradient (G + ...)^-1 for a layer's gradient as its kernel's rows (and the
    bias's last row), through A = Qa diag(la) Qa^T and G = Qg diag(lg) Qg^T: Qa ((Qa^T
    gradient Qg) / (la lg^T + damping)) Qg^T."""
    a_values, a_vectors = tf.linalg.eigh(factors.a)
    g_values, g_vectors = tf.linalg.eigh(factors.g)
    rotated = tf.matmul(tf.matmul(a_vectors, gradient, transpose_a=True), g_vectors)
    scaled = rotated / (a_values[:, None] * g_values[None, :] + damping)
    return tf.matmul(tf.matmul(a_vectors, scaled), g_vectors, transpose_b=True)


def layer_gradient(layer, kernel_gradient, bias_gradient=None):
    """The layer's gradient as one matrix: the kernel's rows, then the bias's."""
    rows = tf.reshape(kernel_gradient, [-1, kernel_gradient.shape[-1]])
    return rows if bias_gradient is None else tf.concat([rows, bias_gradient[None]], axis=0)
