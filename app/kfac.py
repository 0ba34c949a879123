"""K-FAC's curvature for Keras 3 models (Martens and Grosse 2015; convolutions as Grosse and
Martens 2016): each Dense or convolution (1D, 2D, 3D) layer's Fisher block approximated by
the Kronecker product of A, the second moment of its inputs (with a 1 appended where it has
a bias), and G, that of the loss's gradients with respect to its pre-activations, per
example; the gradient preconditioned by (A + d I)^-1 grad (G + d I)^-1 through the factors'
eigendecompositions, with the damping on the eigenvalues' products (as KAISA, Pauloski et
al. 2021). `--optimizer=kfac` (app.optimizers) is `preconditioning()` of the base optimizer.

Distributed as KAISA: the batch factors averaged over the ranks (one grouped allreduce);
with every rank a gradient worker (communication-optimal), each factor's eigendecomposition
on one rank (the costliest first, to the least loaded) and summed from there to the others
(app.curvature.run_on_owners), every rank preconditioning every layer; with fewer
(`grad_workers`), KAISA's grid: a layer's decompositions kept by its column of gradient
workers only, which precondition it for their rows.

The factors come from the layers as they are: `watch` wraps each layer's `call` (to keep its
inputs) and its `activation` (to see the gradient of its pre-activations in the backward
pass), and leaves the model's code and weights alone.
"""
from app.horovod import keras, tf  # first: it sets TF_XLA_FLAGS

import models
from app import curvature

CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
CURVED_LAYERS = (keras.layers.Dense, *CONVOLUTIONS)


class LayerFactors:
    """One layer's factors summed over the batches of the update that takes them: `a` and
    `g`, variables added to in the backward pass, and `batches`, their count (several with
    accumulated gradients). `taking()`, set by the optimizer, says whether this step's
    update takes factors: the batches of the other steps cost no factor (kfac-pytorch's
    hooks likewise run only at factor updates)."""

    def __init__(self, layer, ranks):
        self.layer, self.ranks = layer, ranks
        inputs = layer.kernel.shape[:-1].num_elements() + int(layer.use_bias)
        outputs = layer.kernel.shape[-1]
        dtype = layer.kernel.dtype
        self.a = tf.Variable(tf.zeros([inputs, inputs], dtype), trainable=False,
                             name=f"{layer.name}_a")
        self.g = tf.Variable(tf.zeros([outputs, outputs], dtype), trainable=False,
                             name=f"{layer.name}_g")
        self.batches = tf.Variable(0, trainable=False, dtype=dtype,
                                   name=f"{layer.name}_batches")
        self._inputs = None
        self.taking = None  # None (no optimizer yet): every step's
        # where the optimizer's build placed its work: the ranks that decompose a and g, and
        # the ranks that keep the decompositions and precondition it (None: all)
        self.owners = {"a": 0, "g": 0}
        self.holders = None
        # how many eigendecompositions of each this rank computed: where the placement put them
        self.decompositions = {name: tf.Variable(0, trainable=False,
                                                 name=f"{layer.name}_{name}_eighs")
                               for name in ("a", "g")}

    def rows(self, inputs):
        """The layer's inputs as the rows its kernel multiplies: a Dense layer's, or a
        convolution's patches (one row per output position), with a 1 for the bias."""
        if isinstance(self.layer, CONVOLUTIONS):
            inputs = _patches(self.layer, inputs)
        rows = tf.reshape(inputs, [-1, inputs.shape[-1]])
        if self.layer.use_bias:
            rows = tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
        return rows

    def record(self, outputs_gradient, examples):
        """Adds the batch's factors from the kept inputs and the gradient of the loss (a
        mean over `examples`) with respect to the pre-activations: per-example gradients
        are `examples` times it. A convolution's, by Grosse and Martens' KFC: A sums over
        its output positions (Omega), G averages over them (Gamma), so that A (x) G
        approximates the Fisher block at a Dense layer's scale (KFAC-expand)."""
        inputs = self._inputs

        def add():
            rows = self.rows(tf.cast(inputs, self.a.dtype))
            per_example = tf.reshape(tf.cast(outputs_gradient, self.g.dtype) * examples,
                                     [-1, outputs_gradient.shape[-1]])
            positions = tf.cast(tf.shape(rows)[0], self.a.dtype)  # examples x positions
            self.a.assign_add(tf.matmul(rows, rows, transpose_a=True) / examples)
            self.g.assign_add(tf.matmul(per_example, per_example, transpose_a=True)
                              / positions)
            self.batches.assign_add(1)
        if self.taking is None:
            add()
        else:
            tf.cond(self.taking(), add, lambda: None)

    def taken(self):
        """[A, G]: the mean of the batches' factors since the last call, which starts the
        sums anew."""
        mean = [tf.identity(factor / tf.maximum(self.batches, 1)) for factor in (self.a, self.g)]
        with tf.control_dependencies(mean):
            for variable in (self.a, self.g, self.batches):
                variable.assign(tf.zeros_like(variable))
        return mean


