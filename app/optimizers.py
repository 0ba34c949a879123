"""Optimizers by name, Keras 3's: SGD, Adam and the large-batch ones
(app.large_batch_optimizers), which apply weight decay inside their update, so the model gets
no L2 loss for them. Horovod's LR callbacks set their `learning_rate` variable; on Keras 3
(in the project's patched Horovod) their momentum correction scales the momentum buffers,
`momentums` (SGD's and LARS's, which hold LR-scaled steps), by new LR / old LR.

Keras 3's SGD and Adam compute what tf_keras' legacy ones did. SGD's momentum is
v = momentum * v - lr * g, w += v in both (5 steps equal bit for bit). Adam's epsilon is
outside the bias-corrected square root ("epsilon hat") in both, 1e-7 by default; but Keras
3's takes beta and 1 - beta in double precision where the legacy one took them from beta
rounded to float32 (1 - beta_2: 0.001, not 0.00099998713), which moves the weights by
1.8e-6 relative after 5 steps at LR 0.1, in float32 and float64 alike.

K-FAC (app.kfac) and Shampoo (app.shampoo) precondition a base optimizer's update
(--base_optimizer); K-FAC watches the model's layers (watch) before the optimizer is built.

The wrappers around them, in this order: for float16, Keras' loss scaling, then Horovod's
distributed optimizer (app.horovod) or the sharded one (app.parallel.sharded_optimizer)."""
import dataclasses
from typing import Callable

from app.horovod import keras, tf  # first: it sets TF_XLA_FLAGS

from app import curvature, kfac, large_batch_optimizers, shampoo


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer: `build(learning_rate, momentum, weight_decay)`, whether the weight
    decay is inside its update (else the model gets it as an L2 loss), and the names of each
    variable's slots in the checkpoints of the project's tf_keras version, in the order the
    Keras 3 optimizer makes them (app.convert_checkpoint). A preconditioner instead has
    `precondition(base optimizer, **settings)`, maybe `watch(model)`, called first, and
    maybe `process_sets(world_size, **settings)`, Horovod's that it communicates in."""
    build: Callable
    description: str
    decay_inside: bool = False
    tf_keras_slots: tuple = ()
    precondition: Callable = None
    watch: Callable = None
    process_sets: Callable = None


OPTIMIZERS = {
    "sgd": Optimizer(lambda lr, momentum, decay: keras.optimizers.SGD(lr), "plain SGD"),
    "momentum": Optimizer(lambda lr, momentum, decay: MomentumSGD(lr, momentum=momentum),
                          "SGD with --momentum", tf_keras_slots=("momentum",)),
    "adam": Optimizer(lambda lr, momentum, decay: keras.optimizers.Adam(lr), "Adam",
                      tf_keras_slots=("m", "v")),
    "lars": Optimizer(lambda lr, momentum, decay: large_batch_optimizers.LARS(
        lr, momentum=momentum, weight_decay=decay), "LARS (You et al.), with --momentum",
        decay_inside=True, tf_keras_slots=("momentum",)),
    "lamb": Optimizer(lambda lr, momentum, decay: large_batch_optimizers.LAMB(
        lr, weight_decay=decay), "LAMB (You et al.)", decay_inside=True,
        tf_keras_slots=("m", "v")),
    "novograd": Optimizer(lambda lr, momentum, decay: large_batch_optimizers.NovoGrad(
        lr, weight_decay=decay), "NovoGrad (Ginsburg et al.)", decay_inside=True,
        tf_keras_slots=("m", "v")),
    "kfac": Optimizer(None, "K-FAC (Martens and Grosse; distributed as KAISA) preconditioning "
                      "--base_optimizer", precondition=kfac.preconditioning,
                      watch=lambda model: kfac.watch(model, curvature.horovod_ranks()),
                      process_sets=lambda world_size, grad_workers=None, **_:
                      curvature.process_sets(world_size, grad_workers or world_size)),
    "shampoo": Optimizer(None, "Shampoo (Gupta et al.; distributed as Anil et al.) "
                         "preconditioning --base_optimizer", precondition=lambda base, **settings:
                         shampoo.preconditioning(base, ranks=curvature.horovod_ranks(),
                                                 **settings)),
}
# What a preconditioner's --base_optimizer can be.
BASE_OPTIMIZERS = ("momentum", "adam")


