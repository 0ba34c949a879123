"""Scaling study of one experiment: training images/s at 1..N processes with Horovod (weak
scaling: fixed per-process batch; strong scaling: fixed global batch), against plain Keras,
one process with N times the threads, and tf.distribute.MultiWorkerMirroredStrategy with N
workers, all on the same model, data and global batch per step. Writes scaling.md,
scaling.csv and scaling.png to --out_dir and prints the ratios that matter.

    python -m app.scaling -N 2 --flagfile=configs/digits_cnn.cfg

Every run is `app.train --benchmark` started through app.launch (so with the project's
launcher settings), or app.keras_reference for the two non-Horovod ones; every number in
the outputs is read from the results those runs wrote.
"""
import argparse
import csv
import json
import os
import socket
import subprocess
import sys

from app import callbacks


def run_horovod(out_dir, name, processes, train_args, launch_args):
    model_dir = os.path.join(out_dir, name)
    _check([sys.executable, "-m", "app.launch", "-np", str(processes), *launch_args,
            *train_args, "--benchmark", f"--model_dir={model_dir}"], name)
    with open(os.path.join(model_dir, "results.json")) as results:
        return json.load(results)


def run_reference(out_dir, name, workers, train_args):
    """app.keras_reference on `workers` local processes (MultiWorkerMirroredStrategy when
    more than one), summarized as app.train summarizes its ranks."""
    model_dir = os.path.join(out_dir, name)
    addresses = [f"localhost:{_free_port()}" for _ in range(workers)]
    processes = []
    for index in range(workers):
        env = dict(os.environ)
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                           "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "app.keras_reference", *train_args,
             f"--model_dir={model_dir}"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    for process in processes:
        output = process.communicate()[0]
        if process.returncode:
            sys.exit(f"app.scaling: {name} failed:\n{output[-3000:]}")
    ranks = []
    for index in range(workers):
        with open(os.path.join(model_dir, f"reference-{index}.json")) as results:
            ranks.append(json.load(results))
    return callbacks.throughput_summary([r["images_per_sec"] for r in ranks],
                                        [r["window_rates"] for r in ranks])


def study(out_dir, max_processes, batch, threads, train_args, launch_args):
    """Runs every configuration; returns the table's rows."""
    common = [*train_args, f"--threads_per_process={threads}"]
    rows = []

    def add(kind, name, processes, threads_each, per_process_batch, results):
        rows.append(dict(kind=kind, run=name, processes=processes, threads=threads_each,
                         batch=per_process_batch, global_batch=per_process_batch * processes,
                         images_per_sec=results["images_per_sec"],
                         spread=results["images_per_sec_spread"]))

    add("reference", "plain Keras", 1, threads, batch,
        run_reference(out_dir, "keras", 1, [*common, f"--batch_size={batch}"]))
    for processes in range(1, max_processes + 1):
        add("weak", f"Horovod np={processes}", processes, threads, batch,
            run_horovod(out_dir, f"weak-np{processes}", processes,
                        [*common, f"--batch_size={batch}"], launch_args))
    for processes in range(1, max_processes):
        per_process = batch * max_processes // processes
        add("strong", f"Horovod np={processes}, global batch {batch * max_processes}",
            processes, threads, per_process,
            run_horovod(out_dir, f"strong-np{processes}", processes,
                        [*common, f"--batch_size={per_process}"], launch_args))
    weak_largest = next(row for row in rows
                        if row["kind"] == "weak" and row["processes"] == max_processes)
    rows.append(dict(weak_largest, kind="strong"))  # the same run: global batch batch * N
    add("threads", f"1 process, {threads * max_processes} threads", 1,
        threads * max_processes, batch * max_processes,
        run_reference(out_dir, "threads", 1, [
            *train_args, f"--threads_per_process={threads * max_processes}",
            f"--batch_size={batch * max_processes}"]))
    if max_processes > 1:
        add("tf.distribute", f"MultiWorkerMirrored {max_processes} workers", max_processes,
            threads, batch, run_reference(out_dir, "mwms", max_processes,
                                          [*common, f"--batch_size={batch}"]))
    _add_speedups(rows)
    return rows


def _add_speedups(rows):
    """Speedup over the one-process run of the same kind (Horovod np=1 for the others), and
    efficiency = speedup / cores used."""
    base = {row["kind"]: row["images_per_sec"] for row in rows if row["processes"] == 1
            and row["kind"] in ("weak", "strong")}
    for row in rows:
        reference = base.get(row["kind"], base["weak"])
        row["speedup"] = row["images_per_sec"] / reference
        row["efficiency"] = row["speedup"] / (row["processes"] * row["threads"]
                                              / rows[0]["threads"])


def ratios(rows):
    """The comparisons the tuned defaults are held to, from the measured rows."""
    by_run = {(row["kind"], row["processes"]): row["images_per_sec"] for row in rows}
    largest = max(row["processes"] for row in rows)
    found = {"Horovod np=1 / plain Keras": by_run[("weak", 1)] / by_run[("reference", 1)]}
    if largest > 1:
        found[f"Horovod np={largest} / np=1"] = by_run[("weak", largest)] / by_run[("weak", 1)]
        found[f"Horovod np={largest} / 1 process with {largest}x threads"] = (
            by_run[("weak", largest)] / by_run[("threads", 1)])
        found[f"Horovod np={largest} / MultiWorkerMirrored np={largest}"] = (
            by_run[("weak", largest)] / by_run[("tf.distribute", largest)])
    return found


def write_outputs(out_dir, rows, found, title):
    columns = ["kind", "run", "processes", "threads", "batch", "global_batch",
               "images_per_sec", "spread", "speedup", "efficiency"]
    with open(os.path.join(out_dir, "scaling.csv"), "w", newline="") as table:
        writer = csv.DictWriter(table, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(columns[1:]) + " |",
             "|" + "---|" * (len(columns) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns[1:]) + " |")
    lines += ["", *[f"- {name}: {value:.2f}x" for name, value in found.items()], ""]
    with open(os.path.join(out_dir, "scaling.md"), "w") as markdown:
        markdown.write("\n".join(lines))
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


def _free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _check(command, name):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"app.scaling: {name} failed ({' '.join(command)}):\n{result.stderr[-3000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m app.scaling", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments go to every run (app.train flags).")
    parser.add_argument("-N", "--max_processes", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64, help="per process (weak scaling)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--launcher", default="mpirun", choices=("mpirun", "horovodrun"))
    parser.add_argument("--out_dir", default="runs/scaling")
    args, train_args = parser.parse_known_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = study(args.out_dir, args.max_processes, args.batch_size, args.threads,
                 [*train_args, "--epochs=1", "--warmup_epochs=0"],
                 [f"--launcher={args.launcher}"])
    found = ratios(rows)
    title = (f"{' '.join(train_args) or 'digits_cnn'}: batch {args.batch_size}/process, "
             f"{args.threads} thread(s)/process, {args.launcher}, {os.cpu_count()} cores")
    write_outputs(args.out_dir, rows, found, title)
    with open(os.path.join(args.out_dir, "scaling.md")) as markdown:
        print(markdown.read())
    print(f"wrote {args.out_dir}/scaling.md, scaling.csv, scaling.png")


if __name__ == "__main__":
    main()