def _patches(layer, inputs):
    """Each output position's receptive field of a channels-last convolution's `inputs`,
    flattened in its kernel's order (position by position, then channel)."""
    if isinstance(layer, keras.layers.Conv3D):
        return tf.extract_volume_patches(
            inputs, ksizes=[1, *layer.kernel_size, 1], strides=[1, *layer.strides, 1],
            padding=layer.padding.upper())
    one_dimensional = isinstance(layer, keras.layers.Conv1D)
    sizes, strides, rates = ([1, *([1] if one_dimensional else []), *values, 1] for values in (
        layer.kernel_size, layer.strides, layer.dilation_rate))
    return tf.image.extract_patches(inputs[:, None] if one_dimensional else inputs, sizes,
                                    strides, rates, layer.padding.upper())


def unsupported(layer):
    """Why K-FAC cannot take `layer` (a reason, or None where it can)."""
    if isinstance(layer, CONVOLUTIONS):
        if layer.data_format != "channels_last":
            return "its channels come first"
        if layer.groups != 1:
            return "it convolves in groups"
        if layer.padding == "causal":
            return "its padding is causal"
        if isinstance(layer, keras.layers.Conv3D) and max(layer.dilation_rate) > 1:
            return "it is dilated (TensorFlow cuts no dilated volume patches)"
    return None


def watch(model, ranks=curvature.ONE_PROCESS):
    """{layer: LayerFactors} of `model`'s Dense and convolution layers with a trainable kernel,
    their `call` and `activation` wrapped so that every gradient taken through them adds to
    their factors, shared over `ranks`. ValueError where a layer cannot be taken
    (unsupported) or none can."""
    found = {}
    for layer in models.all_layers(model):
        if isinstance(layer, CURVED_LAYERS) and layer.trainable and layer.built:
            if unsupported(layer):
                raise ValueError(f"K-FAC cannot precondition layer {layer.name!r} "
                                 f"({type(layer).__name__}): {unsupported(layer)}")
            found[layer] = factors = LayerFactors(layer, ranks)
            # the factors ride on the variables they precondition: an optimizer rebuilt from
            # its config (Horovod's) finds them there
            layer.kernel.kfac_factors = factors
            if layer.use_bias:
                layer.bias.kfac_factors = factors
            layer.call = _keeping_inputs(layer.call, factors)
            layer.activation = _seeing_gradients(layer.activation, factors)
    if not found:
        raise ValueError(f"model {model.name!r} has no Dense or convolution layer with a "
                         f"trainable kernel to precondition")
    return found


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


def precondition(gradient, a_eigen, g_eigen, damping):
    """(A + ...)^-1 gradient (G + ...)^-1 for a layer's gradient as its kernel's rows (and the
    bias's last row), from A = Qa diag(la) Qa^T and G = Qg diag(lg) Qg^T given as (la, Qa)
    and (lg, Qg): Qa ((Qa^T gradient Qg) / (la lg^T + damping)) Qg^T, the damped Kronecker
    product's inverse."""
    (a_values, a_vectors), (g_values, g_vectors) = a_eigen, g_eigen
    rotated = tf.matmul(tf.matmul(a_vectors, gradient, transpose_a=True), g_vectors)
    scaled = rotated / (a_values[:, None] * g_values[None, :] + damping)
    return tf.matmul(tf.matmul(a_vectors, scaled), g_vectors, transpose_b=True)


def _decomposed(factor):
    """[eigenvalues, eigenvectors] of `factor`; the eigenvalues no lower than 0 (rounding can
    put a zero one just below)."""
    values, vectors = curvature.eigh(factor)
    return [tf.maximum(values, 0.0), vectors]


def layer_gradient(layer, kernel_gradient, bias_gradient=None):
    """The layer's gradient as one matrix: the kernel's rows, then the bias's."""
    rows = tf.reshape(kernel_gradient, [-1, kernel_gradient.shape[-1]])
    return rows if bias_gradient is None else tf.concat([rows, bias_gradient[None]], axis=0)


