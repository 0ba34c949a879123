"""Scaling study of one experiment: training images/s at 1..N processes with Horovod (weak
scaling: fixed per-process batch; strong scaling: fixed global batch), against plain Keras,
one process with N times the threads, tf.distribute.MultiWorkerMirroredStrategy with N
workers, and N plain Keras processes that train side by side without communicating (what the
machine gives N processes at all: Horovod np=N over it is the share communication leaves),
all on the same model, data and batch per process. Each row also has the CPU milliseconds
per image of the whole run (every process's CPU time over the measured steps, summed, per
image), which a slower minute on a shared machine does not change. Writes scaling.md,
scaling.csv and scaling.png to --out_dir and prints the ratios that matter.

    python -m app.studies.throughput_scaling -N 2 --flagfile=configs/digits_cnn.cfg

Across nodes, `--hosts=node1:1,node2:1` (run on the first host): Horovod at np=k runs on the
list's first k slots, N being all of them; plain Keras runs on this host, and the runs that
would measure this host alone (more threads, MultiWorkerMirrored, the independent copies) are
left out. On the simulated cluster (scripts/simulated_cluster.sh) use
`--launcher=horovodrun`: mpirun binds a rank on node2 to node1's core, the hosts sharing one
machine's topology (BENCHMARKS.md).

Every run is `app.train --benchmark` started through app.launch (so with the project's
launcher settings), or app.studies.keras_reference for the non-Horovod ones; every number in
the outputs is read from the results those runs wrote.
"""
import functools
import json
import os
import subprocess
import sys

import numpy as np

from app import cli
from app.launch import host_slots
from app.results import throughput_summary
from app.studies import harness


def run_reference(model_dir, workers, train_args, independent=False):
    """app.studies.keras_reference on `workers` local processes: MultiWorkerMirroredStrategy when
    more than one, or with `independent` plain Keras in each, at the same time, each on a
    core of its own when there are enough (in MODEL_DIR/copy-I); summarized as app.train
    summarizes its ranks."""
    mirrored = workers > 1 and not independent
    addresses = [f"localhost:{harness.free_port()}" for _ in range(workers)] if mirrored else []
    cores = sorted(os.sched_getaffinity(0))
    processes, result_files = [], []
    for index in range(workers):
        env, directory, preexec = dict(os.environ), model_dir, None
        if independent:
            directory = os.path.join(model_dir, f"copy-{index}")
            if len(cores) >= workers:
                preexec = functools.partial(os.sched_setaffinity, 0, {cores[index]})
        elif mirrored:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                           "task": {"type": "worker", "index": index}})
        result_files.append(os.path.join(
            directory, f"reference-{0 if independent else index}.json"))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "app.studies.keras_reference", *train_args,
             f"--model_dir={directory}"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec))
    for process in processes:
        output = process.communicate()[0]
        if process.returncode:
            sys.exit(cli.error_line(f"{model_dir} failed:\n{output[-3000:]}"))
    ranks = []
    for path in result_files:
        with open(path) as results:
            ranks.append(json.load(results))
    return throughput_summary([r["images_per_sec"] for r in ranks],
                              [r["window_rates"] for r in ranks],
                              [r["cpu_seconds_per_image"] for r in ranks])


def first_slots(hosts, processes):
    """The host list (host:slots,...) of the first `processes` slots of `hosts`."""
    taken, left = [], processes
    for host, slots in host_slots(hosts):
        count = min(slots, left)
        if count:
            taken.append(f"{host}:{count}")
        left -= count
    return ",".join(taken)


def _one_host_configurations(max_processes, batch, threads, train_args):
    """One process with N times the threads, MultiWorkerMirrored on N workers and N plain
    Keras processes side by side, on this host."""
    common = [*train_args, f"--threads_per_process={threads}"]
    global_batch = batch * max_processes
    configurations = [dict(
        kind="threads", run=f"1 process, {threads * max_processes} threads", processes=1,
        threads=threads * max_processes, batch=global_batch, measure=lambda d: run_reference(
            d, 1, [*train_args, f"--threads_per_process={threads * max_processes}",
                   f"--batch_size={global_batch}"]))]
    if max_processes > 1:
        configurations.append(dict(
            kind="tf.distribute", run=f"MultiWorkerMirrored {max_processes} workers",
            processes=max_processes, threads=threads, batch=batch,
            measure=lambda d: run_reference(d, max_processes, [*common, f"--batch_size={batch}"])))
        configurations.append(dict(
            kind="independent", run=f"{max_processes} plain Keras, no communication",
            processes=max_processes, threads=threads, batch=batch,
            measure=lambda d: run_reference(d, max_processes, [*common, f"--batch_size={batch}"],
                                            independent=True)))
    return configurations


