"""Every flag of app.train, in groups (each defined by its own define_*_flags(), as in the
TF Model Garden, so that a tool defines only the groups it uses), how they are resolved and
how they are checked.

Resolution follows the TF Model Garden: the experiment's registry defaults, then the
flagfile, then the command line (absl expands --flagfile in place, so a later command-line
flag overrides it). Everything is checked before Horovod starts or any data is read, but
what only the data or the built model shows, which app.train checks once they are there,
before any training; a bad value ends the process with one line naming the flag and the
reason, and exit code 2. Every rank parses the same arguments, so every rank exits the same
way and nothing hangs; only rank 0 prints the line. The arithmetic the flags feed is
app.arithmetic's.
"""
import os
import tempfile

from app import compat  # noqa: F401 (first: it sets TF_USE_LEGACY_KERAS)

from absl import flags

import input_pipeline
import models
from models import segmentation
from app import arithmetic, cli, optimizers, parallelism, pipeline_plan
from app.arithmetic import FlagError
from app.experiments import EXPERIMENTS

FLAGS = flags.FLAGS
_BATCH_FLAGS = ("batch_size", "global_batch_size")


def define_training_flags():
    """Every flag of app.train; the tools that take app.train's arguments (the reference
    runs, the pipeline check) define them all. Each group registers absl validators for the
    checks of its single flags."""
    if "experiment" in FLAGS:  # defined already in this process
        return
    for define in (define_experiment_flags, define_batch_flags, define_learning_rate_flags,
                   define_optimizer_flags, define_data_flags, define_horovod_flags,
                   define_parallelism_flags, define_performance_flags, define_benchmark_flags,
                   define_monitoring_flags, define_stopping_flags):
        before = set(FLAGS)
        define()
        _GROUPS[" ".join(define.__doc__.split("\n\n")[0].split()).rstrip(".")] = sorted(
            set(FLAGS) - before)


_GROUPS = {}  # each define_*_flags() docstring's first sentence: the flags it defines


def define_experiment_flags():
    """The experiment, its model and data, and where the run's outputs go."""
    flags.DEFINE_enum("experiment", "digits_cnn", sorted(EXPERIMENTS),
                      "Registry entry (app/experiments.py) whose defaults the flagfile and "
                      "command line override: " + _choices(EXPERIMENTS))
    flags.DEFINE_enum("model", None, sorted(models.BUILDERS),
                      "Model to build (models.BUILDERS): " + _choices(models.BUILDERS))
    flags.DEFINE_enum("dataset", None, sorted(input_pipeline.DATASETS),
                      "Data set to train on (input_pipeline.DATASETS): "
                      + _choices(input_pipeline.DATASETS))
    flags.DEFINE_string("data_dir", None,
                        "Prepared data (TFDS data_dir, the folder of TFRecord shards, or of "
                        "Fashion-MNIST's IDX files); on a cluster, a shared filesystem. "
                        "Nothing is downloaded at training time. Without it, fashion_mnist "
                        "reads Debian's dataset-fashion-mnist.")
    flags.DEFINE_string("model_dir", None,
                        "Where every output of the run goes (default: runs/EXPERIMENT); a run "
                        "resumes from the latest checkpoint found here.")
    flags.DEFINE_string("init_checkpoint", None,
                        "Checkpoint (path prefix, e.g. OTHER_RUN/checkpoints/epoch-10) whose model "
                        "weights start a new run; the optimizer starts afresh. Ignored when "
                        "--model_dir already holds a checkpoint to resume from.")
    flags.register_validator("data_dir", lambda folder: not folder or os.path.isdir(folder),
                             "is not a directory")
    flags.register_validator("model_dir", lambda folder: folder is None or _writable(folder))
    flags.register_validator(
        "init_checkpoint", lambda path: not path or os.path.exists(path + ".index"),
        "no such checkpoint (no .index file at that prefix)")


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
                      + _choices(optimizers.OPTIMIZERS))
    flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum and lars.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("weight_decay", 0.0,
                       "Weight decay on kernels: an L2 loss, or inside the update of lars, lamb "
                       "and novograd.", lower_bound=0.0)


