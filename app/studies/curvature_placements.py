"""K-FAC's placements of its curvature work measured (KAISA's trade of memory against
communication, issue 42): for each number of gradient workers (--grad_workers, each
dividing -np), K-FAC on -np processes beside its base optimizer and Shampoo: the time per
step, the optimizer state and peak memory of the largest rank, and the bytes rank 0
reduced per step by kind (the gradients, the running factors, the decompositions, the
preconditioned gradients), read from Horovod's timeline.

    python -m app.studies.curvature_placements -np 4 --grad_workers=4,2,1 \\
        --flagfile=configs/digits_cnn.cfg --model=resnet20 --dataset=synthetic \\
        --image_size=32 --batch_size=32 --threads_per_process=1

Every run is `app.train --benchmark --timeline` for --steps steps (ms per step from the
benchmark's steps after --warmup_steps), --repeats times with the configurations
interleaved (medians reported, with the spread). Bytes are each collective's tensor as
rank 0 gave it (a ring allreduce sends about twice that over its links), summed over the
run and divided by its steps: the factor and decomposition updates, every
--kfac_factor_steps and --kfac_inverse_steps, are spread over the steps between them. Only
rank 0 writes the timeline: with fewer gradient workers than ranks, it counts its own
column's decompositions and its own row's gradients, as every rank's own share.

Writes curvature_placements.md, .csv and .json to --out_dir; other arguments go to every
run, K-FAC's and Shampoo's own flags (--kfac_*, --shampoo_*, --base_optimizer) to their
runs only.
"""
import os
import statistics

from app.studies import harness

# A tensor's kind by a part of its name: app.curvature's and app.kfac's collectives; every
# other allreduce of a step is the gradients' (Horovod's DistributedOptimizer's)
KINDS = {"factor": "curvature_average", "decomposition": "curvature_decompositions",
         "preconditioned": "kfac_preconditioned"}
COLUMNS = ("configuration", "ms_per_step", "ms_range", "state_elements_per_rank",
           "peak_memory_mb", "gradient_mb_per_step", "factor_mb_per_step",
           "decomposition_mb_per_step", "preconditioned_mb_per_step", "total_mb_per_step")
MB = 2 ** 20


def configurations(args):
    """{name: (optimizer, flags)} of the runs: the base optimizer, K-FAC at each number of
    gradient workers, Shampoo."""
    found = {"base optimizer": (None, [])}
    for workers in args.grad_workers:
        label = ("all" if workers == args.processes else "1" if workers == 1
                 else f"{workers}") + " gradient workers"
        found[f"K-FAC, {label}"] = ("kfac", ["--optimizer=kfac",
                                             f"--kfac_grad_workers={workers}"])
    found["Shampoo"] = ("shampoo", ["--optimizer=shampoo"])
    return found


def measure(run_dir, optimizer, flags, args, train_args):
    """One benchmark run's figures: ms per step, memory, bytes per step by kind."""
    results = harness.run_app_train(
        run_dir, ["-np", str(args.processes)],
        [*harness.arguments_for(optimizer, train_args), *flags, "--benchmark", "--timeline",
         "--epochs=1", "--warmup_epochs=0", f"--steps_per_epoch={args.steps}",
         f"--warmup_steps={args.warmup_steps}"])
    sent = [item for item in harness.timeline_collectives(os.path.join(run_dir, "timeline.json"))
            if item.collective == "ALLREDUCE"]
    by_kind = harness.bytes_by_kind(sent, KINDS)
    steps = results["steps_per_epoch"] * results["epochs_completed"]
    return {"ms_per_step": 1000 * results["global_batch_size"] / results["images_per_sec"],
            "state_elements_per_rank": max(results["optimizer_state_elements_by_rank"]),
            "peak_memory_mb": max(results["peak_memory_mb_by_rank"]),
            "gradient_mb_per_step": by_kind.get("other", 0) / steps / MB,
            **{f"{kind}_mb_per_step": by_kind.get(kind, 0) / steps / MB for kind in KINDS},
            "total_mb_per_step": sum(by_kind.values()) / steps / MB}


def summarized(name, runs):
    """The row of one configuration's repeats: the medians, the time's spread."""
    times = [run["ms_per_step"] for run in runs]
    return {"configuration": name, **{key: statistics.median(run[key] for run in runs)
                                      for key in runs[0]},
            "ms_range": f"{min(times):.4g}-{max(times):.4g}"}


def main(argv=None):
    parser = harness.study_parser("app.studies.curvature_placements", __doc__)
    parser.add_argument("-np", "--processes", type=int, default=4,
                        help="processes of every run")
    parser.add_argument("--grad_workers", default="4,2,1",
                        help="comma-separated numbers of K-FAC's gradient workers, each "
                             "dividing -np")
    parser.add_argument("--steps", type=int, default=23, help="steps of every run")
    parser.add_argument("--warmup_steps", type=int, default=3,
                        help="first steps left out of the time")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds, the configurations interleaved in each")
    parser.add_argument("--out_dir", default="runs/curvature_placements",
                        help="where the runs and the table go")
    args, train_args = parser.parse_known_args(argv)
    args.grad_workers = harness.whole_numbers(parser, "grad_workers", args.grad_workers)
    if args.processes < 1 or any(args.processes % workers for workers in args.grad_workers):
        parser.error(f"--grad_workers={','.join(map(str, args.grad_workers))}: each must "
                     f"divide -np {args.processes}")
    if not 0 <= args.warmup_steps < args.steps or args.repeats < 1:
        parser.error("--warmup_steps must be below --steps, --repeats at least 1")

    found = configurations(args)
    runs = {name: [] for name in found}
    for repeat in range(args.repeats):
        for number, (name, (optimizer, flags)) in enumerate(found.items()):
            runs[name].append(measure(os.path.join(args.out_dir, f"r{repeat}-c{number}"),
                                      optimizer, flags, args, train_args))
    rows = [summarized(name, measured) for name, measured in runs.items()]
    title = (f"{' '.join(train_args) or 'the default experiment'}: {args.processes} "
             f"processes, {os.cpu_count()} cores, {args.steps} steps, {args.repeats} rounds")

    harness.write_study(os.path.join(args.out_dir, "curvature_placements"), rows,
                        harness.plain_columns(COLUMNS), title,
                        notes=["MB per step: the tensors rank 0 gave its allreduces, summed "
                               "over the run and divided by its steps (Horovod's timeline)."])


if __name__ == "__main__":
    main()
