"""Every flag of app.train, how they are resolved and how they are checked.

Resolution follows the TF Model Garden: the experiment's registry defaults, then the
flagfile, then the command line (absl expands --flagfile in place, so a later command-line
flag overrides it). Everything is checked before Horovod starts or any data is read; a bad
value ends the process with one line naming the flag and the reason, and exit code 2. Every
rank parses the same arguments, so every rank exits the same way and nothing hangs; only
rank 0 prints the line.
"""
import math
import os
import sys
import tempfile

from absl import flags

import input_pipeline
import models
from app import optimizers
from app.experiments import EXPERIMENTS

FLAGS = flags.FLAGS
USAGE_ERROR = 2
RUN_ERROR = 1

flags.DEFINE_enum("experiment", "digits_cnn", sorted(EXPERIMENTS),
                  "Registry entry whose defaults the flagfile and command line override.")
flags.DEFINE_enum("model", None, sorted(models.BUILDERS), "Model to build.")
flags.DEFINE_enum("dataset", None, input_pipeline.DATASETS, "Data set to train on.")
flags.DEFINE_string("data_dir", None,
                    "Prepared data (TFDS data_dir, or the folder of TFRecord shards); on a "
                    "cluster, a shared filesystem. Nothing is downloaded at training time.")
flags.DEFINE_string("model_dir", None,
                    "Where every output of the run goes (default: runs/EXPERIMENT); a run "
                    "resumes from the latest checkpoint found here.")
flags.DEFINE_string("init_checkpoint", None,
                    "Checkpoint (path prefix, e.g. OTHER_RUN/checkpoints/epoch-10) whose model "
                    "weights start a new run; the optimizer starts afresh. Ignored when "
                    "--model_dir already holds a checkpoint to resume from.")
flags.DEFINE_integer("batch_size", None, "Examples per process per step.", lower_bound=1)
flags.DEFINE_integer("global_batch_size", None,
                     "Examples per step over all processes (batch_size x processes); give "
                     "this or --batch_size, not both.", lower_bound=1)
flags.DEFINE_integer("epochs", None, "Epochs to train.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None,
                     "Steps per epoch (default: one pass over the training split at the "
                     "global batch).", lower_bound=1)
flags.DEFINE_integer("validation_steps", None,
                     "Validation batches per process (default: each process's whole share "
                     "of the validation split).", lower_bound=1)
flags.DEFINE_integer("image_size", None, "Image side in pixels, for image data sets that "
                     "resize.", lower_bound=8)
flags.DEFINE_float("learning_rate", None,
                   "Base learning rate (app.train: the LR at --reference_batch_size).",
                   lower_bound=0.0)
flags.DEFINE_enum("lr_scaling", "linear", ["none", "linear", "sqrt"],
                  "Scales the base LR by global batch / reference batch (linear, Goyal et "
                  "al.) or its square root.")
flags.DEFINE_integer("reference_batch_size", 256,
                     "Global batch at which --learning_rate is the right LR.", lower_bound=1)
flags.DEFINE_integer("warmup_epochs", 0,
                     "Epochs of Horovod's gradual warmup from LR / processes to the scaled "
                     "LR (Goyal et al.).", lower_bound=0)
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "step", "cosine"],
                  "LR after warmup: constant; step (x --lr_decay_factor at each of "
                  "--lr_decay_epochs); cosine (to 0 at the last epoch).")
flags.DEFINE_list("lr_decay_epochs", [], "Epochs at which the step schedule decays the LR.")
flags.DEFINE_float("lr_decay_factor", 0.1, "Step schedule's LR multiplier.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("optimizer", "momentum", list(optimizers.NAMES),
                  "Optimizer: sgd, momentum, adam, or the large-batch LARS, LAMB and NovoGrad "
                  "(app/large_batch_optimizers.py).")
flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum and lars.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("accumulation_steps", 1,
                     "Batches whose gradients each process adds up before one allreduce and "
                     "update (Horovod's backward_passes_per_step); counted in the global "
                     "batch: batch_size x processes x accumulation_steps.", lower_bound=1)