def define_data_flags():
    """The input pipeline and the seed."""
    flags.DEFINE_integer("image_size", None, "Image side in pixels, for image data sets that "
                         "resize.", lower_bound=8)
    # At least 1: with TensorFlow's global seed at 0, tf.data's shuffle refuses the per-epoch
    # seeds the pipeline computes (a tensor compared as a bool in random_seed.get_seed).
    flags.DEFINE_integer("seed", 42, "Seed of initialization, shuffling and augmentation.",
                         lower_bound=1)
    flags.DEFINE_string("cache", "none",
                        "Cache of the (sharded) raw records: none, memory, or a file path "
                        "prefix: a cache file per split and rank whose name holds a digest of "
                        "the data set, the split and the data flags (--data_dir, --image_size, "
                        "--seed, --skip_corrupt, --volume_size, --patch_size, --num_volumes, "
                        "--num_facies), so that a run never reads a cache of other data.")
    flags.DEFINE_bool("skip_corrupt", False,
                      "Drop TFRecord records that cannot be read or decoded, and report how many, "
                      "instead of stopping at the first one.")
    flags.DEFINE_integer("shuffle_buffer", 10_000, "Shuffle buffer, in examples.", lower_bound=1)
    flags.DEFINE_bool("deterministic", False,
                      "Deterministic ops and data order; every global batch holds the same "
                      "examples at any number of processes, so results do not depend on it.")
    flags.DEFINE_integer("volume_size", 128, "Seismic data sets: voxels along each side of a "
                         "generated survey (FaultSeg3D's: 128).", lower_bound=8)
    flags.DEFINE_integer("patch_size", None, "Seismic data sets: the side of the patches a "
                         "segmentation model trains and validates on (default: the whole "
                         "volume).", lower_bound=4)
    flags.DEFINE_integer("num_volumes", 200, "Seismic data sets: generated training surveys "
                         "(validation: a tenth as many, at least 2).", lower_bound=1)
    flags.DEFINE_integer("num_facies", 8, "Seismic facies data sets: classes the layers are "
                         "binned into.", lower_bound=2, upper_bound=255)
    flags.DEFINE_enum("segmentation_loss", "balanced_crossentropy", list(segmentation.LOSSES),
                      "Segmentation's loss: FaultSeg3D's class-balanced cross-entropy (each "
                      "class weighted by the share of an example's voxels not of it), plain "
                      "cross-entropy, or 1 - Dice.")
    flags.register_validator("cache", _cache_folder_exists)


def define_horovod_flags():
    """How Horovod combines the processes' gradients and statistics; elastic training."""
    flags.DEFINE_bool("fp16_allreduce", False,
                      "Allreduce the gradients in float16 (Horovod's fp16 compression): half the "
                      "bytes on the wire, float16 rounding of the averaged gradients.")
    flags.DEFINE_bool("adasum", False,
                      "Combine the ranks' gradients with Horovod's Adasum instead of averaging: "
                      "what they share is averaged, what they do not is added up, so the LR "
                      "scales with one process's batch (one node's on GPUs with NCCL). Needs "
                      "Horovod's MPI controller and a power-of-2 number of processes.")
    flags.DEFINE_bool("shard_optimizer_state", False,
                      "ZeRO stage 1: each data-parallel rank keeps the optimizer's state "
                      "(momentum, Adam's, LAMB's or NovoGrad's moments) for 1/N of every "
                      "variable; the gradients are reduce-scattered and the updated weights "
                      "allgathered (the bytes of one allreduce). Checkpoints keep the "
                      "unsharded format, so a run resumes on any number of processes.")
    flags.DEFINE_bool("shard_gradients", False,
                      "ZeRO stage 2: --shard_optimizer_state, and under --accumulation_steps "
                      "the gradients kept between batches are this rank's 1/N of them, "
                      "reduce-scattered at every batch (stage 1 keeps whole gradients and "
                      "reduce-scatters once per update).")
    flags.DEFINE_bool("sync_batch_norm", False,
                      "Batch normalization over the global batch: the models' BatchNormalization "
                      "layers become SyncBatchNormalization (Horovod's, guarded against a "
                      "negative variance), which allreduces their statistics at every step. "
                      "Refused for a model that has no batch normalization.")
    flags.DEFINE_bool("elastic", False,
                      "Elastic training: workers may leave and join while it runs (Horovod's "
                      "elastic mode; start it with python -m app.launch --host_discovery_script). "
                      "With --batch_size the per-process batch stays, so the global batch and the "
                      "LR follow the number of workers.")
    flags.DEFINE_integer("commit_steps", 100,
                         "Elastic: steps between commits of the training state (and at every "
                         "epoch end); a failed worker costs at most these steps, and a change of "
                         "workers takes effect at the next commit.", lower_bound=1)
    flags.register_validator(
        "elastic", lambda elastic: not elastic or os.environ.get("HOROVOD_ELASTIC") == "1",
        "needs horovodrun's elastic mode (python -m app.launch --host_discovery_script=SCRIPT "
        "...)")