def study(out_dir, max_processes, batch, threads, train_args, launch_args, repeats=1,
          hosts=None):
    """Runs every configuration `repeats` times, round-robin so that the machine's drifts
    fall on all of them alike; returns the table's rows, each with the median images/s.
    With `hosts`, the Horovod runs go to their first slots and only plain Keras runs here."""
    common = [*train_args, f"--threads_per_process={threads}"]
    global_batch = batch * max_processes

    def horovod(model_dir, processes, per_process):
        placed = [f"--hosts={first_slots(hosts, processes)}"] if hosts else []
        return harness.run_benchmark(model_dir, processes,
                                     [*common, f"--batch_size={per_process}"],
                                     [*launch_args, *placed])
    configurations = [dict(kind="reference", run="plain Keras", processes=1, threads=threads,
                           batch=batch, measure=lambda d: run_reference(
                               d, 1, [*common, f"--batch_size={batch}"]))]
    for processes in range(1, max_processes + 1):
        configurations.append(dict(
            kind="weak", run=f"Horovod np={processes}", processes=processes, threads=threads,
            batch=batch, measure=lambda d, p=processes: horovod(d, p, batch)))
    for processes in range(1, max_processes):
        per_process = global_batch // processes
        configurations.append(dict(
            kind="strong", run=f"Horovod np={processes}, global batch {global_batch}",
            processes=processes, threads=threads, batch=per_process,
            measure=lambda d, p=processes, b=per_process: horovod(d, p, b)))
    if not hosts:  # these would measure this host alone
        configurations += _one_host_configurations(max_processes, batch, threads, train_args)
    measured = [[] for _ in configurations]
    for repeat in range(repeats):
        for index, configuration in enumerate(configurations):
            model_dir = os.path.join(out_dir, f"run{index}-{configuration['kind']}-"
                                              f"np{configuration['processes']}-r{repeat}")
            measured[index].append(configuration["measure"](model_dir))
    rows = []
    for configuration, results in zip(configurations, measured):
        rates = [result["images_per_sec"] for result in results]
        rows.append(dict(
            {k: v for k, v in configuration.items() if k != "measure"},
            global_batch=configuration["batch"] * configuration["processes"],
            images_per_sec=float(np.median(rates)),
            spread=float(np.std(rates)) if repeats > 1 else results[0]["images_per_sec_spread"],
            cpu_ms_per_image=float(np.median([result["cpu_ms_per_image"]
                                              for result in results]))))
    weak_largest = next(row for row in rows
                        if row["kind"] == "weak" and row["processes"] == max_processes)
    rows.insert(rows.index(weak_largest) + max_processes,  # after the strong runs
                dict(weak_largest, kind="strong"))  # the same runs: global batch batch * N
    _add_speedups(rows)
    return rows


# Which Horovod np=1 run each kind is compared with: the one with the same global batch per
# step (batch per process for weak scaling, batch x N for strong scaling and for threads).
_BASELINE_KIND = {"reference": "weak", "weak": "weak", "tf.distribute": "weak",
                  "independent": "weak", "strong": "strong", "threads": "strong"}


def _add_speedups(rows):
    """Speedup over Horovod on one process at the same global batch per step, and
    efficiency = speedup / cores used."""
    base = {row["kind"]: row["images_per_sec"] for row in rows if row["processes"] == 1
            and row["kind"] in ("weak", "strong")}
    for row in rows:
        reference = base[_BASELINE_KIND[row["kind"]]]
        row["speedup"] = row["images_per_sec"] / reference
        row["efficiency"] = row["speedup"] / (row["processes"] * row["threads"]
                                              / rows[0]["threads"])


