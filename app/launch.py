"""Starts app.train on N processes with the project's launcher settings, printing the command.

    python -m app.launch -np 2 --flagfile=configs/digits_cnn.cfg
    python -m app.launch -np 8 --launcher=horovodrun --hosts=node1:4,node2:4 --flagfile=...

Every argument it does not know is passed to app.train unchanged.

mpirun settings and why (measured in BENCHMARKS.md):
- `--map-by slot:PE=C --bind-to core`: each rank gets its own C = cores / ranks-per-node
  cores (app.train sizes its thread pools to them), so the ranks' TensorFlow, tf.data and
  Horovod threads do not migrate and compete across cores. With more ranks than cores it
  falls back to `--bind-to none`. Nodes are assumed to have as many cores as this one.
- `--mca mpi_yield_when_idle 1`: a rank waiting in MPI yields its core instead of busy
  polling it away from TensorFlow; without it np=2 ran at 1.1x np=1 on 2 cores.
`horovodrun` runs with Gloo, so the two launchers give the two controllers Horovod was built
with.
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
    mpirun = ["mpirun", "-np", str(num_processes), *_binding(num_processes, hosts),
              "--mca", "mpi_yield_when_idle", "1"]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    mpirun += ["-H", hosts] if hosts else ["--oversubscribe"]
    for name in FORWARDED_ENVIRONMENT:
        if name in os.environ:
            mpirun += ["-x", name]
    return mpirun + train


def _binding(num_processes, hosts):
    """Each rank bound to its share of a node's cores, or unbound when oversubscribed."""
    ranks_per_node = max(int(entry.partition(":")[2] or 1)
                         for entry in hosts.split(",")) if hosts else num_processes
    cores_per_rank = (os.cpu_count() or 1) // ranks_per_node
    if cores_per_rank < 1:
        return ["--bind-to", "none", "--map-by", "slot"]
    return ["--map-by", f"slot:PE={cores_per_rank}", "--bind-to", "core"]


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
