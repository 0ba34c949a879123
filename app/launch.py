"""Starts app.train on N processes with the project's launcher settings, printing the command.

    python -m app.launch -np 2 --flagfile=configs/digits_cnn.cfg
    python -m app.launch -np 8 --launcher=horovodrun --hosts=node1:4,node2:4 --flagfile=...

Every argument it does not know is passed to app.train unchanged.

mpirun settings and why (measured in BENCHMARKS.md):
- `--map-by slot:PE=C --bind-to core`: each rank gets its own C = cores / ranks-per-node
  cores (app.train sizes its thread pools to them), so the ranks' TensorFlow, tf.data and
  Horovod threads do not migrate and compete across cores. With more ranks than cores it
  falls back to `--bind-to none`. Nodes are assumed to have as many cores as this process
  may use here. Inside a SLURM allocation (scripts/slurm/train_mpirun.sbatch) the hosts
  and their slots come from it.
- `--mca mpi_yield_when_idle 1`: a rank waiting in MPI yields its core instead of busy
  polling it away from TensorFlow.
- `HOROVOD_CYCLE_TIME=0.02` (ms) when every rank runs on one node with a core of its own:
  Horovod's background thread then coordinates the allreduces almost as soon as a rank has
  its gradients instead of once a millisecond, a large share of a small model's step.
  Across nodes (a --hosts list of several), each cycle is a message over the network, so
  Horovod's default stays. An HOROVOD_CYCLE_TIME set by the user wins.
- Across nodes, TCP keepalives on mpirun's connections to its daemons: a node lost without a
  word (power, link) ends the job within 15-25 s, with one line naming it, instead of
  leaving mpirun waiting on it for Open MPI's default 8 minutes.
- `--network_interface=IF` (e.g. ib0): the ranks on different nodes talk over IF only
  (Open MPI's `btl_tcp_if_include` and `oob_tcp_if_include`, horovodrun's
  `--network-interface`); without it MPI uses every interface it finds up. Ranks on one
  node talk through shared memory whatever it says.
`horovodrun` runs with Gloo, so the two launchers give the two controllers Horovod was built
with. Every HOROVOD_* and NCCL_* variable set by the user is passed on to the ranks.

Elastic training (`--host_discovery_script`, with `--min_np`/`--max_np`) runs horovodrun's
elastic mode and app.train --elastic: the script prints the hosts available now, one
`host:slots` per line, and Horovod polls it every second; workers leave and join at the
next commit of the training state. Horovod finds the interface the workers talk over by
probing two hosts at start, or takes `--network_interface` (on one machine: lo).

    python -m app.launch -np 4 --min_np=2 --max_np=8 --host_discovery_script=./hosts.sh ...
"""
import os
import re
import shlex
import signal
import subprocess
import sys

from app import cli

LAUNCHERS = ("mpirun", "horovodrun")
# How horovodrun's Gloo launcher names the first rank that failed.
HOROVODRUN_FAILURE = re.compile(r"Process name: (\S+)\nExit code: (-?\d+)")
# Across nodes, mpirun gives up on a node whose daemon has not answered TCP keepalives for
# 15 to 25 s (Open MPI's default: 8 minutes), so that a node lost without a word ends the job
# instead of leaving mpirun waiting for it after the ranks elsewhere have stopped.
LOST_NODE_KEEPALIVE = {"time": "10", "intvl": "5", "probes": "3"}
# How mpirun names a node whose daemon it lost.
LOST_NODE = re.compile(r"Remote daemon: \S+ on node (\S+)")
FORWARDED_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")