def define_parallelism_flags():
    """Pipeline parallelism (app.pipeline) and spatial parallelism (app.spatial) across
    ranks, alone or with Horovod's data parallelism, and recomputation."""
    flags.DEFINE_integer("spatial_parts", 1,
                         "Split every example along its first spatial axis into this many "
                         "slabs, one per rank of a spatial group, the convolutions exchanging "
                         "halos with Horovod's alltoall; the processes / spatial_parts groups "
                         "are data-parallel replicas. For fully convolutional models (U-Nets) "
                         "whose activations of one example do not fit one device. Needs MPI "
                         "(mpirun, srun, horovodrun --mpi).", lower_bound=1)
    flags.DEFINE_integer("pipeline_stages", 1,
                         "Cut the model into this many stages of consecutive blocks, one per "
                         "rank, balanced by --pipeline_balance; the processes / stages replicas "
                         "of each stage average their gradients with Horovod. Needs MPI "
                         "(mpirun, srun, horovodrun --mpi).", lower_bound=1)
    flags.DEFINE_integer("microbatches", 1,
                         "Microbatches each step's per-replica batch is split into, run through "
                         "the stages one after the other, their gradients added up for one "
                         "update.", lower_bound=1)
    flags.DEFINE_enum("pipeline_schedule", "1f1b", pipeline_plan.SCHEDULES,
                      "The order of the microbatches' passes: gpipe (every forward, then every "
                      "backward: every microbatch's activations kept at once) or 1f1b (a "
                      "microbatch's backward as soon as the last stage has it: at most "
                      "stages - stage microbatches kept on a stage; the same bubble).")
    flags.DEFINE_enum("pipeline_balance", "flops", pipeline_plan.BALANCES,
                      "What the stages share alike: the blocks' forward FLOPs (each stage's "
                      "compute, for throughput) or their parameters (each stage's weights "
                      "and optimizer state, for memory).")
    flags.DEFINE_bool("recompute", False,
                      "A U-Net: keep only each level's input and recompute its convolutions in "
                      "the backward pass. Other models: keep only each stage's input per "
                      "microbatch and recompute its activations "
                      "in the backward pass (gradient checkpointing): less memory, one more "
                      "forward pass.")


def define_performance_flags():
    """Precision, compilation and threads."""
    flags.DEFINE_enum("mixed_precision", None, ["float16", "bfloat16"],
                      "Compute in this type, keep the variables in float32 (Keras' mixed "
                      "precision); float16 adds dynamic loss scaling around Horovod's optimizer.")
    flags.DEFINE_bool("float64", False,
                      "Compute and keep the variables in float64 (slower than float32): for "
                      "telling runs that differ by float32 rounding alone, such "
                      "as the same training on different numbers of processes, from runs that "
                      "differ in what they compute.")
    flags.DEFINE_bool("jit_compile", False,
                      "Compile the training step's ops with XLA around Horovod's collectives "
                      "(TensorFlow's auto-clustering; on CPUs too), as NVIDIA's Horovod examples "
                      "do: Horovod 0.28.1 cannot compile its own ops with Keras' jit_compile on "
                      "CPUs.")
    flags.DEFINE_integer("threads_per_process", 0,
                         "TensorFlow's intra-op and inter-op threads and tf.data's per process "
                         "(0: the cores divided among the processes on the node).",
                         lower_bound=0)
    flags.DEFINE_bool("deprioritize_horovod_threads", True,
                      "On a process that computes on CPUs, run the threads hvd.init() starts "
                      "(Horovod's background thread, MPI's) at the lowest CPU priority, so that "
                      "their polling while they wait for the other ranks takes no core from the "
                      "compute. Never on GPU processes, whose CPU threads feed the GPU.")
    flags.DEFINE_integer("steps_per_execution", 1,
                         "Training steps per call of Keras' compiled train function: fewer Python "
                         "round trips per step, for small models; per-batch callbacks (LR warmup "
                         "and schedule, throughput) then act once per call.", lower_bound=1)


def define_benchmark_flags():
    """Throughput measurement."""
    flags.DEFINE_bool("benchmark", False,
                      "Measure training throughput: no validation, checkpoints, resume or "
                      "TensorBoard; images/s per process and in total on stdout and in "
                      "results.json.")
    flags.DEFINE_integer("warmup_steps", 10,
                         "Training steps left out of the throughput (tracing, first allreduces, "
                         "pipeline fill).", lower_bound=0)
    flags.DEFINE_bool("timeline", False,
                      "Write Horovod's timeline (chrome://tracing) to MODEL_DIR/timeline.json.")


