"""Optimizers by name. They are tf.keras legacy optimizers, which Horovod 0.28.1's Keras layer
was written for: their LR and momentum are variables, so LearningRateWarmupCallback can apply
its momentum correction. The large-batch ones (app.large_batch_optimizers) apply weight
decay inside their update, so the model gets no L2 loss for them.

The wrappers around them, in this order: for float16, Keras' loss scaling, then Horovod's
distributed optimizer (app.horovod) or the sharded one (app.parallel.sharded_optimizer)."""
import dataclasses
from typing import Callable

from app.horovod import tf  # first: it sets TF_USE_LEGACY_KERAS

from app import large_batch_optimizers

_legacy = tf.keras.optimizers


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer: `build(learning_rate, momentum, weight_decay)`, and whether the weight
    decay is inside its update (else the model gets it as an L2 loss)."""
    build: Callable
    description: str
    decay_inside: bool = False


OPTIMIZERS = {
    "sgd": Optimizer(lambda lr, momentum, decay: _legacy.SGD(lr), "plain SGD"),
    "momentum": Optimizer(lambda lr, momentum, decay: _legacy.SGD(lr, momentum=momentum),
                          "SGD with --momentum"),
    "adam": Optimizer(lambda lr, momentum, decay: _legacy.Adam(lr), "Adam"),
    "lars": Optimizer(lambda lr, momentum, decay: large_batch_optimizers.LARS(
        lr, momentum=momentum, weight_decay=decay), "LARS (You et al.), with --momentum",
        decay_inside=True),
    "lamb": Optimizer(lambda lr, momentum, decay: large_batch_optimizers.LAMB(
        lr, weight_decay=decay), "LAMB (You et al.)", decay_inside=True),
    "novograd": Optimizer(lambda lr, momentum, decay: large_batch_optimizers.NovoGrad(
        lr, weight_decay=decay), "NovoGrad (Ginsburg et al.)", decay_inside=True),
}


def build(name, learning_rate, momentum=0.0, weight_decay=0.0):
    """The optimizer `name` of OPTIMIZERS; `weight_decay` is used by those that decay inside
    their update only."""
    return OPTIMIZERS[name].build(learning_rate, momentum, weight_decay)


def l2_loss_weight_decay(name, weight_decay):
    """The weight decay the model's L2 loss carries for optimizer `name`: none where the
    optimizer decays the weights itself."""
    return 0.0 if OPTIMIZERS[name].decay_inside else weight_decay


def loss_scaled(optimizer, mixed_precision):
    """For --mixed_precision=float16, Keras' dynamic loss scaling, inside the distributed
    optimizer: the ranks allreduce the scaled gradients before it checks them, so an overflow
    on any rank reaches every rank, and all of them skip that step and lower the scale alike.
    bfloat16 has float32's range and needs none."""
    if mixed_precision == "float16":
        return tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def create_slots(optimizer, variables):
    """Creates the optimizer's variables (iterations, momentum or moment slots) now, which
    legacy Keras optimizers defer to their first step: Horovod's elastic sync broadcasts
    them, so a worker that joins a running job must already hold the same ones."""
    optimizer.build(variables)
