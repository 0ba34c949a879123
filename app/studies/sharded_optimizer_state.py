"""Optimizer state sharded over the ranks, measured: for an MLP of 50 to 200 million
parameters (app.train's `mlp` on synthetic images, whose side sets the first layer's
width), each rank's memory (weights, optimizer state, gradient accumulators, measured peak)
and the step time against the number of processes, for Horovod's allreduce and the sharded
state of stages 1 and 2 (--shard_optimizer_state, --shard_gradients); and, under a
per-process memory budget, the largest model each mode trains; and, counted from the
models' variables, how evenly whole variables or split ones deal the state out.

    python -m app.studies.sharded_optimizer_state --out_dir=runs/sharded_study

Every run is `app.train --benchmark` with Adam (two slots per weight) at --batch_size per
process and --accumulation_steps (2 by default: stage 1 keeps whole gradient accumulators,
stage 2 its 1/N of them), --repeats times with the modes interleaved (medians reported).
Memory: the weights and accumulators from the parameter count, the optimizer state from
the slot elements each rank holds (results.json's optimizer_state_elements_by_rank,
counted by the optimizer), and the peak resident memory of the largest rank (TensorFlow's
runtime, the input pipeline and every transient included). Time: the milliseconds per
update (with the spread over the repeats) and the CPU seconds per image summed over the
ranks, which oversubscribed cores cannot inflate.

With --memory_budget_mb, each mode runs again at the largest --processes on each of
--budget_sizes under that limit of every process's data segment (RLIMIT_DATA), from the
smallest up until one fails: the table's budget part is the largest model each trained.
The balance part builds ResNet-50, WRN-16-10, FaultSeg3D's U-Net and the 100M MLP and
counts the largest rank's share of their state over the even share on --balance_processes
ranks, dealt as whole variables balanced by size (largest first to the least loaded) and as
every variable split N ways (what app.parallel.sharded_optimizer does).

Writes sharded_study.md, .csv and .json and sharded_study.png to --out_dir; other
arguments go to every run.
"""
import json
import os
import statistics
import sys

from app.parallel.sharded_optimizer import piece_bounds  # first: it loads app.horovod
from app.studies import figures, harness

import models

MB = 2 ** 20
MODES = {  # name: flags
    "allreduce": [],
    "sharded, stage 1": ["--shard_optimizer_state"],
    "sharded, stage 2": ["--shard_gradients"],
}


def _run_flags(args, size, processes, flags):
    return ["--model=mlp", "--dataset=synthetic", f"--image_size={size}", "--optimizer=adam",
            "--learning_rate=1e-4", "--lr_scaling=none", "--epochs=1", "--warmup_epochs=0",
            "--lr_schedule=constant", f"--global_batch_size={args.batch_size * processes}",
            f"--accumulation_steps={args.accumulation_steps}",
            f"--steps_per_epoch={args.steps * args.accumulation_steps}",
            f"--warmup_steps={args.warmup_steps * args.accumulation_steps}", *flags]


def memory_row(results, mode, processes, accumulation_steps):
    """The memory of the largest rank of a run's `results`, in MiB: weights, optimizer
    state, the gradient accumulators kept between batches, and the measured peak."""
    weights = 4 * results["trainable_parameters"]
    accumulators = 0 if accumulation_steps == 1 else (
        weights / processes if mode == "sharded, stage 2" else weights)
    return {"weights_mb": weights / MB,
            "optimizer_state_mb": 4 * max(results["optimizer_state_elements_by_rank"]) / MB,
            "accumulators_mb": accumulators / MB,
            "peak_memory_mb": max(results["peak_memory_mb_by_rank"])}