def define_monitoring_flags():
    """TensorBoard."""
    flags.DEFINE_integer("summary_steps", 10,
                         "Training steps between TensorBoard's per-step scalars (loss, accuracy, "
                         "learning rate, images/s, global batch).", lower_bound=1)
    flags.DEFINE_list("profile_steps", [],
                      "START,END: TensorFlow's profiler traces these training steps of the run "
                      "(counted from 1) into TensorBoard's profile tab.")


def define_stopping_flags():
    """Ending training early."""
    flags.DEFINE_float("target_accuracy", None,
                       "End training after the first epoch whose validation headline metric "
                       "(over all the ranks' examples) reaches this: val_accuracy for "
                       "classification; for segmentation val_iou (the positive class's, one "
                       "output: faults) or val_mean_iou (several classes: facies); not for "
                       "regression. results.json names it (headline_metric).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("time_budget", None,
                       "End training after the epoch in which this many seconds of training "
                       "(rank 0's clock, from the first step) have passed.", lower_bound=0.0)
    flags.DEFINE_integer("preemption_check_steps", 10,
                         "Every this many steps the ranks agree whether one of them got "
                         "SIGTERM or SIGUSR1, and if so all stop there with a checkpoint of "
                         "that step and exit code 75 (an allgather of one number each time). "
                         "Rounded up to a multiple of --accumulation_steps, so that a stop "
                         "follows an update and no accumulated gradients are lost; at an "
                         "epoch's steps or more, every epoch begins with the check instead.",
                         lower_bound=1)
    flags.DEFINE_float("stall_timeout", 300.0,
                       "End the job, naming the silent ranks, when a rank has made no training "
                       "progress for this many seconds (a stopped or lost process, a read that "
                       "never returns); 0: never. Longer than the slowest epoch-end save.",
                       lower_bound=0.0)




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
            cli.fail(error)
        return remaining
    return parse


def _check_training_flags(argv):
    """app.train's: the experiment's defaults where nothing else was given, then validate."""
    _prefer_command_line_batch_flag(argv)
    _apply_experiment_defaults()
    validate(cli.world_size_from_environment())


parse = parser(_check_training_flags)


def _prefer_command_line_batch_flag(argv):
    """When the flagfile gives one batch flag and the command line the other, the command
    line wins, as for any flag; both on the same level stay an error. (absl's
    mark_flags_as_mutual_exclusive would refuse the pair before the command line could win.)"""
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


def _choices(table):
    """A flag's help listing the choices of a table (name: entry with a description) with
    what each is."""
    return "; ".join(f"{name}: {table[name].description}" for name in sorted(table)) + "."


def _invalid(name, reason):
    return FlagError(name, FLAGS[name].value, reason)


def validate(world_size):
    """Raises FlagError for the first flag that cannot run with `world_size` processes (what
    depends on several flags, the experiment or the number of processes; the validators in
    define_training_flags() check the single flags)."""
    for name in ("model", "dataset", "epochs", "learning_rate"):
        if FLAGS[name].value is None:
            raise _invalid(name, "is required (the experiment sets no default)")
    run_parallelism = parallelism.choose(FLAGS)
    run_parallelism.validate(world_size, batch_request())
    arithmetic.batch_sizes(batch_request(), run_parallelism.replicas(world_size))
    if FLAGS.warmup_epochs and FLAGS.warmup_epochs >= FLAGS.epochs:
        raise _invalid("warmup_epochs", f"must be shorter than --epochs={FLAGS.epochs}")
    if FLAGS.lr_schedule == "step":
        arithmetic.decay_epochs(FLAGS.lr_decay_epochs, FLAGS.epochs)
    arithmetic.profile_steps(FLAGS.profile_steps)
    if input_pipeline.DATASETS[FLAGS.dataset].needs_data_dir and not FLAGS.data_dir:
        raise _invalid("data_dir", f"is required by --dataset={FLAGS.dataset}")
    _validate_task()
    if FLAGS.target_accuracy is not None and FLAGS.benchmark:
        raise _invalid("target_accuracy", "needs validation, which --benchmark leaves out")
    if FLAGS.target_accuracy is not None and input_pipeline.DATASETS[
            FLAGS.dataset].task == "regression":
        raise _invalid("target_accuracy", f"--dataset={FLAGS.dataset} is a regression, "
                                          f"whose errors (MSE, MAE) have no accuracy to reach")
    if FLAGS.float64 and FLAGS.mixed_precision:
        raise _invalid("float64", f"computes in float64, --mixed_precision="
                                  f"{FLAGS.mixed_precision} in another type: choose one")


