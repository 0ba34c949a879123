"""Large-batch optimizers as Keras 3 optimizers, so that hvd.DistributedOptimizer wraps them
like SGD and Horovod's LR callbacks drive their `learning_rate`:

- LARS (You, Gitman, Ginsburg 2017, Algorithm 1): momentum SGD whose step for each variable
  is scaled by the trust ratio eta * ||w|| / (||g|| + weight_decay * ||w||).
- LAMB (You et al. 2019, Algorithm 2): Adam's bias-corrected step plus decoupled weight
  decay, scaled per variable by ||w|| / ||step||.
- NovoGrad (Ginsburg et al. 2019): a second moment per variable (a scalar: the layer's
  gradient norm squared), the gradient normalized by it plus decoupled weight decay, then
  momentum with gradient averaging.

Their norms are taken through `_norm`, whose sums a sharded optimizer
(app.parallel.sharded_optimizer) completes over the ranks that hold the other pieces of a
variable.

Biases and normalization parameters (names holding one of EXCLUDED) get neither the trust
ratio nor weight decay, as the papers and their reference implementations do. A trust
ratio whose norms are zero is 1. Dense gradients only (the models here have no embeddings).

Keras 3's own `keras.optimizers.Lamb` is not this LAMB, even with
`exclude_from_weight_decay(var_names=EXCLUDED)`: its weight decay is the base class's
`w -= lr * weight_decay * w` before the step, outside the trust ratio (here it is added to
the step the ratio scales), and it scales every variable's step by the trust ratio, biases
and normalization parameters too.
"""
import keras
import tensorflow as tf

EXCLUDED = ("bias", "beta", "gamma")


def excluded(variable):
    """Whether `variable` is a bias or a normalization parameter, by its `name`: a Keras 3
    variable's short name ("bias"), or, for the tf.Variable inside it that Keras 3's
    TensorFlow backend hands update_step, its path and ":0" ("model/dense/bias:0"), of which
    the last part counts. Not `path`, whose layer names ("gamma_block/dense/kernel") say
    nothing of the kind."""
    leaf = variable.name.split("/")[-1]
    return any(name in leaf for name in EXCLUDED)


def _trust_ratio(numerator, denominator):
    return tf.where((numerator > 0) & (denominator > 0), numerator / denominator,
                    tf.ones_like(numerator))


class _LayerwiseOptimizer(keras.optimizers.Optimizer):
    """What the three share: weight decay inside their update, per-variable exclusion, the
    norms, dense gradients only."""

    def __init__(self, learning_rate, weight_decay, name, **kwargs):
        # Keras' own `weight_decay` is applied before update_step (w -= lr * wd * w), outside
        # the trust ratio: the base class gets None, and these keep theirs under another name.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.weight_decay_rate = weight_decay

    def _summed_over_shards(self, partial):
        """The sum over a whole variable of `partial`, a sum over the part of it this
        optimizer updates: all of it here (app.parallel.sharded_optimizer overrides this)."""
        return partial

    def _squared_norm(self, tensor):
        return self._summed_over_shards(tf.reduce_sum(tf.square(tensor)))

    def _norm(self, tensor):
        return tf.sqrt(self._squared_norm(tensor))

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            raise NotImplementedError(f"{self.__class__.__name__} takes dense gradients only")
        dtype = variable.dtype
        self._apply_dense(tf.cast(gradient, dtype), variable, tf.cast(learning_rate, dtype))

    def _apply_dense(self, gradient, variable, learning_rate):
        """Updates `variable` and its slots by `gradient`, all of the variable's dtype. The
        hyperparameters are cast with tf.cast, through float32 as tf_keras' hyperparameter
        variables were: float64 steps equal the tf_keras versions' bit for bit."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "weight_decay": self.weight_decay_rate}


# Registered, so that configs naming them (LossScaleOptimizer's inner optimizer, a saved
# .keras model) rebuild them.
@keras.saving.register_keras_serializable(package="hvd_keras")
class LARS(_LayerwiseOptimizer):
    def __init__(self, learning_rate=0.1, momentum=0.9, eta=0.001, weight_decay=0.0,
                 name="LARS", **kwargs):
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        self.momentum, self.eta = momentum, eta

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # named as Keras' SGD names them: Horovod's LR callbacks scale `momentums` (which hold
        # LR-scaled steps) by new LR / old LR, their momentum correction
        self.momentums = [self.add_variable_from_reference(variable, "momentum")
                          for variable in var_list]

    def _apply_dense(self, gradient, variable, learning_rate):
        if excluded(variable):
            update = gradient
        else:
            weight_norm, grad_norm = self._norm(variable), self._norm(gradient)
            local_lr = self.eta * _trust_ratio(
                weight_norm, grad_norm + self.weight_decay_rate * weight_norm)
            update = local_lr * (gradient + self.weight_decay_rate * variable)
        velocity = self.momentums[self._get_variable_index(variable)]
        momentum = tf.cast(self.momentum, variable.dtype)
        self.assign(velocity, momentum * velocity + learning_rate * update)
        self.assign_sub(variable, velocity)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "eta": self.eta}


@keras.saving.register_keras_serializable(package="hvd_keras")
class LAMB(_LayerwiseOptimizer):
    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
                 weight_decay=0.0, name="LAMB", **kwargs):
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # variable by variable, as Keras' own optimizers make theirs (app.convert_checkpoint)
        self.first_moments, self.second_moments = self.add_optimizer_variables(
            var_list, ["m", "v"])

    def _apply_dense(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        m, v = self.first_moments[index], self.second_moments[index]
        self.assign(m, beta_1 * m + (1 - beta_1) * gradient)
        self.assign(v, beta_2 * v + (1 - beta_2) * tf.square(gradient))
        m_hat, v_hat = m / (1 - tf.pow(beta_1, step)), v / (1 - tf.pow(beta_2, step))
        update = m_hat / (tf.sqrt(v_hat) + self.epsilon)
        if not excluded(variable):
            update += self.weight_decay_rate * variable
            update *= _trust_ratio(self._norm(variable), self._norm(update))
        self.assign_sub(variable, learning_rate * update)

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="hvd_keras")
class NovoGrad(_LayerwiseOptimizer):
    def __init__(self, learning_rate=0.01, beta_1=0.95, beta_2=0.98, epsilon=1e-8,
                 weight_decay=0.0, grad_averaging=True, name="NovoGrad", **kwargs):
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.epsilon, self.grad_averaging = epsilon, grad_averaging

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # variable by variable, as Keras' own optimizers make theirs (app.convert_checkpoint);
        # one second moment per variable (layer), named as add_variable_from_reference would
        self.first_moments, self.second_moments = [], []
        for variable in var_list:
            self.first_moments.append(self.add_variable_from_reference(variable, "m"))
            self.second_moments.append(self.add_variable(
                shape=(), dtype=variable.dtype, name=f"{variable.path.replace('/', '_')}_v"))

    def _apply_dense(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        m, v = self.first_moments[index], self.second_moments[index]
        squared_norm = self._squared_norm(gradient)
        self.assign(v, tf.where(tf.equal(self.iterations, 0), squared_norm,
                                beta_2 * v + (1 - beta_2) * squared_norm))
        update = gradient / (tf.sqrt(v) + self.epsilon)
        if not excluded(variable):
            update += self.weight_decay_rate * variable
        if self.grad_averaging:
            update *= 1 - beta_1
        self.assign(m, beta_1 * m + update)
        self.assign_sub(variable, learning_rate * m)

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "grad_averaging": self.grad_averaging}