flags.DEFINE_bool("fp16_allreduce", False,
                  "Allreduce the gradients in float16 (Horovod's fp16 compression): half the "
                  "bytes on the wire, float16 rounding of the averaged gradients.")
flags.DEFINE_bool("adasum", False,
                  "Combine the ranks' gradients with Horovod's Adasum instead of averaging: "
                  "what they share is averaged, what they do not is added up, so the LR "
                  "scales with one process's batch (one node's on GPUs with NCCL). Needs "
                  "Horovod's MPI controller and a power-of-2 number of processes.")
flags.DEFINE_enum("mixed_precision", None, ["float16", "bfloat16"],
                  "Compute in this type, keep the variables in float32 (Keras' mixed "
                  "precision); float16 adds dynamic loss scaling around Horovod's optimizer.")
flags.DEFINE_bool("jit_compile", False,
                  "Compile the training step's ops with XLA around Horovod's collectives "
                  "(TensorFlow's auto-clustering; on CPUs too), as NVIDIA's Horovod examples "
                  "do: Horovod 0.28.1 cannot compile its own ops with Keras' jit_compile on "
                  "CPUs.")
flags.DEFINE_bool("sync_batch_norm", False,
                  "Batch normalization over the global batch: the models' BatchNormalization "
                  "layers become SyncBatchNormalization (Horovod's, guarded against a "
                  "negative variance), which allreduces their statistics at every step.")
flags.DEFINE_float("weight_decay", 0.0,
                   "Weight decay on kernels: an L2 loss, or inside the update of lars, lamb "
                   "and novograd.", lower_bound=0.0)
flags.DEFINE_integer("seed", 42, "Seed of initialization, shuffling and augmentation.")
flags.DEFINE_integer("threads_per_process", 0,
                     "TensorFlow intra-op and tf.data threads per process (0: the cores "
                     "divided among the processes on the node).", lower_bound=0)
flags.DEFINE_string("cache", "none",
                    "Cache of the (sharded) raw records: none, memory, or a file path prefix.")
flags.DEFINE_bool("skip_corrupt", False,
                  "Drop TFRecord records that cannot be read or decoded, and report how many, "
                  "instead of stopping at the first one.")
flags.DEFINE_integer("shuffle_buffer", 10_000, "Shuffle buffer, in examples.", lower_bound=1)
flags.DEFINE_bool("deterministic", False,
                  "Deterministic ops and data order; every global batch holds the same "
                  "examples at any number of processes, so results do not depend on it.")

flags.DEFINE_integer("steps_per_execution", 1,
                     "Training steps per call of Keras' compiled train function: fewer Python "
                     "round trips per step, for small models; per-batch callbacks (LR warmup "
                     "and schedule, throughput) then act once per call.", lower_bound=1)

flags.DEFINE_bool("benchmark", False,
                  "Measure training throughput: no validation, checkpoints, resume or "
                  "TensorBoard; images/s per process and in total on stdout and in "
                  "results.json.")
flags.DEFINE_integer("warmup_steps", 10,
                     "Training steps left out of the throughput (tracing, first allreduces, "
                     "pipeline fill).", lower_bound=0)
flags.DEFINE_bool("timeline", False,
                  "Write Horovod's timeline (chrome://tracing) to MODEL_DIR/timeline.json.")

flags.DEFINE_integer("summary_steps", 10,
                     "Training steps between TensorBoard's per-step scalars (loss, accuracy, "
                     "learning rate, images/s, global batch).", lower_bound=1)
flags.DEFINE_list("profile_steps", [],
                  "START,END: TensorFlow's profiler traces these training steps of the run "
                  "(counted from 1) into TensorBoard's profile tab.")

flags.DEFINE_float("target_accuracy", None,
                   "End training after the first epoch whose validation accuracy (averaged "
                   "over the ranks) reaches this.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("time_budget", None,
                   "End training after the epoch in which this many seconds of training "
                   "(rank 0's clock, from the first step) have passed.", lower_bound=0.0)

