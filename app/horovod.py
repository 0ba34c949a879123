"""Where the project imports TensorFlow and Horovod's TensorFlow layers first: import `tf`,
`hvd` (Horovod's Keras layer) and `hvd_tensorflow` from here, before anything else of
TensorFlow's. Horovod is imported elsewhere only after this module (app.optimizers takes
Horovod's private `horovod._keras`, which this module's imports loaded) or without
TensorFlow (app.launch runs Horovod's launcher, `horovod.runner`).

Why this module exists (BUILD.md has the whole story):
- Horovod 0.28.1's Keras layer needs the Keras 2 API. Under TensorFlow 2.21, `tf.keras` is
  Keras 3 unless TF_USE_LEGACY_KERAS=1 is set before TensorFlow is first imported, in which
  case `tf.keras` is tf_keras (Keras 2). This module sets it and refuses to go on if TensorFlow
  was already imported without it.
- The project's build of Horovod (scripts/horovod-keras3.patch) takes the backend of
  `tf.keras`, the Keras that builds the models, in `horovod.tensorflow.keras`; unpatched, it
  took the package `keras`'s, which is Keras 3 even when `tf.keras` is tf_keras. The check
  below refuses an unpatched build.
- --jit_compile uses XLA's auto-clustering, which compiles the clusters of ops XLA can
  compile and leaves Horovod's collectives between them (Horovod 0.28.1 can lower its ops to
  XLA only in GPU builds, so Keras' compile(jit_compile=True) fails on CPUs). On CPUs TensorFlow
  clusters only with --tf_xla_cpu_global_jit in TF_XLA_FLAGS, which it reads once, early
  (set in main() under absl.app.run, it is too late); this module adds it. It
  changes nothing until tf.config.optimizer.set_jit turns auto-clustering on.
- On Keras 3, whose optimizers hold `momentum` as a number, the patched build's
  LearningRateWarmupCallback corrects the momentum by scaling `optimizer.momentums` (SGD's
  and app.large_batch_optimizers.LARS's buffers) by new LR / old LR.
"""
import os
import sys

if os.environ.get("TF_USE_LEGACY_KERAS", "0") not in ("", "0"):
    raise ImportError("TF_USE_LEGACY_KERAS is set: the project runs on Keras 3, unset it")
if "--tf_xla_cpu_global_jit" not in os.environ.get("TF_XLA_FLAGS", ""):
    os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_cpu_global_jit"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines, one per rank

import tensorflow as tf  # noqa: E402  (must follow the environment variable)

import horovod.tensorflow as hvd_tensorflow  # noqa: E402  (process sets' collectives)
import horovod.tensorflow.keras as hvd  # noqa: E402
import horovod.tensorflow.keras.callbacks as _hvd_keras_callbacks  # noqa: E402

if not hvd.K is _hvd_keras_callbacks.K is tf.keras.backend:
    raise ImportError("Horovod's Keras layer took another Keras backend than tf.keras's: "
                      "an unpatched Horovod; rebuild it with scripts/bootstrap.sh (BUILD.md)")

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


__all__ = ["adasum_averaged_processes", "allreduce_options", "hvd", "hvd_tensorflow", "tf"]