def ratios(rows):
    """The comparisons the tuned defaults are held to, from the measured rows: images/s, and
    the CPU time per image of the largest runs (an overhead that a slower minute on a shared
    machine does not hide or fake)."""
    by_run = {(row["kind"], row["processes"]): row["images_per_sec"] for row in rows}
    cpu = {(row["kind"], row["processes"]): row["cpu_ms_per_image"] for row in rows}
    largest = max(row["processes"] for row in rows)
    found = {"Horovod np=1 / plain Keras": by_run[("weak", 1)] / by_run[("reference", 1)]}
    if largest > 1:
        found[f"Horovod np={largest} / np=1"] = by_run[("weak", largest)] / by_run[("weak", 1)]
        found[f"CPU time per image, Horovod np=1 / np={largest}"] = (
            cpu[("weak", 1)] / cpu[("weak", largest)])
    if largest > 1 and ("independent", largest) in by_run:  # on one host
        found[f"Horovod np={largest} / 1 process with {largest}x threads"] = (
            by_run[("weak", largest)] / by_run[("threads", 1)])
        found[f"Horovod np={largest} / MultiWorkerMirrored np={largest}"] = (
            by_run[("weak", largest)] / by_run[("tf.distribute", largest)])
        found[f"{largest} independent processes / one (the machine's ceiling)"] = (
            by_run[("independent", largest)] / by_run[("reference", 1)])
        found[f"Horovod np={largest} / {largest} independent processes"] = (
            by_run[("weak", largest)] / by_run[("independent", largest)])
        found[f"CPU time per image, {largest} independent processes / Horovod np={largest}"] = (
            cpu[("independent", largest)] / cpu[("weak", largest)])
    found["CPU time per image, plain Keras / Horovod np=1"] = (
        cpu[("reference", 1)] / cpu[("weak", 1)])
    return found


def write_outputs(out_dir, rows, found, title):
    columns = ["kind", "run", "processes", "threads", "batch", "global_batch",
               "images_per_sec", "spread", "speedup", "efficiency", "cpu_ms_per_image"]
    harness.write_table(os.path.join(out_dir, "scaling"), rows, columns,
                [(c, lambda row, c=c: _cell(row[c])) for c in columns[1:]], title,
                notes=[f"- {name}: {value:.2f}x" for name, value in found.items()])
    _chart(os.path.join(out_dir, "scaling.png"), rows, title)


def _chart(path, rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars.barh([row["run"] for row in rows], [row["images_per_sec"] for row in rows],
              xerr=[row["spread"] or 0 for row in rows], color="tab:blue")
    bars.invert_yaxis()
    bars.set_xlabel("training images/s (all processes)")
    for kind, marker in (("weak", "o-"), ("strong", "s-")):
        points = sorted((row["processes"], row["speedup"]) for row in rows if row["kind"] == kind)
        lines.plot(*zip(*points), marker, label=f"{kind} scaling")
    largest = max(row["processes"] for row in rows)
    lines.plot([1, largest], [1, largest], "k--", label="ideal")
    lines.set_xlabel("processes")
    lines.set_ylabel("speedup over 1 process")
    lines.set_xticks(range(1, largest + 1))
    lines.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def main(argv=None):
    parser = harness.study_parser("app.studies.throughput_scaling", __doc__)
    parser.add_argument("-N", "--max_processes", type=int, default=2,
                        help="Horovod runs at 1..N processes")
    parser.add_argument("--batch_size", type=int, default=64, help="per process (weak scaling)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--launcher", default="mpirun", choices=("mpirun", "horovodrun"),
                        help="app.launch's launcher of the Horovod runs")
    parser.add_argument("--hosts", help="host:slots,... for the Horovod runs, np=k on the first "
                        "k slots (-N: all of them); None: this host")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each configuration; the table holds their median")
    parser.add_argument("--out_dir", default="runs/scaling",
                        help="where the runs, the table and the chart go")
    args, train_args = parser.parse_known_args(argv)
    if args.hosts:
        try:
            args.max_processes = sum(slots for _, slots in host_slots(args.hosts))
        except ValueError:
            parser.error(f"--hosts={args.hosts}: not host:slots,...")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = study(args.out_dir, args.max_processes, args.batch_size, args.threads,
                 # Like for like: the references have no LR warmup or per-step schedule.
                 [*train_args, "--epochs=1", "--warmup_epochs=0", "--lr_schedule=constant"],
                 [f"--launcher={args.launcher}"], args.repeats, args.hosts)
    found = ratios(rows)
    where = f"hosts {args.hosts}" if args.hosts else f"{os.cpu_count()} cores"
    title = (f"{' '.join(train_args) or 'digits_cnn'}: batch {args.batch_size}/process, "
             f"{args.threads} thread(s)/process, {args.launcher}, {where}, "
             f"median of {args.repeats}")
    write_outputs(args.out_dir, rows, found, title)
    with open(os.path.join(args.out_dir, "scaling.md")) as markdown:
        print(markdown.read())
    print(f"wrote {args.out_dir}/scaling.md, scaling.csv, scaling.png")


if __name__ == "__main__":
    main()