def _validate_task():
    """A segmentation model needs a segmentation data set; generated volumes, patches no
    larger than they are (check_extents checks the patches against the model, once the
    data set is loaded)."""
    model, dataset = models.BUILDERS[FLAGS.model], input_pipeline.DATASETS[FLAGS.dataset]
    if (model.task == "segmentation") != (dataset.task == "segmentation"):
        raise _invalid("model", f"is a {model.task} model, --dataset={FLAGS.dataset} a "
                                f"{dataset.task} data set")
    if dataset.task == "segmentation" and not dataset.needs_data_dir and (
            FLAGS.patch_size or 0) > FLAGS.volume_size:
        raise _invalid("patch_size", f"is larger than the volumes (--volume_size="
                                     f"{FLAGS.volume_size})")


def check_extents(source):
    """Raises FlagError when the model's down-sampling does not divide the spatial extents
    of `source`'s examples (a segmentation model's patches), or, with --spatial_parts, the
    first extent's slabs."""
    factor = models.BUILDERS[FLAGS.model].downsampling
    extents = source.feature_shape[:-1]
    if factor > 1 and any(extent % factor for extent in extents):
        name = "patch_size" if FLAGS.patch_size else "volume_size"
        raise _invalid(name, f"gives patches of {'x'.join(map(str, extents))}, which "
                             f"--model={FLAGS.model}'s down-sampling by {factor} does not "
                             f"divide")
    if FLAGS.spatial_parts > 1 and extents and extents[0] % (factor * FLAGS.spatial_parts):
        raise _invalid("spatial_parts", f"splits examples of {extents[0]} planes, which are "
                                        f"not divisible by {FLAGS.spatial_parts} slabs times "
                                        f"--model={FLAGS.model}'s down-sampling by {factor}")


def load_options():
    """input_pipeline.load's options from the flags."""
    return dict(data_dir=FLAGS.data_dir, image_size=FLAGS.image_size, seed=FLAGS.seed,
                skip_corrupt=FLAGS.skip_corrupt, volume_size=FLAGS.volume_size,
                patch_size=FLAGS.patch_size, num_volumes=FLAGS.num_volumes,
                num_facies=FLAGS.num_facies)


def _writable(folder):
    """A run that could not save its checkpoints must not start: `folder`, or the nearest
    folder above it that exists, must take a file. Leaves nothing behind."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise flags.ValidationError(f"{existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise flags.ValidationError(
            f"{existing} is not writable ({error.strerror})") from None
    return True


def _cache_folder_exists(cache):
    if cache in ("none", "memory"):
        return True
    folder = os.path.dirname(os.path.abspath(cache))
    if not os.path.isdir(folder):
        raise flags.ValidationError(f"folder {folder} does not exist")
    return True


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


def resolved_flagfile():
    """A flagfile of every app.train flag that has a value: it reproduces the run."""
    lines = [flag.serialize() for flag in FLAGS.get_flags_for_module(__name__)
             if flag.value is not None and flag.serialize()]
    return "\n".join(sorted(lines)) + "\n"


def values():
    """{name: value} of every app.train flag."""
    return {flag.name: flag.value for flag in FLAGS.get_flags_for_module(__name__)}


def reference_page():
    """docs/flags.md: every flag of app.train by group, with the help and default that
    --helpfull prints (a test compares the two; `make flags-page` writes it)."""
    define_training_flags()
    lines = ["# Flags of app.train", "",
             "Generated from `app/flags.py` by `make flags-page`; a test fails when this page "
             "and `python -m app.train --helpfull` disagree. Flags resolve as the TF Model "
             "Garden's do: the experiment's defaults (app/experiments.py), then the flagfile, "
             "then the command line. What the flags that matter at scale mean: "
             "[experiments.md](experiments.md).", ""]
    for group, names in _GROUPS.items():
        lines += [f"## {group}", "", "| flag | default | what it does |", "|---|---|---|"]
        for name in names:
            flag = FLAGS[name]
            default = "" if flag.default is None else f"`{flag.default_as_str}`"
            lines.append(f"| `--{name}` | {default} | {_cell(flag.help)} |")
        lines.append("")
    return "\n".join(lines)


def _cell(text):
    return " ".join(text.split()).replace("|", "\\|")
