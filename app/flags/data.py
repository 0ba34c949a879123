"""The input pipeline and the seed: their flags, their checks, and input_pipeline.load's
options."""
import os

from absl import flags

import input_pipeline
from models import segmentation
from app import tasks
from app.flags.common import FLAGS, invalid, writable


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
    flags.DEFINE_integer("volume_size", 128, "Generated volumes: voxels along each side of a "
                         "seismic survey (FaultSeg3D's: 128), elements of a topology design's "
                         "cube.", lower_bound=8)
    flags.DEFINE_integer("patch_size", None, "Seismic data sets: the side of the patches a "
                         "segmentation model trains and validates on (default: the whole "
                         "volume).", lower_bound=4)
    flags.DEFINE_integer("num_volumes", 200, "Generated volumes: training surveys "
                         "(validation: a tenth as many, at least 2) or topology designs "
                         "(validation: an eighth).", lower_bound=1)
    flags.DEFINE_integer("num_facies", 8, "Seismic facies data sets: classes the layers are "
                         "binned into.", lower_bound=2, upper_bound=255)
    flags.DEFINE_enum("segmentation_loss", "balanced_crossentropy", list(segmentation.LOSSES),
                      "Segmentation's loss: FaultSeg3D's class-balanced cross-entropy (each "
                      "class weighted by the share of an example's voxels not of it), plain "
                      "cross-entropy, or 1 - Dice.")
    flags.register_validator("cache", _cache_folder_exists)


DEFINES = (define_data_flags,)


def check(world_size):
    """A data set that reads prepared files has --data_dir; generated volumes are no smaller
    than their patches (check_extents checks the patches against the model, once the data set
    is loaded)."""
    del world_size
    dataset = input_pipeline.DATASETS[FLAGS.dataset]
    if dataset.needs_data_dir and not FLAGS.data_dir:
        raise invalid("data_dir", f"is required by --dataset={FLAGS.dataset}")
    if FLAGS.data_dir and dataset.keeps_data:
        try:  # made by the data set if missing, as it keeps what it makes there
            writable(FLAGS.data_dir)
        except flags.ValidationError as error:
            raise invalid("data_dir", str(error)) from None
    elif FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
        raise invalid("data_dir", "is not a directory")
    if FLAGS.patch_size and not dataset.patches:
        raise invalid("patch_size", f"--dataset={FLAGS.dataset} has no patches")
    if tasks.TASKS[dataset.task].per_voxel and not dataset.needs_data_dir and (
            FLAGS.patch_size or 0) > FLAGS.volume_size:
        raise invalid("patch_size", f"is larger than the volumes (--volume_size="
                                    f"{FLAGS.volume_size})")


def load_options():
    """input_pipeline.load's options from the flags."""
    return dict(data_dir=FLAGS.data_dir, image_size=FLAGS.image_size, seed=FLAGS.seed,
                skip_corrupt=FLAGS.skip_corrupt, volume_size=FLAGS.volume_size,
                patch_size=FLAGS.patch_size, num_volumes=FLAGS.num_volumes,
                num_facies=FLAGS.num_facies)


def _cache_folder_exists(cache):
    if cache in ("none", "memory"):
        return True
    folder = os.path.dirname(os.path.abspath(cache))
    if not os.path.isdir(folder):
        raise flags.ValidationError(f"folder {folder} does not exist")
    return True
