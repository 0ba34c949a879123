"""The training recipe: batch sizes and the length of training, the learning rate (its scaling
with the global batch, warmup and schedule) and the optimizer; their checks, and the values
app.arithmetic computes from them."""
from absl import flags

from app import arithmetic, optimizers, shampoo
from app.flags.common import FLAGS, choices, invalid, require

BATCH_FLAGS = ("batch_size", "global_batch_size")  # exactly one of them


def define_batch_flags():
    """Batch sizes and the length of training."""
    flags.DEFINE_integer("batch_size", None,
                         "Examples per process per step (with --pipeline_stages: per pipeline "
                         "of stages).", lower_bound=1)
    flags.DEFINE_integer("global_batch_size", None,
                         "Examples per step over all processes (batch_size x processes, or x "
                         "pipelines); give this or --batch_size, not both.", lower_bound=1)
    flags.DEFINE_integer("accumulation_steps", 1,
                         "Batches whose gradients each process adds up before one allreduce and "
                         "update (Horovod's backward_passes_per_step); counted in the global "
                         "batch: batch_size x processes x accumulation_steps.", lower_bound=1)
    flags.DEFINE_integer("epochs", None, "Epochs to train.", lower_bound=1)
    flags.DEFINE_integer("steps_per_epoch", None,
                         "Steps per epoch (default: one pass over the training split at the "
                         "global batch).", lower_bound=1)
    flags.DEFINE_integer("validation_steps", None,
                         "Validation batches per process (default: each process's whole share "
                         "of the validation split).", lower_bound=1)


def define_learning_rate_flags():
    """The learning rate: its scaling with the global batch, warmup and schedule."""
    flags.DEFINE_float("learning_rate", None,
                       "Base learning rate (app.train: the LR at --reference_batch_size).",
                       lower_bound=0.0)
    flags.DEFINE_enum("lr_scaling", "linear", list(arithmetic.LR_SCALING_RULES),
                      "Scales the base LR by global batch / reference batch (linear, Goyal et "
                      "al.) or its square root.")
    flags.DEFINE_integer("reference_batch_size", 256,
                         "Global batch at which --learning_rate is the right LR.", lower_bound=1)
    flags.DEFINE_integer("warmup_epochs", 0,
                         "Epochs of gradual warmup from the LR at --reference_batch_size to the "
                         "scaled LR (Goyal et al.): none at the reference batch, and the same at "
                         "any number of processes for the same global batch.", lower_bound=0)
    flags.DEFINE_enum("lr_schedule", "constant", ["constant", "step", "cosine"],
                      "LR after warmup: constant; step (x --lr_decay_factor at each of "
                      "--lr_decay_epochs); cosine (to 0 at the last epoch).")
    flags.DEFINE_list("lr_decay_epochs", [], "Epochs at which the step schedule decays the LR.")
    flags.DEFINE_float("lr_decay_factor", 0.1, "Step schedule's LR multiplier.",
                       lower_bound=0.0, upper_bound=1.0)


def define_optimizer_flags():
    """The optimizer and its regularization."""
    flags.DEFINE_enum("optimizer", "momentum", list(optimizers.OPTIMIZERS),
                      "Optimizer (app.optimizers.OPTIMIZERS): "
                      + choices(optimizers.OPTIMIZERS))
    flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum and lars (and of "
                       "kfac and shampoo with --base_optimizer=momentum).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("weight_decay", 0.0,
                       "Weight decay on kernels: an L2 loss, or inside the update of lars, lamb "
                       "and novograd.", lower_bound=0.0)