def preconditioning(optimizer, damping=0.003, factor_decay=0.95, factor_steps=1,
                    inverse_steps=1, kl_clip=None, grad_workers=None):
    """`optimizer` (a Keras 3 optimizer) made to precondition the gradients of the watched
    layers (watch) with K-FAC before its own update: the same class with Preconditioning
    before it, so that its learning rate, momentum and slots stay its own (Horovod's LR
    callbacks and momentum correction see them as ever). Every `factor_steps` updates the
    running factors take that update's batches' with weight 1 - `factor_decay` (the other
    updates' batches record none); every `inverse_steps` their eigendecompositions are
    taken anew. `kl_clip` (None or 0: off) scales the preconditioned gradients down so that
    the step's lr^2 <preconditioned, gradient>, summed over the layers, is at most it (Ba et
    al. 2017's KL clipping, KAISA's default 0.001). `grad_workers` (KAISA's): how many ranks
    keep each layer's decompositions and precondition its gradient, which they broadcast to
    the others; None or all of them (communication-optimal): every rank preconditions every
    layer; 1 (memory-optimal): one rank a layer."""
    cls = type(f"KFAC{type(optimizer).__name__}", (Preconditioning, type(optimizer)), {})
    return cls.from_config({**optimizer.get_config(), "kfac_damping": damping,
                            "kfac_factor_decay": factor_decay,
                            "kfac_factor_steps": factor_steps,
                            "kfac_inverse_steps": inverse_steps, "kfac_kl_clip": kl_clip,
                            "kfac_grad_workers": grad_workers})


# A layer's decompositions, each part's shape from its factor's: [n, n] vectors, [n] values
DECOMPOSITIONS = (("a_vectors", "a", 2), ("a_values", "a", 1), ("g_vectors", "g", 2),
                  ("g_values", "g", 1))


