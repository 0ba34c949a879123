"""Precision, compilation, threads, the throughput benchmark and monitoring: their flags and
checks."""
from absl import flags

from app import arithmetic
from app.flags.common import FLAGS, invalid


def define_performance_flags():
    """Precision, compilation and threads."""
    flags.DEFINE_enum("mixed_precision", "auto", ["auto", "float32", "bfloat16", "float16"],
                      "The type layers compute in; the variables stay float32 (Keras' mixed "
                      "precision). auto: bfloat16 where every rank's processor computes it "
                      "natively (a CPU with AMX or AVX512_BF16, a GPU of compute capability 8.0 "
                      "and above), float32 elsewhere; float16 (dynamic loss scaling around "
                      "Horovod's optimizer) only when asked. The choice and its reason go to "
                      "stdout and results.json.")
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
                      "TensorBoard (but --profile_steps' trace); images/s per process and in "
                      "total on stdout and in results.json.")
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


DEFINES = (define_performance_flags, define_benchmark_flags, define_monitoring_flags)


def check(world_size):
    """The profiled steps are a range; one precision at a time."""
    del world_size
    arithmetic.profile_steps(FLAGS.profile_steps)
    if FLAGS.float64 and FLAGS.mixed_precision != "auto":
        raise invalid("float64", f"computes in float64, --mixed_precision="
                                 f"{FLAGS.mixed_precision} in another type: choose one")
