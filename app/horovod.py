"""The Horovod glue: where the project imports TensorFlow, Keras and Horovod's TensorFlow and
Keras layers (import `tf`, `keras`, `hvd` (Horovod's Keras layer) and `hvd_tensorflow` from
here, before anything else of TensorFlow's), and how it asks Horovod to reduce gradients.
Horovod is imported elsewhere only after this module, or without TensorFlow (app.launch runs
Horovod's launcher, `horovod.runner`).

Why this module exists (BUILD.md has the whole story):
- Keras 3 with the TensorFlow backend: Horovod's ops take TensorFlow tensors, so a
  KERAS_BACKEND (or ~/.keras/keras.json) naming another backend is refused in one line, and
  so is TF_USE_LEGACY_KERAS, which would give tf_keras, which the project left.
- Horovod 0.28.1's Keras layer predates Keras 3; the project's build patches it
  (scripts/horovod-keras3.patch). Unpatched, hvd.DistributedOptimizer does not reduce
  anything on Keras 3 and every rank trains alone, so an unpatched build is refused.
- --jit_compile uses XLA's auto-clustering, which compiles the clusters of ops XLA can
  compile and leaves Horovod's collectives between them (Horovod has no XLA kernels on CPUs,
  and the patched build refuses Keras' compile(jit_compile=True) around its allreduce). On
  CPUs TensorFlow clusters only with --tf_xla_cpu_global_jit in TF_XLA_FLAGS, which it reads
  once, early (set in main() under absl.app.run, it is too late); this module adds it. It
  changes nothing until tf.config.optimizer.set_jit turns auto-clustering on.
- Importing TensorFlow, Keras and Horovod makes millions of objects, and Python's cycle
  collector passed over them again and again: 40% of a process's start (perf; 7 s of CPU
  on a Zen 3 core). It is off while they import; what they made is then frozen (kept out
  of later passes: modules live as long as the process).
"""
import gc
import json
import os
import sys

from app import cli

if os.environ.get("TF_USE_LEGACY_KERAS", "") in ("true", "True", "1"):  # TensorFlow's test
    cli.fail(f"TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']}: the project runs on "
             f"Keras 3; unset it")
if "--tf_xla_cpu_global_jit" not in os.environ.get("TF_XLA_FLAGS", ""):
    os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_cpu_global_jit"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines, one per rank


def _keras_json_backend():
    """(keras.json's path, the backend it sets), read as Keras reads it, which it does as it is
    imported (where a backend that is not installed already fails)."""
    path = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                        "keras.json")
    try:
        with open(path) as config:
            return path, json.load(config).get("backend", "tensorflow")
    except (OSError, ValueError):
        return path, "tensorflow"


if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    cli.fail(f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}: Horovod's operations need Keras' "
             f"tensorflow backend; unset KERAS_BACKEND or set it to tensorflow")
_keras_json, _backend = _keras_json_backend()
if "KERAS_BACKEND" not in os.environ and _backend != "tensorflow":
    cli.fail(f"{_keras_json}: sets Keras' backend to {_backend}; Horovod's operations need "
             f"its tensorflow backend (or set KERAS_BACKEND)")

# Keras 3 imports scikit-learn and matplotlib, when installed, for its scikit-learn wrappers
# and image gallery, which the project does not use: 1.8 s of every process's start. They are
# hidden while Keras imports; the project imports them where it uses them.
_HIDDEN = [name for name in ("sklearn", "matplotlib") if name not in sys.modules]
sys.modules.update(dict.fromkeys(_HIDDEN))
gc.disable()
try:
    try:
        import keras  # noqa: E402  (after TF_XLA_FLAGS)
    finally:
        for _name in _HIDDEN:
            del sys.modules[_name]
    import tensorflow as tf  # noqa: E402

    import horovod._keras  # noqa: E402
    import horovod.tensorflow as hvd_tensorflow  # noqa: E402  (process sets' collectives)
    import horovod.tensorflow.keras as hvd  # noqa: E402
finally:
    gc.freeze()
    gc.enable()

if not hasattr(horovod._keras, "is_keras3"):
    cli.fail("Horovod is not the project's patched build, whose DistributedOptimizer reduces "
             "gradients on Keras 3; rebuild it with scripts/bootstrap.sh (BUILD.md)")

tf.get_logger().setLevel("WARNING")


def allreduce_options(accumulation_steps=1, fp16_allreduce=False, adasum=False):
    """hvd.DistributedOptimizer's keyword arguments for --accumulation_steps (the average of
    k batches' gradients per update), --fp16_allreduce and --adasum (Horovod's Adasum: MPI
    only, a power-of-2 number of processes; the project's build takes op=Adasum here)."""
    return dict(
        compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=accumulation_steps, average_aggregated_gradients=True,
        op=hvd.Adasum if adasum else hvd.Average)


def adasum_averaged_processes():
    """How many processes' gradients Horovod averages before Adasum combines them: a node's
    GPUs with NCCL (hierarchical Adasum), none on CPUs. With --adasum the LR scales with the
    batch of those processes, not with the global batch (Horovod's Adasum guide)."""
    on_gpus = bool(tf.config.list_logical_devices("GPU")) and hvd.nccl_built()
    return hvd.local_size() if on_gpus else 1


__all__ = ["adasum_averaged_processes", "allreduce_options", "hvd", "hvd_tensorflow", "keras",
           "tf"]
