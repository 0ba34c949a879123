"""Makes a topology experiment's SIMP designs ahead of its training, on a CPU partition:
the designs app.train's first epoch would make, from the same flags, into the same
--data_dir, so that the GPU job reads them instead of waiting for them (a 64^3 design is
minutes of a core, a 128^3 one hours: docs/topology.md).

    srun -n 128 python -m app.make_designs --flagfile=configs/topology_gpu64.cfg
    mpirun -np 2 python -m app.make_designs --flagfile=configs/topology_cpu.cfg

Each process makes the designs of both splits whose index it is dealt (index modulo the
processes = its rank), skipping those kept already, one BLAS thread each: start one per
core. Nothing is sent between the processes; each prints what it made.
"""
import time

from app import horovod  # noqa: F401 (first: it sets TF_XLA_FLAGS)

from absl import app

import input_pipeline
from app import cli
from app import flags as app_flags
from app.flags.common import FLAGS, invalid
from input_pipeline import topology


def check(argv):
    """The experiment's defaults, as app.train takes them; designs need a topology data set
    and a folder to keep them in."""
    app_flags.experiment.prefer_command_line_batch_flag(argv)
    app_flags.experiment.apply_experiment_defaults()
    if input_pipeline.DATASETS[FLAGS.dataset].task != "topology":
        raise invalid("dataset", "is not a data set of designs (--dataset=topology)")
    if not FLAGS.data_dir:
        raise invalid("data_dir", "is needed: the designs are kept there for app.train")
    app_flags.data.check(cli.world_size_from_environment())


def main(_):
    rank, size = cli.rank_from_environment(), cli.world_size_from_environment()
    started, made = time.perf_counter(), 0
    for split in input_pipeline.SPLITS:
        source = input_pipeline.load(FLAGS.dataset, split, **app_flags.load_options())
        for index in range(rank, source.num_examples, size):
            made += topology.keep_example(FLAGS.volume_size, topology.SEED, split, index,
                                          FLAGS.data_dir)
    print(f"{cli.program()}: rank {rank}: made {made} designs of {FLAGS.volume_size}^3 in "
          f"{time.perf_counter() - started:.0f} s into {FLAGS.data_dir}", flush=True)


def run():
    app_flags.define_training_flags()
    app.run(main, flags_parser=app_flags.parser(check))


if __name__ == "__main__":
    run()
