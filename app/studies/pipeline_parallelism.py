"""Pipeline parallelism measured: throughput against the number of microbatches (GPipe's
bubble against its theory), and each rank's peak memory in data-parallel, pipelined and
recomputing runs of a deep model, against a per-process memory budget.

    python -m app.studies.pipeline_parallelism --out_dir=runs/pipeline_study

Bubble: `app.train --benchmark` on synthetic images, one process (the reference), then S
stages on S processes with M microbatches, at the same global batch. With equal stages and
nothing else in the way, S stages run S x M / (M + S - 1) times one process's images/s: of
the M + S - 1 slots of a step, each stage idles S - 1 (the bubble, (S-1)/(M+S-1)). Stages on
more processes than cores share the cores, so that the idle ones give theirs to the busy
ones: the study says when it measured so.

Memory: the same deep model at the same global batch on --memory_processes processes, data
parallel (every rank the whole model, its optimizer state and its share of the batch's
activations), in stages in GPipe's order (each rank its stage's, and the activations of
every microbatch through its stage), in 1F1B's (those of at most S - s microbatches on stage
s), and in 1F1B with --recompute (each microbatch's stage input only, until its backward
pass); each rank's peak resident memory (results.json's
peak_memory_mb_by_rank: TensorFlow's runtime included). With --memory_budget_mb, every
run's ranks run under that limit of their data segment (RLIMIT_DATA, where glibc's heap
and TensorFlow's allocations count), so that a run that needs more fails: the table says
which trained.

Writes pipeline_study.md, .csv and .json and pipeline_study.png to --out_dir; other
arguments go to every run.
"""
import os
import sys

from app.studies import figures, harness

SYNTHETIC = ["--dataset=synthetic", "--epochs=1", "--warmup_epochs=0",
             "--lr_schedule=constant", "--learning_rate=0.01", "--optimizer=momentum"]


def bubble(stages, microbatches):
    """GPipe's idle share of a step: (S-1) / (M+S-1)."""
    return (stages - 1) / (microbatches + stages - 1)


def run(out_dir, name, processes, train_args):
    """One app.train --benchmark run on `processes` processes; its results."""
    return harness.run_app_train(os.path.join(out_dir, name), ["-np", str(processes)],
                                 [*train_args, "--benchmark"])


def measure_bubble(args, train_args):
    """One process, then each S x M; rows with the measured and the theoretical speedup."""
    common = [*SYNTHETIC, f"--model={args.model}", f"--image_size={args.image_size}",
              f"--global_batch_size={args.global_batch}", f"--steps_per_epoch={args.steps}",
              f"--warmup_steps={args.warmup_steps}", *train_args]
    reference = run(args.out_dir, "one-process", 1, common)
    rows = [_bubble_row(1, 1, reference, reference)]
    for stages in args.stages:
        for microbatches in args.microbatches:
            results = run(args.out_dir, f"stages{stages}-microbatches{microbatches}", stages,
                          [*common, f"--pipeline_stages={stages}",
                           f"--microbatches={microbatches}"])
            rows.append(_bubble_row(stages, microbatches, results, reference))
    return rows


def _bubble_row(stages, microbatches, results, reference):
    speedup = results["images_per_sec"] / reference["images_per_sec"]
    ideal = stages * (1 - bubble(stages, microbatches))
    return {"part": "bubble", "run": f"S={stages} M={microbatches}", "stages": stages,
            "microbatches": microbatches, "processes": stages,
            "images_per_sec": results["images_per_sec"],
            "cpu_ms_per_image": results["cpu_ms_per_image"],
            "speedup": speedup, "theory_speedup": ideal,
            "bubble_theory": bubble(stages, microbatches),
            "of_theory": speedup / ideal,
            "oversubscribed": stages > os.cpu_count()}


def measure_memory(args, train_args):
    """Data-parallel, pipelined and recomputing runs of --memory_model: peak memory per rank;
    with a budget, whether each trained under it."""
    processes = args.memory_processes
    common = [*SYNTHETIC, f"--model={args.memory_model}", f"--image_size={args.image_size}",
              f"--global_batch_size={args.memory_global_batch}", "--steps_per_epoch=3",
              "--warmup_steps=1", *train_args]
    staged = [f"--pipeline_stages={processes}", f"--microbatches={args.memory_microbatches}"]
    runs = [("data parallel", []),
            (f"{processes} stages, GPipe", [*staged, "--pipeline_schedule=gpipe"]),
            (f"{processes} stages, 1F1B", [*staged, "--pipeline_schedule=1f1b"]),
            (f"{processes} stages, 1F1B, recompute", [*staged, "--pipeline_schedule=1f1b",
                                                      "--recompute"])]
    rows = []
    for label, flags in runs:
        name = "memory-" + label.replace(" ", "-").replace(",", "").lower()
        measured = run(args.out_dir, name, processes, [*common, *flags])
        row = {"part": "memory", "run": label, "processes": processes,
               "images_per_sec": measured["images_per_sec"],
               "peak_memory_mb": max(measured["peak_memory_mb_by_rank"]),
               "peak_memory_mb_by_rank": measured["peak_memory_mb_by_rank"]}
        if args.memory_budget_mb:
            row["trained_within_budget"] = harness.trains_within(
                os.path.join(args.out_dir, name + "-budget"), ["-np", str(processes)],
                [*common, *flags, "--benchmark"], args.memory_budget_mb)
        rows.append(row)
    return rows