def measure(args, train_args):
    """A row per (size, processes, mode): the medians of --repeats runs, the modes
    interleaved at each setting, with the spread of the time per update."""
    rows = []
    for size in args.sizes:
        for processes in args.processes:
            runs = {mode: [] for mode in MODES}
            for repeat in range(args.repeats):
                for mode, flags in MODES.items():
                    name = (f"{size}-np{processes}-{mode.replace(', ', '-').replace(' ', '-')}"
                            + (f"-{repeat}" if repeat else ""))
                    runs[mode].append(harness.run_benchmark(
                        os.path.join(args.out_dir, name), processes,
                        [*_run_flags(args, size, processes, flags), *train_args], []))
            for mode, found in runs.items():
                updates = [1000 * args.batch_size * processes * args.accumulation_steps
                           / results["images_per_sec"] for results in found]
                memory = [memory_row(results, mode, processes, args.accumulation_steps)
                          for results in found]
                rows.append({
                    "part": "memory and time", "image_size": size, "processes": processes,
                    "mode": mode, "parameters_m": found[0]["trainable_parameters"] / 1e6,
                    **{key: statistics.median(row[key] for row in memory) for key in memory[0]},
                    "update_ms": statistics.median(updates),
                    "update_ms_spread": max(updates) - min(updates),
                    "cpu_ms_per_image": statistics.median(
                        results["cpu_ms_per_image"] for results in found),
                    "oversubscribed": processes > os.cpu_count()})
    for row in rows:
        plain = next(other for other in rows if other["mode"] == "allreduce"
                     and other["image_size"] == row["image_size"]
                     and other["processes"] == row["processes"])
        row["update_over_allreduce"] = row["update_ms"] / plain["update_ms"]
        row["cpu_over_allreduce"] = row["cpu_ms_per_image"] / plain["cpu_ms_per_image"]
    return rows


def largest_within_budget(args, train_args):
    """A row per mode: the largest model of --budget_sizes it trained under the budget on
    the largest --processes."""
    processes = max(args.processes)
    rows = []
    for mode, flags in MODES.items():
        largest, parameters = None, None
        for size in args.budget_sizes:
            model_dir = os.path.join(args.out_dir, f"budget-{size}-{mode.replace(', ', '-')}")
            if not harness.trains_within(model_dir, ["-np", str(processes)], [
                    *_run_flags(args, size, processes, flags), "--benchmark",
                    *train_args], args.memory_budget_mb):
                break
            with open(os.path.join(model_dir, "results.json")) as results:
                largest, parameters = size, json.load(results)["trainable_parameters"]
        rows.append({"part": "budget", "mode": mode, "processes": processes,
                     "largest_image_size_within_budget": largest,
                     "largest_parameters_m": parameters and parameters / 1e6})
    return rows


# models whose variables the balance part deals out: (name, input shape, outputs)
BALANCED_MODELS = (("resnet50", (224, 224, 3), 1000), ("wrn16_10", (28, 28, 1), 10),
                   ("unet3d", (128, 128, 128, 1), 1), ("mlp", (362, 362, 3), 1000))


def balance(processes, models_to_deal=BALANCED_MODELS):
    """A row per (model, processes): the largest rank's share of the optimizer state over
    the even share (1.0 is perfect) when whole variables are dealt out balanced by size
    (largest first to the least loaded rank) and when every variable is split N ways
    (app.parallel.sharded_optimizer's pieces), counted from the models' variables."""
    rows = []
    for name, shape, outputs in models_to_deal:
        sizes = sorted((variable.shape.num_elements() for variable in
                        models.build(name, shape, outputs).trainable_variables), reverse=True)
        for count in processes:
            loads = [0] * count
            for size in sizes:
                loads[loads.index(min(loads))] += size
            even = sum(sizes) / count
            split = sum(stop - start for start, stop in (piece_bounds(size, 0, count)
                                                         for size in sizes))
            rows.append({"part": "balance", "model": name, "processes": count,
                         "parameters_m": sum(sizes) / 1e6, "variables": len(sizes),
                         "whole_variables_over_even": max(loads) / even,
                         "split_variables_over_even": split / even})
    return rows


def conclusions(rows, budget_rows, balance_rows, budget_mb):
    lines = []
    for row in rows:
        if row["mode"] != "allreduce":
            lines.append(
                f"{row['parameters_m']:.3g}M parameters on {row['processes']} processes, "
                f"{row['mode']}: optimizer state {row['optimizer_state_mb']:.0f} MiB per "
                f"rank, peak {row['peak_memory_mb']:.0f} MiB; update time "
                f"{row['update_over_allreduce']:.2f}x, CPU per image "
                f"{row['cpu_over_allreduce']:.2f}x the allreduce's"
                + (" (more processes than cores)" if row["oversubscribed"] else ""))
    for row in budget_rows:
        largest = row["largest_parameters_m"]
        lines.append(f"under {budget_mb} MiB per process on {row['processes']} processes, "
                     f"{row['mode']}: " + (f"{largest:.0f}M parameters trained" if largest
                                           else "no size trained"))
    most = max((row["processes"] for row in balance_rows), default=None)
    for row in balance_rows:
        if row["processes"] == most:
            lines.append(f"{row['model']} over {most} ranks: the largest rank holds "
                         f"{row['whole_variables_over_even']:.2f}x the even share of the state "
                         f"dealt as whole variables, {row['split_variables_over_even']:.4f}x "
                         f"split")
    return lines


