"""Where each process computes: one GPU per local rank, and its share of the CPU cores."""
import contextlib
import os

import tensorflow as tf

from app import launch


def pin_gpu(local_rank):
    """Makes the local rank's GPU the only one this process sees, with memory growth so that
    TensorFlow does not take all of it up front. Does nothing on a machine without GPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")


def cpu_threads(local_size, requested=0):
    """The threads a process should use: `requested`, or the cores it may run on shared by
    the processes on its node (unless the launcher already bound it to its own cores)."""
    if requested:
        return requested
    allowed = launch.usable_cores()
    if allowed < os.cpu_count():
        return allowed
    return max(1, allowed // local_size)


def set_cpu_threads(threads):
    """TensorFlow's intra-op and inter-op pools; must run before TensorFlow starts its runtime."""
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def has_gpu():
    """Whether TensorFlow sees a GPU here."""
    return bool(tf.config.list_physical_devices("GPU"))


@contextlib.contextmanager
def threads_started_at_lowest_priority(enabled=True):
    """The threads started inside the block (Linux) run at the lowest CPU priority (nice 19):
    a core they share with TensorFlow's compute threads goes to those whenever they can run.
    For Horovod's background thread, which polls while it waits for the other ranks."""
    before = thread_ids()
    yield
    if enabled:
        for thread_id in thread_ids() - before:
            os.setpriority(os.PRIO_PROCESS, thread_id, 19)


def thread_ids():
    """The ids of this process's threads (Linux)."""
    return {int(task) for task in os.listdir("/proc/self/task")}
