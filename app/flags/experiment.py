"""The experiment, its model and data set, and where the run's outputs go: their flags, the
experiment's defaults under the flagfile and the command line, and the checks that the model
fits the data."""
import os

from absl import flags

import input_pipeline
import models
from app import tasks
from app.experiments import EXPERIMENTS
from app.flags.common import FLAGS, choices, invalid, require, writable
from app.flags.recipe import BATCH_FLAGS


def define_experiment_flags():
    """The experiment, its model and data, and where the run's outputs go."""
    flags.DEFINE_enum("experiment", "digits_cnn", sorted(EXPERIMENTS),
                      "Registry entry (app/experiments.py) whose defaults the flagfile and "
                      "command line override: " + choices(EXPERIMENTS))
    flags.DEFINE_string("model", None,
                        "Model to build: one of models.BUILDERS (" + choices(models.BUILDERS)
                        + "), or your own Keras 3 model: package.module:function (a function "
                        "of (input_shape, num_outputs) that returns a keras.Model, imported "
                        "from the PYTHONPATH or the current folder) or path/to/model.keras "
                        "(training starts from its weights); docs/extending.md.")
    flags.register_validator(
        "model", lambda name: (name is None or name in models.BUILDERS
                               or models.user.is_user_model(name)),
        "is none of models.BUILDERS, nor package.module:function, nor a .keras file")
    flags.DEFINE_enum("dataset", None, sorted(input_pipeline.DATASETS),
                      "Data set to train on (input_pipeline.DATASETS): "
                      + choices(input_pipeline.DATASETS) + " Each is of a task "
                      "(app.tasks.TASKS): " + choices(tasks.TASKS))
    flags.DEFINE_string("data_dir", None,
                        "Prepared data (TFDS data_dir, the folder of TFRecord shards, or of "
                        "Fashion-MNIST's IDX files); on a cluster, a shared filesystem. "
                        "Nothing is downloaded at training time. Without it, fashion_mnist "
                        "reads Debian's dataset-fashion-mnist. A data set that makes its "
                        "data (topology) keeps it here, making the folder.")
    flags.DEFINE_string("model_dir", None,
                        "Where every output of the run goes (default: runs/EXPERIMENT); a run "
                        "resumes from the latest checkpoint found here.")
    flags.DEFINE_string("init_checkpoint", None,
                        "Checkpoint (path prefix, e.g. OTHER_RUN/checkpoints/epoch-10) whose model "
                        "weights start a new run; the optimizer starts afresh. Ignored when "
                        "--model_dir already holds a checkpoint to resume from.")
    flags.register_validator("model_dir", lambda folder: folder is None or writable(folder))
    flags.register_validator(
        "init_checkpoint", lambda path: not path or os.path.exists(path + ".index"),
        "no such checkpoint (no .index file at that prefix)")


DEFINES = (define_experiment_flags,)


def check(world_size):
    """The model and data set are given, and the model predicts as the data set's task needs
    (per voxel or per example; a user's model tells once it is built)."""
    del world_size
    require("model", "dataset")
    model, dataset = models.builder(FLAGS.model), input_pipeline.DATASETS[FLAGS.dataset]
    if models.user.is_user_model(FLAGS.model):  # its outputs tell, once it is built
        check_user_model()
    elif tasks.TASKS[model.task].per_voxel != tasks.TASKS[dataset.task].per_voxel:
        raise invalid("model", f"is a {model.task} model, --dataset={FLAGS.dataset} a "
                               f"{dataset.task} data set")


def check_user_model():
    """What a user's model cannot take: its normalization layers are its own, and a saved
    model's layers keep the types they were saved with."""
    if FLAGS.sync_batch_norm:
        raise invalid("sync_batch_norm", f"--model={FLAGS.model} makes its own normalization "
                                         f"layers; build them as Horovod's "
                                         f"SyncBatchNormalization in it instead")
    if FLAGS.model.endswith(".keras"):
        for name, kept in (("mixed_precision", "auto"), ("float64", False)):
            if FLAGS[name].value != kept:
                raise invalid(name, f"the layers of --model={FLAGS.model} keep the types they "
                                    f"were saved with; give --model=package.module:function "
                                    f"to build them anew")


def prefer_command_line_batch_flag(argv):
    """When the flagfile gives one batch flag and the command line the other, the command
    line wins, as for any flag; both on the same level stay an error. (absl's
    mark_flags_as_mutual_exclusive would refuse the pair before the command line could win.)"""
    given = [name for name in BATCH_FLAGS if FLAGS[name].present]
    on_command_line = {arg[2:].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}
    if len(given) == 2 and len(on_command_line.intersection(given)) == 1:
        FLAGS[next(name for name in given if name not in on_command_line)].unparse()


def apply_experiment_defaults():
    """Registry defaults for every flag neither the flagfile nor the command line set; the
    two batch flags go together, since exactly one of them may be set."""
    batch_given = any(FLAGS[name].present for name in BATCH_FLAGS)
    for name, value in EXPERIMENTS[FLAGS.experiment].defaults.items():
        if FLAGS[name].present or (name in BATCH_FLAGS and batch_given):
            continue
        FLAGS.set_default(name, value)
    if FLAGS.model_dir is None:
        FLAGS.set_default("model_dir", os.path.join("runs", FLAGS.experiment))


def check_extents(source):
    """Raises FlagError when the model's down-sampling does not divide the spatial extents
    of `source`'s examples (a segmentation model's patches), or, with --spatial_parts, the
    first extent's slabs."""
    factor = models.builder(FLAGS.model).downsampling
    extents = source.feature_shape[:-1]
    if factor > 1 and any(extent % factor for extent in extents):
        name = "patch_size" if FLAGS.patch_size else "volume_size"
        raise invalid(name, f"gives patches of {'x'.join(map(str, extents))}, which "
                            f"--model={FLAGS.model}'s down-sampling by {factor} does not "
                            f"divide")
    if FLAGS.spatial_parts > 1 and extents and extents[0] % (factor * FLAGS.spatial_parts):
        raise invalid("spatial_parts", f"splits examples of {extents[0]} planes, which are "
                                       f"not divisible by {FLAGS.spatial_parts} slabs times "
                                       f"--model={FLAGS.model}'s down-sampling by {factor}")
