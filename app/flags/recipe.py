"""The training recipe: batch sizes and the length of training, the learning rate (its scaling
with the global batch, warmup and schedule) and the optimizer; their checks, and the values
app.arithmetic computes from them."""
from absl import flags

from app import arithmetic, optimizers
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
    flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum and lars.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("weight_decay", 0.0,
                       "Weight decay on kernels: an L2 loss, or inside the update of lars, lamb "
                       "and novograd.", lower_bound=0.0)


DEFINES = (define_batch_flags, define_learning_rate_flags, define_optimizer_flags)


def check(world_size):
    """The length of training and the LR are given; the warmup ends before the last epoch, and
    the step schedule's epochs fall within training. (The batch is checked against the
    processes with the kind of parallelism, which divides it.)"""
    del world_size
    require("epochs", "learning_rate")
    if FLAGS.warmup_epochs and FLAGS.warmup_epochs >= FLAGS.epochs:
        raise invalid("warmup_epochs", f"must be shorter than --epochs={FLAGS.epochs}")
    decay_epochs()


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
