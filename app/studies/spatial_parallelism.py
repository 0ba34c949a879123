"""Spatial parallelism measured: for a 3D U-Net at growing volume sizes, each rank's peak
memory and the throughput of one process, --recompute, data parallelism and the volume split
into P slabs (--spatial_parts, with and without --recompute); the halo bytes per step
against the arithmetic per step; and, under a per-process memory budget, the largest volume
each mode trains.

    python -m app.studies.spatial_parallelism --out_dir=runs/spatial_study

Every run is `app.train --benchmark` on generated surveys of the size (--volume_size and
--patch_size alike), one volume per step per group of ranks (data parallelism: one per
process, so two processes train two volumes a step). Memory is results.json's
peak_memory_mb_by_rank (TensorFlow's runtime included); throughput its voxels/s and CPU
milliseconds per volume summed over the ranks, which oversubscribed cores cannot inflate
(P=4 on this machine's 2 cores shares them: the table says so). The halo bytes are counted
from the model (app.parallel.spatial.halo_bytes), the FLOPs by TensorFlow's profiler (3x the
forward's for a training step); the exchange's measured cost is the spatial runs' CPU time
per voxel over one process's.

With --memory_budget_mb, each mode is run again on each size under that limit of every
process's data segment (RLIMIT_DATA), from the smallest size up until one fails: the
table's last part is the largest volume each mode trained within the budget.

Writes spatial_study.md, .csv and .json and spatial_study.png to --out_dir; other
arguments go to every run.
"""
import os
import sys

from app.parallel import spatial  # first: app.horovod sets TF_XLA_FLAGS
from app.studies import figures, harness

import models

SURVEYS = ["--experiment=seismic_faults_cpu", "--epochs=1", "--warmup_epochs=0",
           "--lr_schedule=constant", "--num_volumes=4"]


def modes(parts):
    """(name, processes, flags) of each mode, for slabs of each P in `parts`."""
    found = [("one process", 1, ["--global_batch_size=1"]),
             ("recompute", 1, ["--global_batch_size=1", "--recompute"]),
             ("data parallel", 2, ["--global_batch_size=2"])]
    for count in parts:
        spatial = [f"--spatial_parts={count}", "--global_batch_size=1"]
        found.append((f"spatial P={count}", count, spatial))
        found.append((f"spatial P={count} + recompute", count, [*spatial, "--recompute"]))
    return found


def _size_flags(args, size):
    return [*SURVEYS, f"--model={args.model}", f"--volume_size={size}", f"--patch_size={size}",
            f"--steps_per_epoch={args.steps}", f"--warmup_steps={args.warmup_steps}"]


def measure(args, train_args):
    """A row per (size, mode): throughput, memory, halo bytes and FLOPs per step."""
    rows = []
    for size in args.sizes:
        flops = 3 * _forward_flops(args.model, size)
        for name, processes, flags in modes(args.parts):
            results = harness.run_benchmark(
                os.path.join(args.out_dir, f"{size}-{name.replace(' ', '-')}"), processes,
                [*_size_flags(args, size), *flags, *train_args], [])
            parts = int(next((flag.split("=")[1] for flag in flags
                              if flag.startswith("--spatial_parts=")), 1))
            volumes = 2 if name == "data parallel" else 1
            halo = _halo_bytes(args.model, size, parts, "--recompute" in flags)
            rows.append({
                "part": "throughput", "size": size, "mode": name, "processes": processes,
                "spatial_parts": parts, "voxels_per_sec": results["voxels_per_sec"],
                "cpu_ms_per_volume": results["cpu_ms_per_image"],
                "peak_memory_mb": max(results["peak_memory_mb_by_rank"]),
                "peak_memory_mb_by_rank": results["peak_memory_mb_by_rank"],
                "halo_mb_per_step": halo / 2 ** 20, "gflop_per_step": volumes * flops / 1e9,
                "halo_bytes_per_kflop": halo / (volumes * flops / 1e3),
                "oversubscribed": processes > os.cpu_count()})
    for row in rows:
        reference = next(other for other in rows if other["size"] == row["size"]
                         and other["mode"] == "one process")
        row["cpu_per_voxel_over_one_process"] = (
            row["cpu_ms_per_volume"] / reference["cpu_ms_per_volume"])
    return rows