def command(num_processes, launcher, hosts, train_args, elastic=None, network_interface=None):
    """The full command line that starts app.train on `num_processes` processes; `elastic`:
    (min processes, max processes, host discovery script) for horovodrun's elastic mode;
    `network_interface`: the one the nodes talk over (None: MPI's or Horovod's choice)."""
    train = [sys.executable, "-m", "app.train", *train_args]
    tuned = _tuned_horovod_environment(num_processes, hosts)
    interface = ["--network-interface", network_interface] if network_interface else []
    if elastic:
        min_np, max_np, discovery_script = elastic
        return [_horovodrun(), "-np", str(num_processes), "--min-np", str(min_np),
                "--max-np", str(max_np), "--host-discovery-script", discovery_script,
                *interface, *train, *([] if "--elastic" in train_args else ["--elastic"])]
    if launcher == "horovodrun":
        cycle = ["--cycle-time-ms", tuned["HOROVOD_CYCLE_TIME"]] if tuned else []
        return [_horovodrun(), "-np", str(num_processes), "--gloo", *cycle, *interface,
                *(["-H", hosts] if hosts else []), *train]
    mpirun = ["mpirun", "-np", str(num_processes), *_binding(num_processes, hosts),
              "--mca", "mpi_yield_when_idle", "1"]
    if _several_nodes(hosts):
        for name, value in LOST_NODE_KEEPALIVE.items():
            mpirun += ["--mca", f"oob_tcp_keepalive_{name}", value]
    if network_interface:
        mpirun += ["--mca", "btl_tcp_if_include", network_interface,
                   "--mca", "oob_tcp_if_include", network_interface]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    mpirun += ["-H", hosts] if hosts else ["--oversubscribe"]
    for name in sorted(os.environ):
        if name in FORWARDED_ENVIRONMENT or name.startswith(("HOROVOD_", "NCCL_")):
            mpirun += ["-x", name]
    for name, value in tuned.items():
        mpirun += ["-x", f"{name}={value}"]
    return mpirun + train


def slurm_hosts(environ):
    """The nodes of the SLURM allocation this runs in with their tasks, as host:slots,...
    (None outside an allocation): mpirun then places the ranks as SLURM allotted them, and
    the binding and cycle time follow the ranks per node."""
    if not {"SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE"} <= environ.keys():
        return None
    nodes = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    tasks = []
    for entry in environ["SLURM_TASKS_PER_NODE"].split(","):  # e.g. 4(x2),2
        count, _, repeat = entry.partition("(x")
        tasks += [int(count)] * int(repeat.rstrip(")") or 1)
    return ",".join(f"{node}:{count}" for node, count in zip(nodes, tasks))


def _horovodrun():
    return os.path.join(os.path.dirname(sys.executable), "horovodrun")


def _several_nodes(hosts):
    return bool(hosts) and "," in hosts


def host_slots(hosts):
    """[(host, slots)] of a host list host:slots,... (slots 1 where not given); ValueError
    if a slot count is not a whole number."""
    return [(host, int(slots or 1))
            for host, _, slots in (entry.partition(":") for entry in hosts.split(","))]


def _ranks_per_node(num_processes, hosts):
    return max(slots for _, slots in host_slots(hosts)) if hosts else num_processes


def _tuned_horovod_environment(num_processes, hosts):
    """Horovod settings measured to be faster here (see the module docstring), unless set."""
    one_node = not _several_nodes(hosts)
    own_cores = usable_cores() >= _ranks_per_node(num_processes, hosts)
    if num_processes > 1 and one_node and own_cores and "HOROVOD_CYCLE_TIME" not in os.environ:
        return {"HOROVOD_CYCLE_TIME": "0.02"}
    return {}


def usable_cores():
    """The cores this process may run on (a SLURM job's, or the machine's); the nodes are
    assumed to offer each rank as many."""
    return len(os.sched_getaffinity(0))


def _binding(num_processes, hosts):
    """Each rank bound to its share of the node's cores this may use (a SLURM job's, say),
    or unbound when oversubscribed."""
    cores_per_rank = usable_cores() // _ranks_per_node(num_processes, hosts)
    if cores_per_rank < 1:
        return ["--bind-to", "none", "--map-by", "slot"]
    return ["--map-by", f"slot:PE={cores_per_rank}", "--bind-to", "core"]