def define_preconditioner_flags():
    """The preconditioners' settings: K-FAC's (--optimizer=kfac, with kfac-pytorch's CIFAR-10
    ResNet defaults) and Shampoo's (--optimizer=shampoo)."""
    flags.DEFINE_enum("base_optimizer", "momentum", list(optimizers.BASE_OPTIMIZERS),
                      "The first-order update --optimizer=kfac or shampoo preconditions.")
    flags.DEFINE_float("kfac_damping", 0.003,
                       "Added to the products of the factors' eigenvalues before dividing "
                       "(measured: right at batch 1024, too small from 4096, where 0.3 "
                       "trains; docs/higher-order.md).",
                       lower_bound=0.0)
    flags.DEFINE_float("kfac_factor_decay", 0.95,
                       "Weight of the running factors against a new update's.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("kfac_factor_steps", 1,
                         "Steps between updates of the running factors (from the mean of the "
                         "batches since the last).", lower_bound=1)
    flags.DEFINE_integer("kfac_inverse_steps", 10,
                         "Steps between the factors' eigendecompositions.", lower_bound=1)
    flags.DEFINE_float("kfac_kl_clip", 0.001,
                       "Bound on lr^2 <preconditioned gradient, gradient> of a step, by which "
                       "the preconditioned gradients are scaled down (0: none).",
                       lower_bound=0.0)
    flags.DEFINE_integer("kfac_grad_workers", None,
                         "Ranks that keep each layer's eigendecompositions and precondition "
                         "its gradient, which they send to the others (KAISA's gradient "
                         "workers; must divide the processes): all, the default, "
                         "communication-optimal, down to 1, memory-optimal.", lower_bound=1)
    flags.DEFINE_integer("shampoo_block_size", 128,
                         "Largest side of the blocks a weight matrix is cut into, each with its "
                         "own preconditioners.", lower_bound=1)
    flags.DEFINE_float("shampoo_beta2", 1.0,
                       "Statistics: summed over the steps at 1, else running averages with "
                       "this weight on the old.", lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("shampoo_epsilon", 1e-6,
                       "Ridge added to each statistic before its inverse root, relative to its "
                       "largest eigenvalue.", lower_bound=0.0)
    flags.DEFINE_integer("shampoo_root_steps", 10,
                         "Steps between the inverse fourth roots.", lower_bound=1)
    flags.DEFINE_enum("shampoo_grafting", "sgd", list(shampoo.GRAFTINGS),
                      "The first-order method whose step's norm each block's takes: sgd (the "
                      "gradient's) or adagrad.")


DEFINES = (define_batch_flags, define_learning_rate_flags, define_optimizer_flags,
           define_preconditioner_flags)
# Each preconditioner's flags (--base_optimizer is theirs together).
PRECONDITIONER_FLAGS = {
    "kfac": ("kfac_damping", "kfac_factor_decay", "kfac_factor_steps", "kfac_inverse_steps",
             "kfac_kl_clip", "kfac_grad_workers"),
    "shampoo": ("shampoo_block_size", "shampoo_beta2", "shampoo_epsilon", "shampoo_root_steps",
                "shampoo_grafting")}
ABOVE_ZERO, BELOW_ONE = ("kfac_damping", "shampoo_epsilon"), ("kfac_factor_decay",)


def check(world_size):
    """The length of training and the LR are given; the warmup ends before the last epoch, and
    the step schedule's epochs fall within training. (The batch is checked against the
    processes with the kind of parallelism, which divides it.)"""
    require("epochs", "learning_rate")
    if FLAGS.warmup_epochs and FLAGS.warmup_epochs >= FLAGS.epochs:
        raise invalid("warmup_epochs", f"must be shorter than --epochs={FLAGS.epochs}")
    decay_epochs()
    check_preconditioner(world_size)


def check_preconditioner(world_size):
    """A preconditioner's flags only with it (set to other than their defaults), values that
    divide by nothing refused; and a preconditioner only where its curvature means what it
    should: not with the optimizer state sharded, the model cut in stages or parts (a rank
    would see a part of a layer or of its inputs), elastic worker counts (its placement is
    made for one), or float16 (its loss scale would be in K-FAC's G; Keras' loss scaling
    rebuilds its inner optimizer by a registered class, which a preconditioned one is
    not)."""
    if not optimizers.preconditions(FLAGS.optimizer):
        if _changed("base_optimizer"):
            raise invalid("base_optimizer", f"is --optimizer={' or '.join(PRECONDITIONER_FLAGS)}"
                                            f"'s, not --optimizer={FLAGS.optimizer}'s")
    for owner, names in PRECONDITIONER_FLAGS.items():
        for name in names:
            if owner != FLAGS.optimizer and _changed(name):
                raise invalid(name, f"is --optimizer={owner}'s, not "
                                    f"--optimizer={FLAGS.optimizer}'s")
    if not optimizers.preconditions(FLAGS.optimizer):
        return
    refused = {"shard_optimizer_state": FLAGS.shard_optimizer_state,
               "shard_gradients": FLAGS.shard_gradients,
               "pipeline_stages": FLAGS.pipeline_stages > 1,
               "microbatches": FLAGS.microbatches > 1, "recompute": FLAGS.recompute,
               "spatial_parts": FLAGS.spatial_parts > 1, "elastic": FLAGS.elastic,
               "mixed_precision": FLAGS.mixed_precision == "float16"}
    for name, set_ in refused.items():
        if set_:
            raise invalid(name, f"is not supported with --optimizer={FLAGS.optimizer}")
    if FLAGS.optimizer == "kfac" and world_size % (FLAGS.kfac_grad_workers or world_size):
        raise invalid("kfac_grad_workers", f"must divide the {world_size} processes")
    for name in PRECONDITIONER_FLAGS[FLAGS.optimizer]:
        if name in ABOVE_ZERO and FLAGS[name].value == 0:  # a factor's eigenvalues can be 0
            raise invalid(name, "must be above 0: it keeps the inverse of a singular matrix finite")
        if name in BELOW_ONE and FLAGS[name].value == 1:
            raise invalid(name, "must be below 1: at 1 the running factors never change")


def _changed(name):
    """Whether --`name` differs from its default (a run's resolved flags.cfg gives every flag,
    at its default too)."""
    return FLAGS[name].value != FLAGS[name].default


def preconditioner_settings():
    """The preconditioner's keyword arguments (app.kfac's or app.shampoo's preconditioning:
    its flags' names without the prefix); {} for the other optimizers."""
    prefix = f"{FLAGS.optimizer}_"
    return {name[len(prefix):]: FLAGS[name].value
            for name in PRECONDITIONER_FLAGS.get(FLAGS.optimizer, ())}


def batch_request():
    """The batch the flags ask for (app.arithmetic's BatchRequest)."""
    return arithmetic.BatchRequest(FLAGS.batch_size, FLAGS.global_batch_size,
                                   FLAGS.accumulation_steps)


def decay_epochs():
    """The step schedule's decay epochs, () for the other schedules."""
    if FLAGS.lr_schedule != "step":
        return ()
    return arithmetic.decay_epochs(FLAGS.lr_decay_epochs, FLAGS.epochs)


def scaled_learning_rate(global_batch):
    """--learning_rate scaled from --reference_batch_size to `global_batch`."""
    return arithmetic.scaled_learning_rate(FLAGS.learning_rate, global_batch,
                                           FLAGS.reference_batch_size, FLAGS.lr_scaling)