def largest_within_budget(args, train_args):
    """A row per mode: the largest of --budget_sizes it trained under the budget."""
    rows = []
    for name, processes, flags in modes(args.parts):
        largest = None
        for size in args.budget_sizes:
            model_dir = os.path.join(args.out_dir, f"budget-{size}-{name.replace(' ', '-')}")
            if not harness.trains_within(model_dir, ["-np", str(processes)], [
                    *_size_flags(args, size), *flags, "--steps_per_epoch=1",
                    "--warmup_steps=0", "--benchmark", *train_args], args.memory_budget_mb):
                break
            largest = size
        rows.append({"part": "budget", "mode": name, "processes": processes,
                     "largest_size_within_budget": largest})
    return rows


def _forward_flops(model, size):
    return models.forward_flops(models.build(model, (size,) * 3 + (1,), 1), (size,) * 3 + (1,))


def _halo_bytes(model, size, parts, recompute):
    if parts == 1:
        return 0
    built = models.build(model, (size,) * 3 + (1,), 1, recompute=recompute)
    return spatial.halo_bytes(built, parts, batch=1, bytes_per_value=4)


def conclusions(rows, budget_rows, budget_mb):
    lines = []
    for row in rows:
        if row["spatial_parts"] > 1:
            lines.append(
                f"{row['size']}^3, {row['mode']}: {row['halo_mb_per_step']:.2f} MiB of halos "
                f"per step against {row['gflop_per_step']:.1f} GFLOP "
                f"({row['halo_bytes_per_kflop']:.3f} bytes per kFLOP); CPU time per voxel "
                f"{row['cpu_per_voxel_over_one_process']:.2f}x one process's"
                + (" (more processes than cores)" if row["oversubscribed"] else ""))
    for row in budget_rows:
        largest = row["largest_size_within_budget"]
        lines.append(f"under {budget_mb} MiB per process, {row['mode']}: "
                     + (f"{largest}^3 trained" if largest else "no size trained"))
    return lines


_COLUMNS = ("part", "size", "mode", "processes", "spatial_parts", "voxels_per_sec",
            "cpu_ms_per_volume", "cpu_per_voxel_over_one_process", "peak_memory_mb",
            "peak_memory_mb_by_rank", "halo_mb_per_step", "gflop_per_step",
            "halo_bytes_per_kflop", "oversubscribed", "largest_size_within_budget")


def write_outputs(out_dir, rows, budget_rows, title, budget_mb):
    def number(key, form):
        return lambda row: "" if row.get(key) is None else format(row[key], form)
    columns = [("part", lambda row: row["part"]), ("size", number("size", "d")),
               ("mode", lambda row: row["mode"]), ("processes", number("processes", "d")),
               ("Mvoxels/s", lambda row: "" if row.get("voxels_per_sec") is None
                else f"{row['voxels_per_sec'] / 1e6:.2f}"),
               ("CPU per voxel vs one process", number("cpu_per_voxel_over_one_process",
                                                       ".2f")),
               ("peak MiB per rank", number("peak_memory_mb", ".0f")),
               ("halo MiB per step", number("halo_mb_per_step", ".2f")),
               ("GFLOP per step", number("gflop_per_step", ".1f")),
               ("largest within budget", number("largest_size_within_budget", "d"))]
    stem = os.path.join(out_dir, "spatial_study")
    harness.write_study(stem, [{key: row.get(key) for key in _COLUMNS}
                               for row in rows + budget_rows],
                        columns, title, conclusions(rows, budget_rows, budget_mb),
                        memory_budget_mb=budget_mb)
    figures.spatial_study(f"{stem}.png", rows, budget_mb, title)


def main(argv=None):
    parser = harness.study_parser("app.studies.spatial_parallelism", __doc__)
    parser.add_argument("--model", default="unet3d_small", help="a 3D U-Net")
    parser.add_argument("--sizes", default="32,48,64", help="volume sides of the runs")
    parser.add_argument("--parts", default="2,4", help="slabs of the spatial runs")
    parser.add_argument("--steps", type=int, default=4, help="steps of each run")
    parser.add_argument("--warmup_steps", type=int, default=1, help="steps not timed")
    harness.add_budget_arguments(parser, "volume sides", "32,64,96,128", "runs/spatial_study")
    args, train_args = parser.parse_known_args(argv)
    for name in ("sizes", "parts", "budget_sizes"):
        setattr(args, name, harness.whole_numbers(parser, name, getattr(args, name)))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = measure(args, train_args)
    budget_rows = largest_within_budget(args, train_args) if args.memory_budget_mb else []
    title = (f"{args.model}, one volume per step and group, float32; "
             f"{os.cpu_count()} cores")
    write_outputs(args.out_dir, rows, budget_rows, title, args.memory_budget_mb)


if __name__ == "__main__":
    main(sys.argv[1:])
