"""What every study shares: running app.train (through app.launch) and reading its results
(its timeline's collectives too), its command line, and writing its tables."""
import collections
import csv
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys

from app import cli


def run_app_train(model_dir, launch_args, train_args, divergence_ok=False, environment=None):
    """app.train through app.launch, into `model_dir`, with `environment`'s variables added;
    the results.json it wrote. With `divergence_ok` a run whose loss became NaN or infinite
    (app.train's one line and exit code) gives None instead of ending the study: an LR too
    large is a study's finding."""
    result = check([sys.executable, "-m", "app.launch", *launch_args, *train_args,
                    f"--model_dir={model_dir}"], model_dir,
                   tolerated=lambda result: divergence_ok and diverged(result),
                   environment=environment)
    if result.returncode:
        return None
    with open(os.path.join(model_dir, "results.json")) as results:
        return json.load(results)


def diverged(result):
    """Whether an ended app.train (a CompletedProcess) stopped because its loss diverged."""
    return (result.returncode == cli.RUN_ERROR
            and f"app.train: error: {cli.DIVERGED} " in result.stderr)


# A run under a memory limit may hang instead of failing (OpenBLAS retries a failed
# allocation in a loop; tf.data waits for a worker thread that never started): past this
# it is ended, and counts as stopped by the limit if it then trains without it.
LIMITED_RUN_SECONDS = 600


def trains_within(model_dir, launch_args, train_args, memory_limit_mb,
                  timeout=LIMITED_RUN_SECONDS):
    """Whether app.train (through app.launch) runs to its end with each process's data
    segment (RLIMIT_DATA: the heap and private mappings, where TensorFlow's tensors live)
    limited to `memory_limit_mb` MiB; mpirun's ranks inherit the limit. A run that fails
    under the limit is run again without it: only if that one ends well was it the limit
    (memory running out shows as a MemoryError, an abort, a thread that cannot start, a
    failed import or a hang, which no message tells apart); if it fails too, the study
    ends with its error, which is no answer about memory."""
    limit = memory_limit_mb * 2 ** 20

    def limited():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    command = [sys.executable, "-m", "app.launch", *launch_args, *train_args,
               f"--model_dir={model_dir}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=limited, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    # A launcher that failed may leave ranks behind (still under the limit, or hung): its
    # whole session goes before the next run.
    _kill_session(process)
    if code == 0:
        return True
    shutil.rmtree(model_dir, ignore_errors=True)
    check(command, model_dir)
    return False


def _kill_session(process):
    """SIGKILL to every process left in `process`'s session (mpirun and its ranks)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_benchmark(model_dir, processes, train_args, launch_args, environment=None):
    """`app.train --benchmark` on `processes` processes; its results."""
    return run_app_train(model_dir, ["-np", str(processes), *launch_args],
                         [*train_args, "--benchmark"], environment=environment)


def check(command, name, tolerated=lambda result: False, environment=None):
    """Runs `command` with `environment`'s variables added; its CompletedProcess. A failure
    ends the study with the command and the end of its stderr, unless `tolerated(result)`."""
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, **(environment or {})})
    if result.returncode and not tolerated(result):
        sys.exit(cli.error_line(f"{name} failed with exit code {result.returncode} "
                                f"({' '.join(command)}):\n"
                                f"{(result.stderr or result.stdout)[-3000:]}"))
    return result


def study_parser(module, doc):
    """The command line of a study that runs app.train: its own options; every other argument
    goes to each run."""
    return cli.argument_parser(
        module, doc.split("\n\n")[0],
        "Other arguments go to every run (app.train flags: python -m app.train --helpfull).")


def add_budget_arguments(parser, what, sizes, out_dir):
    """A study's --memory_budget_mb and --budget_sizes (the sides of `what` tried under the
    budget, `sizes` by default) and --out_dir (`out_dir` by default)."""
    parser.add_argument("--memory_budget_mb", type=int, default=None,
                        help="per-process memory limit (MiB) for the largest-size runs")
    parser.add_argument("--budget_sizes", default=sizes,
                        help=f"{what} tried under the budget, smallest first")
    parser.add_argument("--out_dir", default=out_dir,
                        help="where the runs, the table and the figure go")


def known_names(parser, name, text, table):
    """The comma-separated names of option --`name`'s `text`, each a key of `table`; a usage
    error naming the unknown ones otherwise."""
    names = text.split(",")
    unknown = [found for found in names if found not in table]
    if unknown:
        parser.error(f"--{name}: unknown {', '.join(unknown)}; of {', '.join(table)}")
    return names


def whole_numbers(parser, name, text):
    """The positive whole numbers of option --`name`'s comma-separated `text`; a usage error
    otherwise."""
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        parser.error(f"--{name}={text}: must be whole numbers, comma-separated")
    if min(values) < 1:
        parser.error(f"--{name}={text}: must be positive")
    return values


# app.train's flags (by their start) that only these --optimizer values take; it refuses
# them with any other
OPTIMIZER_FLAGS = {"kfac": ("--kfac_", "--base_optimizer"),
                   "shampoo": ("--shampoo_", "--base_optimizer")}


def arguments_for(optimizer, train_args):
    """`train_args` without the flags (--name=value or --name value) that --optimizer=
    `optimizer` does not take, so that one study command can set K-FAC's damping beside
    runs of other optimizers."""
    own = OPTIMIZER_FLAGS.get(optimizer, ())
    foreign = tuple({start for starts in OPTIMIZER_FLAGS.values() for start in starts} - set(own))
    kept, skip_value = [], False
    for argument in train_args:
        if skip_value:
            skip_value = False
        elif argument.startswith(foreign):
            skip_value = "=" not in argument
        else:
            kept.append(argument)
    return kept


def write_table(stem, rows, csv_columns, markdown_columns, title=None, notes=()):
    """Writes a study's table: `rows` (dicts) to STEM.csv, the values of `csv_columns` in
    full, and to STEM.md, a markdown table under `# title` of `markdown_columns`, each
    (header, cell(row) -> text), then the `notes` lines. Returns the markdown."""
    with open(f"{stem}.csv", "w", newline="") as table:
        writer = csv.DictWriter(table, csv_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    headers = [header for header, _ in markdown_columns]
    lines = [*([f"# {title}", ""] if title else []),
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
             *("| " + " | ".join(cell(row) for _, cell in markdown_columns) + " |"
               for row in rows),
             *(["", *notes] if notes else [])]
    markdown = "\n".join(lines) + "\n"
    with open(f"{stem}.md", "w") as out:
        out.write(markdown)
    return markdown


def plain_columns(columns):
    """write_table's markdown columns for `columns` (keys of the rows) as they are, floats to
    4 significant digits."""
    def cell(column):
        return lambda row: (f"{row[column]:.4g}" if isinstance(row[column], float)
                            else str(row[column]))
    return [(column, cell(column)) for column in columns]


def write_study(stem, rows, markdown_columns, title, notes=(), **fields):
    """Writes a study's table (write_table, every column in the CSV) and STEM.json (the title,
    `fields` and the rows), prints the table, and says where they went."""
    print(write_table(stem, rows, list(rows[0]), markdown_columns, title, notes))
    with open(f"{stem}.json", "w") as out:
        json.dump({"title": title, **fields, "rows": rows}, out, indent=2)
    print(f"wrote {stem}.md, .csv and .json")


def benchmark_flags(model_name, size):
    """app.train's data flags of the generated data `model_name` trains on (its Builder's
    example_dataset): images, or 8 surveys, of `size` a side."""
    import models
    return [f"--dataset={models.BUILDERS[model_name].example_dataset}",
            f"--image_size={size}", f"--volume_size={size}", "--num_volumes=8",
            "--cache=memory"]


@functools.lru_cache
def benchmark_source(model_name, size):
    """The source of benchmark_flags' data (made once: surveys take seconds)."""
    import input_pipeline
    import models
    return input_pipeline.load(models.BUILDERS[model_name].example_dataset, "train",
                               image_size=size, volume_size=size, num_volumes=8)