_COLUMNS = ("part", "model", "image_size", "processes", "mode", "parameters_m", "weights_mb",
            "optimizer_state_mb", "accumulators_mb", "peak_memory_mb", "update_ms",
            "update_ms_spread", "update_over_allreduce", "cpu_ms_per_image",
            "cpu_over_allreduce", "oversubscribed",
            "largest_image_size_within_budget", "largest_parameters_m", "variables",
            "whole_variables_over_even", "split_variables_over_even")


def write_outputs(out_dir, rows, budget_rows, balance_rows, title, budget_mb):
    def number(key, form):
        return lambda row: "" if row.get(key) is None else format(row[key], form)
    columns = [("part", lambda row: row["part"]), ("model", lambda row: row.get("model") or "mlp"),
               ("M parameters", number("parameters_m", ".1f")),
               ("processes", number("processes", "d")), ("mode", lambda row: row.get("mode") or ""),
               ("weights MiB", number("weights_mb", ".0f")),
               ("optimizer state MiB per rank", number("optimizer_state_mb", ".0f")),
               ("accumulators MiB", number("accumulators_mb", ".0f")),
               ("peak MiB, largest rank", number("peak_memory_mb", ".0f")),
               ("ms per update (spread)", lambda row: "" if row.get("update_ms") is None
                else f"{row['update_ms']:.0f} ({row['update_ms_spread']:.0f})"),
               ("update vs allreduce", number("update_over_allreduce", ".2f")),
               ("CPU per image vs allreduce", number("cpu_over_allreduce", ".2f")),
               ("largest M parameters within budget", number("largest_parameters_m", ".0f")),
               ("largest rank's state / even: whole variables",
                number("whole_variables_over_even", ".2f")),
               ("split variables", number("split_variables_over_even", ".4f"))]
    stem = os.path.join(out_dir, "sharded_study")
    harness.write_study(stem, [{key: row.get(key) for key in _COLUMNS}
                               for row in rows + budget_rows + balance_rows],
                        columns, title, conclusions(rows, budget_rows, balance_rows, budget_mb),
                        memory_budget_mb=budget_mb)
    figures.sharded_study(f"{stem}.png", rows, budget_mb, title)


def main(argv=None):
    parser = harness.study_parser("app.studies.sharded_optimizer_state", __doc__)
    parser.add_argument("--sizes", default="256,362",
                        help="synthetic images' sides (the MLP's first layer: 768 x side^2)")
    parser.add_argument("--processes", default="2,4", help="processes of the runs")
    parser.add_argument("--batch_size", type=int, default=8, help="images per process")
    parser.add_argument("--accumulation_steps", type=int, default=2,
                        help="batches per update (stage 2 shards their accumulated gradients)")
    parser.add_argument("--steps", type=int, default=4, help="updates of each run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each setting, the modes interleaved (medians reported)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="updates not timed")
    parser.add_argument("--balance_processes", default="2,4,8,64",
                        help="ranks the balance part deals the models' variables over")
    harness.add_budget_arguments(parser, "image sides", "256,362,443,512",
                                 "runs/sharded_study")
    args, train_args = parser.parse_known_args(argv)
    for name in ("sizes", "processes", "budget_sizes", "balance_processes"):
        setattr(args, name, harness.whole_numbers(parser, name, getattr(args, name)))
    for name in ("batch_size", "accumulation_steps", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be positive")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = measure(args, train_args)
    budget_rows = largest_within_budget(args, train_args) if args.memory_budget_mb else []
    balance_rows = balance(args.balance_processes)
    title = (f"mlp on synthetic images, Adam, {args.batch_size} images per process x "
             f"{args.accumulation_steps} batches per update, float32; {os.cpu_count()} cores")
    write_outputs(args.out_dir, rows, budget_rows, balance_rows, title, args.memory_budget_mb)


if __name__ == "__main__":
    main(sys.argv[1:])