flags.DEFINE_bool("elastic", False,
                  "Elastic training: workers may leave and join while it runs (Horovod's "
                  "elastic mode; start it with python -m app.launch --host_discovery_script). "
                  "With --batch_size the per-process batch stays, so the global batch and the "
                  "LR follow the number of workers.")
flags.DEFINE_integer("commit_steps", 100,
                     "Elastic: steps between commits of the training state (and at every "
                     "epoch end); a failed worker costs at most these steps, and a change of "
                     "workers takes effect at the next commit.", lower_bound=1)

NEEDS_DATA_DIR = ("fashion_mnist", "cifar10", "imagenet")
_BATCH_FLAGS = ("batch_size", "global_batch_size")


class FlagError(ValueError):
    """A flag value that cannot run, named by its flag."""

    def __init__(self, flag, reason):
        value = FLAGS[flag].value
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        super().__init__(f"--{flag}={shown}: {reason}")


def fail(message, code=USAGE_ERROR, this_rank_only=False):
    """Ends this process with `code` after one line on stderr, printed by rank 0 for what
    every rank finds alike, or by this rank for what only it met (`this_rank_only`)."""
    if this_rank_only or rank_from_environment() == 0:
        print(f"{_program()}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _program():
    """The running entry point as the user named it: `python -m`'s module, or the console
    script (hvd-train, ...)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec else os.path.basename(sys.argv[0])


def parser(check):
    """An absl flags_parser for app.run: parses, then calls `check(argv)`, which raises
    FlagError for a value that cannot run; any error ends the process with one line."""
    def parse(argv):
        try:
            remaining = FLAGS(argv)
            if FLAGS["verbosity"].using_default_value:  # else absl.app makes it INFO, and
                FLAGS.verbosity = -1  # TensorFlow logs each checkpoint's sharding on rank 0
            if len(remaining) > 1:
                raise flags.Error(f"unexpected arguments: {' '.join(remaining[1:])}")
            check(argv)
        except (flags.Error, FlagError) as error:
            fail(error)
        return remaining
    return parse


def _check_training_flags(argv):
    """app.train's: the experiment's defaults where nothing else was given, then validate."""
    _prefer_command_line_batch_flag(argv)
    _apply_experiment_defaults()
    validate(world_size_from_environment())


parse = parser(_check_training_flags)


def _prefer_command_line_batch_flag(argv):
    """When the flagfile gives one batch flag and the command line the other, the command
    line wins, as for any flag; both on the same level stay an error."""
    given = [name for name in _BATCH_FLAGS if FLAGS[name].present]
    on_command_line = {arg[2:].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}
    if len(given) == 2 and len(on_command_line.intersection(given)) == 1:
        FLAGS[next(name for name in given if name not in on_command_line)].unparse()


def _apply_experiment_defaults():
    """Registry defaults for every flag neither the flagfile nor the command line set; the
    two batch flags go together, since exactly one of them may be set."""
    batch_given = any(FLAGS[name].present for name in _BATCH_FLAGS)
    for name, value in EXPERIMENTS[FLAGS.experiment].defaults.items():
        if FLAGS[name].present or (name in _BATCH_FLAGS and batch_given):
            continue
        FLAGS.set_default(name, value)
    if FLAGS.model_dir is None:
        FLAGS.set_default("model_dir", os.path.join("runs", FLAGS.experiment))


def validate(world_size):
    """Raises FlagError for the first flag that cannot run with `world_size` processes."""
    for name in ("model", "dataset", "epochs", "learning_rate"):
        if FLAGS[name].value is None:
            raise FlagError(name, "is required (the experiment sets no default)")
    batch_sizes(world_size)
    if FLAGS.warmup_epochs and FLAGS.warmup_epochs >= FLAGS.epochs:
        raise FlagError("warmup_epochs", f"must be shorter than --epochs={FLAGS.epochs}")
    if FLAGS.lr_schedule == "step":
        decay_epochs(FLAGS.lr_decay_epochs)
    profile_steps(FLAGS.profile_steps)
    if FLAGS.dataset in NEEDS_DATA_DIR:
        if not FLAGS.data_dir:
            raise FlagError("data_dir", f"is required by --dataset={FLAGS.dataset}")
        if not os.path.isdir(FLAGS.data_dir):
            raise FlagError("data_dir", "is not a directory")
    _check_writable("model_dir", FLAGS.model_dir)
    if FLAGS.init_checkpoint and not os.path.exists(FLAGS.init_checkpoint + ".index"):
        raise FlagError("init_checkpoint", "no such checkpoint (no .index file at that prefix)")
    if FLAGS.target_accuracy is not None and FLAGS.benchmark:
        raise FlagError("target_accuracy", "needs validation, which --benchmark leaves out")
    if FLAGS.elastic and os.environ.get("HOROVOD_ELASTIC") != "1":
        raise FlagError("elastic", "needs horovodrun's elastic mode (python -m app.launch "
                                   "--host_discovery_script=SCRIPT ...)")
    if FLAGS.adasum and world_size & (world_size - 1):
        raise FlagError("adasum", f"needs a power-of-2 number of processes (Horovod's "
                                  f"Adasum), not {world_size}")
    if FLAGS.cache not in ("none", "memory"):
        folder = os.path.dirname(os.path.abspath(FLAGS.cache))
        if not os.path.isdir(folder):
            raise FlagError("cache", f"folder {folder} does not exist")


def _check_writable(name, folder):
    """A run that could not save its checkpoints must not start: `folder`, or the nearest
    folder above it that exists, must take a file. Leaves nothing behind."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FlagError(name, f"{existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise FlagError(name, f"{existing} is not writable ({error.strerror})") from None


def batch_sizes(world_size, resumed_global_batch=0):
    """(per-process batch, global batch) for `world_size` processes: the global batch is the
    per-process batch x processes x --accumulation_steps. A resumed run keeps the global
    batch of its checkpoint (`resumed_global_batch`), whatever its number of processes, so
    that its learning rate and steps mean what they meant."""
    if (FLAGS.batch_size is None) == (FLAGS.global_batch_size is None):
        raise FlagError(_batch_flag(), "give exactly one of --batch_size and --global_batch_size")
    accumulation = FLAGS.accumulation_steps
    global_batch = FLAGS.global_batch_size or FLAGS.batch_size * world_size * accumulation
    name = _batch_flag()
    if resumed_global_batch:
        global_batch = resumed_global_batch
        name = "model_dir"
    if global_batch % (world_size * accumulation):
        raise FlagError(name, f"the global batch of {global_batch} is not divisible by "
                              f"{world_size} processes" + (
                                  f" x {accumulation} accumulation steps"
                                  if accumulation > 1 else ""))
    return global_batch // (world_size * accumulation), global_batch


def _batch_flag():
    """The batch flag the run was given, to name in errors about the batch."""
    return "global_batch_size" if FLAGS.global_batch_size else "batch_size"


def steps_per_epoch(num_examples, global_batch):
    """Training steps (batches per process) per epoch: --steps_per_epoch, or by default one
    pass over `num_examples` at the global batch. With --accumulation_steps=k, a multiple of
    k, so that every epoch ends with an update."""
    accumulation = FLAGS.accumulation_steps
    steps = FLAGS.steps_per_epoch or num_examples // global_batch * accumulation
    if steps == 0:
        raise FlagError(_batch_flag(), f"the global batch of {global_batch} is larger than "
                                       f"the {num_examples} training examples")
    if steps % accumulation:
        raise FlagError("steps_per_epoch", f"must be a multiple of --accumulation_steps="
                                           f"{accumulation}")
    return steps


def decay_epochs(values):
    """The step schedule's decay epochs as increasing integers inside the training."""
    try:
        epochs = [int(value) for value in values]
    except ValueError:
        raise FlagError("lr_decay_epochs", "must be whole epoch numbers") from None
    increasing = epochs == sorted(set(epochs))
    if not epochs or not increasing or not 0 < epochs[0] <= epochs[-1] < FLAGS.epochs:
        raise FlagError("lr_decay_epochs",
                        f"must be increasing epochs between 1 and {FLAGS.epochs - 1}")
    return epochs


def profile_steps(values):
    """--profile_steps as (first, last) step, () when not given."""
    if not values:
        return ()
    try:
        steps = tuple(int(value) for value in values)
    except ValueError:
        raise FlagError("profile_steps", "must be two step numbers: START,END") from None
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise FlagError("profile_steps", "must be two step numbers: START,END with "
                                         "1 <= START <= END")
    return steps


def scaled_learning_rate(global_batch):
    """The base LR scaled from --reference_batch_size to `global_batch`."""
    ratio = global_batch / FLAGS.reference_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[FLAGS.lr_scaling]
    return FLAGS.learning_rate * factor


def rank_from_environment():
    """This process's rank as the launcher set it (0 for a lone process)."""
    rank = _set_by_launcher("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    return 0 if rank is None else rank


def world_size_from_environment():
    """The number of processes the launcher started (mpirun, horovodrun, srun, MPICH's
    hydra), read from its environment so that flags are checked before Horovod starts."""
    slurm_step = ("SLURM_NTASKS",) if "SLURM_STEP_ID" in os.environ else ()
    size = _set_by_launcher("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", *slurm_step)
    return 1 if size is None else size


def _set_by_launcher(*variables):
    """The first of the environment `variables` holding a whole number, None if none does."""
    for variable in variables:
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return None


def resolved_flagfile():
    """A flagfile of every app.train flag that has a value: it reproduces the run."""
    lines = [flag.serialize() for flag in FLAGS.get_flags_for_module(__name__)
             if flag.value is not None and flag.serialize()]
    return "\n".join(sorted(lines)) + "\n"


def values():
    """{name: value} of every app.train flag."""
    return {flag.name: flag.value for flag in FLAGS.get_flags_for_module(__name__)}


def define_gd_study_flags():
    """The flags of app.gd_study besides --seed and --learning_rate (defined only when it
    runs, so that app.train's flagfile and help stay its own)."""
    flags.DEFINE_integer("num_examples", 1000, "Points (x, y) to generate.", lower_bound=2)
    flags.DEFINE_float("true_w", 2.0, "Slope w of the line the data come from.")
    flags.DEFINE_float("true_b", 1.0, "Intercept b of the line the data come from.")
    flags.DEFINE_float("noise", 0.5, "Standard deviation of the noise added to y.",
                       lower_bound=0.0)
    flags.DEFINE_float("initial_w", -2.0, "Where every method starts: w.")
    flags.DEFINE_float("initial_b", -2.0, "Where every method starts: b.")
    # Shared with app.train: --seed (of the data and of every method's shuffles) and
    # --learning_rate (the same for every method, not scaled).
    FLAGS.set_default("seed", 0)
    FLAGS.set_default("learning_rate", 0.1)
    flags.DEFINE_list("minibatch_sizes", ["16", "32", "64", "128"],
                      "Minibatch sizes trained besides full-batch GD and SGD (batch 1).")
    flags.DEFINE_float("tolerance", 1e-6,
                       "Convergence rule: stop when the full-data loss at an epoch's end "
                       "changed by less than this fraction of the previous epoch's.",
                       lower_bound=0.0)
    flags.DEFINE_integer("max_epochs", 500, "Limit: epochs per method.", lower_bound=1)
    flags.DEFINE_integer("max_updates", 20_000, "Limit: updates per method.", lower_bound=1)
    flags.DEFINE_string("out_dir", "runs/gd_study", "Where figures and tables go.")


def study_batch_sizes(values, num_examples):
    """--minibatch_sizes as whole numbers between 2 and num_examples - 1."""
    try:
        sizes = [int(value) for value in values]
    except ValueError:
        raise FlagError("minibatch_sizes", "must be whole numbers") from None
    if not all(1 < size < num_examples for size in sizes):
        raise FlagError("minibatch_sizes", f"each must be between 2 and {num_examples - 1} "
                                           f"(batch 1 and the full batch always run)")
    return sorted(set(sizes))