def example_extent(model_name, size):
    """An example's spatial extent, as 32x32 or 32x32x32."""
    return "x".join(map(str, benchmark_source(model_name, size).feature_shape[:-1]))


def parse_runs(text):
    """[(model, image size, batch)] of MODEL:IMAGE_SIZE:BATCH,..."""
    import models
    runs = []
    for entry in text.split(","):
        name, size, batch = entry.split(":")
        if name not in models.BUILDERS or int(size) < 8 or int(batch) < 1:
            raise ValueError(entry)
        runs.append((name, int(size), int(batch)))
    return runs


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


# Horovod's response types, which open a tensor's collective in the timeline (the other
# events are its negotiation and activities)
COLLECTIVES = ("ALLREDUCE", "ALLGATHER", "BROADCAST", "ALLTOALL", "REDUCESCATTER", "ADASUM")
# Bytes of an element of each type, by the names Horovod writes (its DataType_Name)
_BYTES = {"uint8": 1, "int8": 1, "bool": 1, "uint16": 2, "int16": 2, "float16": 2,
          "bfloat16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8}

Sent = collections.namedtuple("Sent", "tensor collective bytes")


def timeline_collectives(path):
    """[Sent] of every tensor's collective Horovod's timeline at `path` (app.train --timeline,
    written by rank 0) records, in order, each tensor's size from the dtype and shape Horovod
    writes at its end."""
    with open(path) as timeline:
        events = json.load(timeline)
    names, opened, found = {}, {}, []
    for event in events:
        pid = event.get("pid")
        if event.get("ph") == "M" and event.get("name") == "process_name" and pid:
            names[pid] = event["args"]["name"]
        elif event.get("ph") == "B" and event.get("name") in COLLECTIVES:
            opened[pid] = event["name"]
        elif event.get("ph") == "E" and "shape" in event.get("args", {}):
            extents = [int(extent) for extent in re.findall(r"\d+", event["args"]["shape"])]
            found.append(Sent(names[pid], opened.pop(pid),
                              math.prod(extents) * _BYTES[event["args"]["dtype"]]))
    return found


def bytes_by_kind(sent, kinds):
    """{kind: bytes} of `sent` ([Sent]), a tensor's kind the first of `kinds` ({kind: part of
    a tensor's name}) its name holds, "other" where none."""
    found = collections.Counter()
    for item in sent:
        kind = next((kind for kind, part in kinds.items() if part in item.tensor), "other")
        found[kind] += item.bytes
    return dict(found)