class Preconditioning(curvature.Configured):
    """The K-FAC half of preconditioning()'s class (before the base optimizer's in the MRO):
    its hyperparameters in the config; the running factors its variables, and so are the
    eigendecompositions where every rank keeps them all (`curvature`: LayerFactors ->
    {name: variable}), so that checkpoints and Horovod's broadcast hold them.

    With fewer gradient workers than ranks, a rank keeps only its layers' decompositions,
    apart from the optimizer's variables (`kept_apart`), and the checkpoints are those of
    every rank keeping all of them, whatever the placement: for the moment of a save the
    optimizer stands aside (`stands_aside`) for its `gathered_twin`, which keeps them all on
    the saving rank, and a restore goes through a `whole_twin` whose state it takes
    (`take_state`), as the sharded optimizer does (app.parallel.sharded_optimizer)."""

    HYPERPARAMETERS = ("kfac_damping", "kfac_factor_decay", "kfac_factor_steps",
                       "kfac_inverse_steps", "kfac_kl_clip", "kfac_grad_workers")
    # _grid: (column, row) of KAISA's grid this rank is in, with fewer gradient workers
    UNTRACKED = {"curvature": dict, "kept_apart": list, "_whole": bool, "_grid": tuple}

    def build(self, variables):
        super().build(variables)
        layers = []
        for variable in variables:
            factors = getattr(variable, "kfac_factors", None)
            if factors is not None and factors not in self.curvature and factors not in layers:
                layers.append(factors)
        if layers and not self._whole:  # a whole twin keeps the placement it stands in for
            self._place(layers)
        for factors in layers:
            if not self._whole:  # the optimizer that trains: its update count
                factors.taking = self._takes_factors
            name, dtype = factors.layer.name, factors.a.dtype
            state = self.curvature[factors] = {
                key: self.add_variable(getattr(factors, key).shape, dtype=dtype,
                                       name=f"{name}_kfac_{key}") for key in ("a", "g")}
            for key, factor, rank in DECOMPOSITIONS:
                shape = getattr(factors, factor).shape[:rank]
                if self._whole or factors.holders is None:
                    state[key] = self.add_variable(shape, dtype=dtype, name=f"{name}_kfac_{key}")
                    continue
                # Every rank builds the same graph (Horovod names the gradients' allreduces
                # by their place in it): a rank that does not keep a layer's decompositions
                # has them empty, of a shape left open.
                kept = factors.ranks.rank in factors.holders
                state[key] = tf.Variable(tf.zeros(shape if kept else [0] * rank, dtype),
                                         trainable=False, shape=tf.TensorShape(None),
                                         name=f"{name}_kfac_{key}")
                self.kept_apart.append(state[key])

    def _place(self, layers):
        """Where each layer's work goes on its ranks: with every rank a gradient worker, each
        factor's decomposition dealt on its own (curvature.placement); with fewer, KAISA's
        grid: a layer's two to one rank (both are needed where it is preconditioned),
        constrained to a column, whose ranks keep them."""
        ranks = layers[0].ranks
        workers = self.kfac_grad_workers or ranks.size
        if ranks.size % workers:
            raise ValueError(f"{workers} gradient workers do not divide the {ranks.size} ranks")
        if workers == ranks.size:
            every = [(factors, name) for factors in layers for name in ("a", "g")]
            owners = curvature.placement(
                [getattr(factors, name).shape[0] for factors, name in every], ranks.size)
            for (factors, name), owner in zip(every, owners):
                factors.owners[name] = owner
                factors.holders = None  # every rank (a placement made before may say fewer)
            return
        columns, rows = curvature.grad_worker_grid(ranks.size, workers)
        owners = curvature.grouped_placement(
            [factors.a.shape[0] ** 3 + factors.g.shape[0] ** 3 for factors in layers],
            columns, ranks.size)
        self._grid = (next(column for column in columns if ranks.rank in column),
                      next(row for row in rows if ranks.rank in row))
        for factors, owner in zip(layers, owners):
            factors.owners = {"a": owner, "g": owner}
            factors.holders = next(column for column in columns if owner in column)

    @property
    def stands_aside(self):
        """Whether checkpoints need a twin: a rank keeps only its layers' decompositions."""
        return any(factors.holders is not None for factors in self.curvature)

    def apply(self, grads, trainable_variables):
        grads, variables = list(grads), list(trainable_variables)
        if not self.built:
            self.build(variables)
        step = self.iterations
        tf.cond(self._takes_factors(), self._update_factors, lambda: None)
        tf.cond(tf.equal(step % self.kfac_inverse_steps, 0), self._update_inverses,
                lambda: None)
        return super().apply(self._preconditioned(grads, variables), variables)

    def _takes_factors(self):
        """Whether this update takes factors: `iterations` counts the updates, and the
        batches of one update (accumulated ones too) all see the same count."""
        return tf.equal(self.iterations % self.kfac_factor_steps, 0)

    def _update_factors(self):
        first = tf.equal(self.iterations, 0)  # the first batch's factors are the average
        decay = tf.where(first, tf.constant(0.0, tf.float64),
                         tf.constant(self.kfac_factor_decay, tf.float64))
        if not self.curvature:
            return
        layers = list(self.curvature.items())
        batches = layers[0][0].ranks.average([factor for factors, _ in layers
                                              for factor in factors.taken()])
        for (factors, state), (a, g) in zip(layers, zip(batches[::2], batches[1::2])):
            for name, batch in (("a", a), ("g", g)):
                state[name].assign(tf.cast(decay, batch.dtype) * state[name]
                                   + tf.cast(1 - decay, batch.dtype) * batch)

    def _update_inverses(self):
        """Each factor's eigendecomposition on the rank the placement gave it, then sent to
        the ranks that keep it: every rank (communication-optimal) or the layer's column of
        gradient workers."""
        if not self.curvature:
            return
        # With fewer gradient workers, a rank keeps only its column's layers' decompositions
        # (the others empty): the column sums them.
        jobs = [curvature.Job(factors.owners[name],
                              lambda factor=state[name]: _decomposed(factor),
                              [state[f"{name}_values"], state[f"{name}_vectors"]],
                              factors.decompositions[name])
                for factors, state in self.curvature.items() for name in ("a", "g")]
        curvature.run_on_owners(jobs, next(iter(self.curvature)).ranks,
                                self._grid[0] if self._grid else None)

    def _preconditioned(self, grads, variables):
        by_layer = {}
        for index, variable in enumerate(variables):
            factors = getattr(variable, "kfac_factors", None)
            if factors is not None and grads[index] is not None:  # None: not in the loss
                by_layer.setdefault(factors, {})[
                    "kernel" if variable is factors.layer.kernel else "bias"] = index
        by_layer = {factors: where for factors, where in by_layer.items() if "kernel" in where}
        found = {}
        for factors, where in by_layer.items():
            state = self.curvature[factors]
            kernel = grads[where["kernel"]]
            bias = grads[where["bias"]] if "bias" in where else None
            gradient = layer_gradient(factors.layer, kernel, bias)
            damping = tf.constant(self.kfac_damping, kernel.dtype)  # not tf.cast: via float32

            def preconditioned(gradient=gradient, state=state, damping=damping):
                return precondition(gradient, (state["a_values"], state["a_vectors"]),
                                    (state["g_values"], state["g_vectors"]), damping)
            if factors.holders is None:
                found[factors] = (gradient, preconditioned())
                continue
            # another rank of the row preconditions it and sends it here (_received)
            result = tf.cond(tf.constant(factors.ranks.rank in factors.holders),
                             preconditioned, lambda gradient=gradient: tf.zeros_like(gradient))
            found[factors] = (gradient, tf.ensure_shape(result, gradient.shape))
        found = self._received(found)
        scale = self._kl_clip_scale(found.values()) if found and self.kfac_kl_clip else None
        for factors, (_, result) in found.items():
            where, kernel = by_layer[factors], grads[by_layer[factors]["kernel"]]
            result = result if scale is None else result * tf.cast(scale, result.dtype)
            rows = kernel.shape[:-1].num_elements()
            grads[where["kernel"]] = tf.reshape(result[:rows], kernel.shape)
            if "bias" in where:
                grads[where["bias"]] = result[rows]
        return grads

    def _received(self, found):
        """`found` ({factors: (gradient, preconditioned)}) with each layer's preconditioned
        gradient from the gradient worker in this rank's row, where there are fewer workers
        than ranks: one grouped sum over the row, to which that worker gives its result and
        the others zeros (exact)."""
        if not self._grid or not found:
            return found
        _, row = self._grid
        received = next(iter(found)).ranks.add([result for _, result in found.values()], row,
                                               "kfac_preconditioned")
        return {factors: (gradient, value)
                for (factors, (gradient, _)), value in zip(found.items(), received)}

    def _kl_clip_scale(self, gradients_and_results):
        """min(1, sqrt(kl_clip / (lr^2 sum <preconditioned, gradient>))), in float64."""
        learning_rate = tf.cast(self.learning_rate, tf.float64)
        product = tf.add_n([tf.reduce_sum(tf.cast(result * gradient, tf.float64))
                            for gradient, result in gradients_and_results])
        bound = tf.constant(self.kfac_kl_clip, tf.float64)
        return tf.minimum(tf.constant(1.0, tf.float64),
                          tf.sqrt(bound / (learning_rate ** 2 * product)))

    def whole_twin(self):
        """This optimizer with every decomposition an optimizer variable, as where every rank
        keeps them all: its class from its config, built on the same variables (its state
        zeros), in the same placement."""
        twin = type(self).from_config(self.get_config())
        twin._whole = True
        twin.build(self._trainable_variables)
        return twin

    def gathered_twin(self, keep):
        """On the rank that `keep`s it, the whole twin holding this optimizer's state: its
        variables', and each decomposition broadcast from the rank that computed it, one at
        a time; None on the others. Every rank calls it."""
        twin = self.whole_twin() if keep else None
        if keep:
            for whole, own in twin.shared_variables(self):
                whole.assign(own)
        for factors, state in self.curvature.items():
            for key, factor, rank in DECOMPOSITIONS:
                value = (state[key] if factors.ranks.rank == factors.owners[factor] else
                         tf.zeros(getattr(factors, factor).shape[:rank], factors.a.dtype))
                [value] = factors.ranks.broadcast([tf.convert_to_tensor(value)],
                                                  [factors.owners[factor]],
                                                  [f"kfac_gathered_{factors.layer.name}_{key}"])
                if keep:
                    twin.curvature[factors][key].assign(value)
        return twin

    def take_state(self, twin):
        """Takes the state of `twin`, a whole twin: the variables both have, and the
        decompositions of the layers this rank keeps."""
        for whole, own in twin.shared_variables(self):
            own.assign(whole)
        for factors, state in self.curvature.items():
            if factors.holders is None or factors.ranks.rank in factors.holders:
                for key, _, _ in DECOMPOSITIONS:
                    state[key].assign(twin.curvature[factors][key])

    def shared_variables(self, apart):
        """(this whole twin's variable, `apart`'s) pairs of the variables both have, in the
        order both were built in: all of `apart`'s, which keeps its decompositions apart."""
        decompositions = {id(state[key]) for state in self.curvature.values()
                          for key, _, _ in DECOMPOSITIONS}
        return zip([variable for variable in self.variables
                    if id(variable) not in decompositions], apart.variables, strict=True)