@keras.saving.register_keras_serializable(package="app")
class MomentumSGD(keras.optimizers.SGD):
    """Keras 3's SGD with momentum, each variable's update in TensorFlow's one fused kernel
    (ResourceApplyKerasMomentum, which tf_keras ran: the same formula, v = momentum * v -
    lr * g, w += v); Keras 3 composes it of five operations per variable, which cost
    ResNet-50's 161 variables a tenth of a step on 2 processes (BENCHMARKS.md)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or self.nesterov:
            return super().update_step(gradient, variable, learning_rate)
        velocity = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=velocity.handle,
            lr=tf.cast(learning_rate, variable.dtype), grad=tf.cast(gradient, variable.dtype),
            momentum=tf.cast(self.momentum, variable.dtype), use_locking=False)


# float16's loss scaling's variables (keras.optimizers.LossScaleOptimizer's).
LOSS_SCALE_VARIABLES = ("dynamic_scale", "step_counter")
# An optimizer's own variables, by the last part of their path; the others are slots.
OWN_VARIABLES = ("iteration", "learning_rate", *LOSS_SCALE_VARIABLES)


def state_elements(optimizer):
    """The elements of the optimizer's state on this rank (a sharded optimizer's slots of its
    pieces, `all_variables`; K-FAC's decompositions it keeps apart), without the iteration
    count and the learning rate."""
    variables = [*getattr(optimizer, "all_variables", optimizer.variables),
                 *getattr(optimizer, "kept_apart", ())]
    return sum(int(tf.size(variable)) for variable in variables  # K-FAC's: shapes left open
               if variable.name not in OWN_VARIABLES)


def build(name, learning_rate, momentum=0.0, weight_decay=0.0, base=None, settings=None):
    """The optimizer `name` of OPTIMIZERS; `weight_decay` is used by those that decay inside
    their update only; a preconditioner's is `base` preconditioned with `settings` (a dict
    of its hyperparameters)."""
    if not preconditions(name):
        return OPTIMIZERS[name].build(learning_rate, momentum, weight_decay)
    return OPTIMIZERS[name].precondition(build(base, learning_rate, momentum, weight_decay),
                                         **(settings or {}))


def preconditions(name):
    """Whether optimizer `name` preconditions a base optimizer's update (K-FAC, Shampoo)."""
    return OPTIMIZERS[name].precondition is not None


def watch(name, model):
    """What optimizer `name` must see of `model` before it is built (K-FAC: its layers'
    inputs and output gradients); nothing for the others."""
    if OPTIMIZERS[name].watch is not None:
        OPTIMIZERS[name].watch(model)


def process_sets(name, world_size, settings):
    """The process sets optimizer `name` with `settings` communicates in on `world_size`
    processes, which hvd.init must register (K-FAC's gradient workers' grid); none for
    the others."""
    if OPTIMIZERS[name].process_sets is None:
        return []
    return OPTIMIZERS[name].process_sets(world_size, **settings)


def l2_loss_weight_decay(name, weight_decay, base=None):
    """The weight decay the model's L2 loss carries for optimizer `name` (a preconditioner:
    its `base`): none where the optimizer decays the weights itself."""
    return 0.0 if OPTIMIZERS[base if preconditions(name) else name].decay_inside else weight_decay


def loss_scaled(optimizer, mixed_precision):
    """For --mixed_precision=float16, Keras' dynamic loss scaling, inside the distributed
    optimizer: the ranks allreduce the scaled gradients before it checks them, so an overflow
    on any rank reaches every rank, and all of them skip that step and lower the scale alike.
    bfloat16 has float32's range and needs none."""
    if mixed_precision == "float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def create_slots(optimizer, variables):
    """Builds the optimizer on `variables` now (its momentum or moment slots; the iteration
    count and LR it made at construction), which Keras 3 optimizers otherwise do when fit()
    starts or at their first apply() (a pipeline stage's): Horovod's momentum correction
    scales them at the first LR change, and its elastic sync broadcasts them, so a worker
    that joins a running job must already hold the same ones."""
    optimizer.build(variables)


def slots_by_variable(optimizer, variables):
    """[the slots of each of `variables`] of an optimizer built on them (under float16's loss
    scaling, its inner optimizer's): Keras 3's optimizers make each variable's slots
    together, in the variables' order, after their own variables."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    slots = [variable for variable in inner.variables
             if variable.path.split("/")[-1] not in OWN_VARIABLES]
    per_variable, left = divmod(len(slots), len(variables))
    if left:
        raise ValueError(f"{type(inner).__name__} has {len(slots)} slots for "
                         f"{len(variables)} variables")
    return [slots[index * per_variable:(index + 1) * per_variable]
            for index in range(len(variables))]
