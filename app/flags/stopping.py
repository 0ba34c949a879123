"""Ending training early: at a target, after a time budget, on a signal, or when a rank stalls;
their flags and checks."""
from absl import flags

import input_pipeline
from app import tasks
from app.flags.common import FLAGS, invalid


def define_stopping_flags():
    """Ending training early."""
    flags.DEFINE_float("target_accuracy", None,
                       "End training after the first epoch whose validation headline metric "
                       "(over all the ranks' examples) reaches this, by the data set's task: "
                       f"{tasks.headlines()}. results.json names it (headline_metric).",
                       lower_bound=0.0)
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


DEFINES = (define_stopping_flags,)


def check(world_size):
    """A target needs validation, and a headline metric to reach; a task that scores the
    whole validation split, all of it."""
    del world_size
    if FLAGS.target_accuracy is not None and FLAGS.benchmark:
        raise invalid("target_accuracy", "needs validation, which --benchmark leaves out")
    task = input_pipeline.DATASETS[FLAGS.dataset].task
    if FLAGS.validation_steps is not None and tasks.TASKS[task].validation_callbacks:
        raise invalid("validation_steps", f"a {task} data set's scores take every validation "
                                          f"example each epoch")
    if FLAGS.target_accuracy is None:
        return
    if not tasks.TASKS[task].headline:
        raise invalid("target_accuracy", f"--dataset={FLAGS.dataset} is a {task} data set, "
                                         f"with no headline metric to reach")
    if FLAGS.target_accuracy > 1 and not tasks.TASKS[task].lower_is_better:
        raise invalid("target_accuracy", f"a {task} data set's headline is a share: at most 1")