def main(argv=None):
    parser = cli.argument_parser(
        "app.launch", __doc__.split("\n")[0],
        "Other arguments go to app.train (see python -m app.train --helpfull).")
    parser.add_argument("-np", type=int, default=2, help="number of processes")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="mpirun",
                        help="mpirun (tuned: binding, yielding) or horovodrun (Gloo)")
    parser.add_argument("--hosts", help="host:slots,... (None: the SLURM allocation this "
                                          "runs in, or else this machine)")
    parser.add_argument("--host_discovery_script",
                        help="elastic training: executable printing the available host:slots")
    parser.add_argument("--min_np", type=int, help="elastic: fewest processes (None: -np)")
    parser.add_argument("--max_np", type=int, help="elastic: most processes (None: -np)")
    parser.add_argument("--network_interface",
                        help="the interface the nodes talk over (e.g. ib0; lo for elastic "
                             "runs on one machine); without it MPI uses every interface up, "
                             "and elastic Horovod needs two hosts at start to find a common "
                             "one")
    args, train_args = parser.parse_known_args(argv)
    if args.np < 1:
        parser.error(f"-np={args.np}: needs at least one process")
    elastic = None
    if args.host_discovery_script:
        min_np, max_np = args.min_np or args.np, args.max_np or args.np
        if not 1 <= min_np <= args.np <= max_np:
            parser.error(f"--min_np={min_np}, -np={args.np}, --max_np={max_np}: "
                         f"needs 1 <= min_np <= np <= max_np")
        if args.hosts:
            parser.error("--hosts: the host discovery script gives the hosts of elastic runs")
        if not os.access(args.host_discovery_script, os.X_OK):
            parser.error(f"--host_discovery_script={args.host_discovery_script}: "
                         f"not an executable file")
        elastic = (min_np, max_np, os.path.abspath(args.host_discovery_script))
    elif args.min_np or args.max_np:
        parser.error("--min_np/--max_np: need --host_discovery_script (elastic training)")
    hosts = args.hosts or (None if elastic else slurm_hosts(os.environ))
    launch = command(args.np, args.launcher, hosts, train_args, elastic, args.network_interface)
    print(shlex.join(launch), flush=True)
    if launch[0] == _horovodrun():
        _run_horovodrun(launch)
    if _several_nodes(hosts):
        _run_mpirun(launch)
    os.execvp(launch[0], launch)


def _run_mpirun(arguments):
    """Runs mpirun as a child, passing on its output and the signals a job gets (a SLURM
    recipe's USR1), because mpirun tells of a lost node only in a box of text among the
    ranks' output: this ends with one line naming it."""
    process = subprocess.Popen(arguments, stderr=subprocess.PIPE, text=True, errors="replace")
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, lambda number, _: process.send_signal(number))
    lost = None
    for line in process.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        lost = lost or LOST_NODE.search(line)
    code = process.wait()
    if lost and code:
        print(cli.error_line(f"mpirun lost node {lost[1]} (no answer from it); the job was "
                             f"ended, and the same command on the nodes left resumes from "
                             f"the last checkpoint"), file=sys.stderr, flush=True)
    sys.exit(code if code >= 0 else 128 - code)


def _run_horovodrun(arguments):
    """Runs horovodrun's own entry point in this process, because its console script shows a
    failed rank as a Python traceback and exits 1 whatever the rank's code (75, preempted,
    must reach a requeue script)."""
    from horovod.runner.launch import run_commandline
    sys.argv = arguments
    try:
        sys.exit(run_commandline())
    except (RuntimeError, ValueError) as error:
        failed = HOROVODRUN_FAILURE.search(str(error))
        if not failed:
            sys.exit(cli.error_line(f"horovodrun: {cli.first_line(error)}"))
        name, code = failed[1], int(failed[2])
        print(cli.error_line(f"horovodrun: process {name} exited first, with code {code}; "
                             f"the job was ended"), file=sys.stderr)
        sys.exit(code if code > 0 else 128 - code)


if __name__ == "__main__":
    main()
