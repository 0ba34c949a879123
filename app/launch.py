"""Starts app.train on N processes with the project's launcher settings, printing the command.

    python -m app.launch -np 2 --flagfile=configs/digits_cnn.cfg
    python -m app.launch -np 8 --launcher=horovodrun --hosts=node1:4,node2:4 --flagfile=...

Every argument it does not know is passed to app.train unchanged.

mpirun settings and why: `--bind-to none --map-by slot`, as Horovod recommends, leaves each
process free to use its share of the cores (app.train sizes its thread pools); and
`--mca mpi_yield_when_idle 1` stops MPI's busy polling from taking a core away from
TensorFlow while a rank waits in an allreduce. `horovodrun` runs with Gloo, so the two
launchers give the two controllers Horovod was built with.
"""
import argparse
import os
import shlex
import sys

LAUNCHERS = ("mpirun", "horovodrun")
FORWARDED_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "TF_USE_LEGACY_KERAS")


def command(num_processes, launcher, hosts, train_args):
    """The full command line that starts app.train on `num_processes` processes."""
    train = [sys.executable, "-m", "app.train", *train_args]
    if launcher == "horovodrun":
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        return [horovodrun, "-np", str(num_processes), "--gloo",
                *(["-H", hosts] if hosts else []), *train]
    mpirun = ["mpirun", "-np", str(num_processes), "--bind-to", "none", "--map-by", "slot",
              "--mca", "mpi_yield_when_idle", "1"]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    mpirun += ["-H", hosts] if hosts else ["--oversubscribe"]
    for name in FORWARDED_ENVIRONMENT:
        if name in os.environ:
            mpirun += ["-x", name]
    return mpirun + train


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m app.launch", description=__doc__.split("\n")[0],
        epilog="Other arguments go to app.train (see python -m app.train --helpfull).",
        allow_abbrev=False)
    parser.add_argument("-np", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="mpirun")
    parser.add_argument("--hosts", help="host:slots,... (default: this machine)")
    args, train_args = parser.parse_known_args(argv)
    if args.np < 1:
        parser.error(f"-np={args.np}: needs at least one process")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    launch = command(args.np, args.launcher, args.hosts, train_args)
    print(shlex.join(launch), flush=True)
    os.execvp(launch[0], launch)


if __name__ == "__main__":
    main()
