"""Large-batch optimizers as tf.keras legacy optimizers, so that hvd.DistributedOptimizer
wraps them like SGD and Horovod's LR callbacks drive their `learning_rate`:

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
"""
import tensorflow as tf

EXCLUDED = ("bias", "beta", "gamma")


def excluded(variable):
    """Whether `variable` is a bias or a normalization parameter, by its name."""
    leaf = variable.name.split("/")[-1]
    return any(name in leaf for name in EXCLUDED)


def _trust_ratio(numerator, denominator):
    return tf.where((numerator > 0) & (denominator > 0), numerator / denominator,
                    tf.ones_like(numerator))


class _LayerwiseOptimizer(tf.keras.optimizers.legacy.Optimizer):
    """What the three share: hyperparameters as Keras hypers, per-variable exclusion."""

    def __init__(self, name, learning_rate, weight_decay, **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self.weight_decay = weight_decay

    def _summed_over_shards(self, partial):
        """The sum over a whole variable of `partial`, a sum over the part of it this
        optimizer updates: all of it here (app.parallel.sharded_optimizer overrides this)."""
        return partial

    def _squared_norm(self, tensor):
        return self._summed_over_shards(tf.reduce_sum(tf.square(tensor)))

    def _norm(self, tensor):
        return tf.sqrt(self._squared_norm(tensor))

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise NotImplementedError(f"{self.__class__.__name__} takes dense gradients only")

    def get_config(self):
        return {**super().get_config(),
                "learning_rate": self._serialize_hyperparameter("learning_rate"),
                "weight_decay": self.weight_decay}


class LARS(_LayerwiseOptimizer):
    def __init__(self, learning_rate=0.1, momentum=0.9, eta=0.001, weight_decay=0.0,
                 name="LARS", **kwargs):
        super().__init__(name, learning_rate, weight_decay, **kwargs)
        self._set_hyper("momentum", momentum)
        self.eta = eta

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "momentum")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        dtype = var.dtype.base_dtype
        learning_rate = self._decayed_lr(dtype)
        momentum = self._get_hyper("momentum", dtype)
        velocity = self.get_slot(var, "momentum")
        if excluded(var):
            update = grad
        else:
            weight_norm, grad_norm = self._norm(var), self._norm(grad)
            local_lr = self.eta * _trust_ratio(weight_norm,
                                               grad_norm + self.weight_decay * weight_norm)
            update = local_lr * (grad + self.weight_decay * var)
        new_velocity = velocity.assign(momentum * velocity + learning_rate * update)
        return var.assign_sub(new_velocity)

    def get_config(self):
        return {**super().get_config(), "momentum": self._serialize_hyperparameter("momentum"),
                "eta": self.eta}


class LAMB(_LayerwiseOptimizer):
    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
                 weight_decay=0.0, name="LAMB", **kwargs):
        super().__init__(name, learning_rate, weight_decay, **kwargs)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon = epsilon

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")
            self.add_slot(var, "v")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        dtype = var.dtype.base_dtype
        learning_rate = self._decayed_lr(dtype)
        beta_1, beta_2 = self._get_hyper("beta_1", dtype), self._get_hyper("beta_2", dtype)
        step = tf.cast(self.iterations + 1, dtype)
        m = self.get_slot(var, "m").assign(beta_1 * self.get_slot(var, "m")
                                           + (1 - beta_1) * grad)
        v = self.get_slot(var, "v").assign(beta_2 * self.get_slot(var, "v")
                                           + (1 - beta_2) * tf.square(grad))
        m_hat, v_hat = m / (1 - tf.pow(beta_1, step)), v / (1 - tf.pow(beta_2, step))
        update = m_hat / (tf.sqrt(v_hat) + self.epsilon)
        if not excluded(var):
            update += self.weight_decay * var
            update *= _trust_ratio(self._norm(var), self._norm(update))
        return var.assign_sub(learning_rate * update)

    def get_config(self):
        return {**super().get_config(), "beta_1": self._serialize_hyperparameter("beta_1"),
                "beta_2": self._serialize_hyperparameter("beta_2"), "epsilon": self.epsilon}


class NovoGrad(_LayerwiseOptimizer):
    def __init__(self, learning_rate=0.01, beta_1=0.95, beta_2=0.98, epsilon=1e-8,
                 weight_decay=0.0, grad_averaging=True, name="NovoGrad", **kwargs):
        super().__init__(name, learning_rate, weight_decay, **kwargs)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon, self.grad_averaging = epsilon, grad_averaging

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")
            self.add_slot(var, "v", shape=[])  # one second moment per variable (layer)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        dtype = var.dtype.base_dtype
        learning_rate = self._decayed_lr(dtype)
        beta_1, beta_2 = self._get_hyper("beta_1", dtype), self._get_hyper("beta_2", dtype)
        squared_norm = self._squared_norm(grad)
        v_slot = self.get_slot(var, "v")
        v = v_slot.assign(tf.where(self.iterations == 0, squared_norm,
                                   beta_2 * v_slot + (1 - beta_2) * squared_norm))
        update = grad / (tf.sqrt(v) + self.epsilon)
        if not excluded(var):
            update += self.weight_decay * var
        if self.grad_averaging:
            update *= 1 - beta_1
        m = self.get_slot(var, "m").assign(beta_1 * self.get_slot(var, "m") + update)
        return var.assign_sub(learning_rate * m)

    def get_config(self):
        return {**super().get_config(), "beta_1": self._serialize_hyperparameter("beta_1"),
                "beta_2": self._serialize_hyperparameter("beta_2"), "epsilon": self.epsilon,
                "grad_averaging": self.grad_averaging}