def conclusions(bubble_rows, memory_rows, budget_mb):
    lines = []
    for row in bubble_rows[1:]:
        lines.append(f"{row['run']}: {row['speedup']:.2f}x one process, theory "
                     f"{row['theory_speedup']:.2f}x (bubble {row['bubble_theory']:.0%}): "
                     f"{row['of_theory']:.0%} of it"
                     + (" (more stages than cores: they share them)"
                        if row["oversubscribed"] else ""))
    for row in memory_rows:
        within = row.get("trained_within_budget")
        lines.append(f"{row['run']}: peak {row['peak_memory_mb']:.0f} MiB per rank (largest)"
                     + ("" if within is None else
                        f"; under {budget_mb} MiB: {'trained' if within else 'failed'}"))
    return lines


def write_outputs(out_dir, bubble_rows, memory_rows, title, budget_mb):
    rows = bubble_rows + memory_rows
    columns = [("part", lambda r: r["part"]), ("run", lambda r: r["run"]),
               ("images/s", lambda r: f"{r['images_per_sec']:.1f}"),
               ("speedup (theory)", lambda r: f"{r['speedup']:.2f} ({r['theory_speedup']:.2f})"
                if r.get("speedup") is not None else ""),
               ("peak MiB per rank", lambda r: f"{r['peak_memory_mb']:.0f}"
                if r.get("peak_memory_mb") is not None else ""),
               ("within budget", lambda r: {True: "yes", False: "no"}.get(
                   r.get("trained_within_budget"), ""))]
    stem = os.path.join(out_dir, "pipeline_study")
    harness.write_study(stem, [{key: row.get(key) for key in _COLUMNS} for row in rows],
                        columns, title, conclusions(bubble_rows, memory_rows, budget_mb),
                        memory_budget_mb=budget_mb)
    figures.pipeline_study(f"{stem}.png", bubble_rows, memory_rows, budget_mb, title)


_COLUMNS = ("part", "run", "stages", "microbatches", "processes", "images_per_sec",
            "cpu_ms_per_image", "speedup", "theory_speedup", "bubble_theory", "of_theory",
            "oversubscribed", "peak_memory_mb", "peak_memory_mb_by_rank",
            "trained_within_budget")


def main(argv=None):
    parser = harness.study_parser("app.studies.pipeline_parallelism", __doc__)
    parser.add_argument("--model", default="resnet20", help="the bubble runs' model")
    parser.add_argument("--image_size", type=int, default=32, help="synthetic images' side")
    parser.add_argument("--global_batch", type=int, default=64, help="the bubble runs' batch")
    parser.add_argument("--stages", default="2,4", help="stages of the bubble runs")
    parser.add_argument("--microbatches", default="1,2,4,8", help="microbatches per step")
    parser.add_argument("--steps", type=int, default=12, help="steps of each bubble run")
    parser.add_argument("--warmup_steps", type=int, default=4, help="steps not timed")
    parser.add_argument("--memory_model", default="resnet56", help="the memory runs' model")
    parser.add_argument("--memory_global_batch", type=int, default=128,
                        help="the memory runs' global batch")
    parser.add_argument("--memory_microbatches", type=int, default=4,
                        help="microbatches of the memory runs in stages")
    parser.add_argument("--memory_processes", type=int, default=2,
                        help="processes of each memory run (and its stages)")
    parser.add_argument("--memory_budget_mb", type=int, default=None,
                        help="per-process memory limit (MiB) to train the memory runs under")
    parser.add_argument("--out_dir", default="runs/pipeline_study",
                        help="where the runs, the table and the figure go")
    args, train_args = parser.parse_known_args(argv)
    args.stages = harness.whole_numbers(parser, "stages", args.stages)
    args.microbatches = harness.whole_numbers(parser, "microbatches", args.microbatches)
    os.makedirs(args.out_dir, exist_ok=True)
    bubble_rows = measure_bubble(args, train_args)
    memory_rows = measure_memory(args, train_args)
    title = (f"{args.model} {args.image_size}x{args.image_size}, global batch "
             f"{args.global_batch}; memory: {args.memory_model}, global batch "
             f"{args.memory_global_batch}; {os.cpu_count()} cores")
    write_outputs(args.out_dir, bubble_rows, memory_rows, title, args.memory_budget_mb)


if __name__ == "__main__":
    main(sys.argv[1:])
