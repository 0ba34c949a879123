"""Issue 42's question measured: at large global batches, does K-FAC or Shampoo reach a
stated validation score in fewer steps and less time than momentum SGD, LARS and LAMB? Each
optimizer is tuned over the same small grid of learning rates, given the same epoch budget
and run with several seeds, on N processes:

    python -m app.studies.higher_order_study --flagfile=configs/fashion_mnist_cnn.cfg \\
        --global_batches=1024,4096 --target=0.85 --epochs=10 --seeds=1,2

Every run is an app.train through app.launch (other arguments go to every run, K-FAC's and
Shampoo's own, --kfac_*, --shampoo_* and --base_optimizer, to theirs only) that stops
at --target on the experiment's headline metric (validation accuracy; a segmentation's
IoU). Each optimizer's LR is given at --reference_batch_size and scaled to the global batch
by its usual rule (linear for momentum, K-FAC and Shampoo, whose base is momentum SGD;
square root for LARS and LAMB), then multiplied by each factor of --lr_grid; all of them
warm up for --warmup_epochs. Its best LR at a batch is the one whose seeds reach the target
in the fewest median steps (or, where none does, end with the best median score).

Writes to --out_dir: each run's folder; higher_order.md/.csv/.json (per optimizer and
batch: the best LR, how many seeds reached the target, the median steps, epochs and seconds
to it with their range, the seconds per step, and the optimizer state per rank);
higher_order_runs.csv (every run); and time_to_target.png (the best LRs' curves).
"""
import csv
import math
import os
import statistics

from app import arithmetic, cli
from app.studies import harness

# Each optimizer's flags, its LR at --reference_batch_size and how it scales with the batch
OPTIMIZERS = {
    "momentum": (["--optimizer=momentum", "--momentum=0.9"], 0.1, "linear"),
    "lars": (["--optimizer=lars", "--momentum=0.9"], 1.0, "sqrt"),
    "lamb": (["--optimizer=lamb", "--momentum=0"], 0.004, "sqrt"),
    "kfac": (["--optimizer=kfac", "--momentum=0.9"], 0.1, "linear"),
    # a quarter of momentum's: at 0.1 (0.4 at batch 1024) the Fashion-MNIST CNN diverged
    "shampoo": (["--optimizer=shampoo", "--momentum=0.9"], 0.025, "linear"),
}
COLUMNS = ("optimizer", "global_batch", "learning_rate", "reached", "diverged", "seeds",
           "median_steps", "steps_range", "median_epochs", "median_seconds",
           "seconds_range", "median_score", "seconds_per_step", "state_elements_per_rank")


def given_learning_rate(optimizer, factor):
    """The --learning_rate of `optimizer`'s runs at `factor` of the grid (as its flag says)."""
    return float(f"{OPTIMIZERS[optimizer][1] * factor:g}")


def run_flags(optimizer, global_batch, factor, seed, args):
    flags, _, scaling = OPTIMIZERS[optimizer]
    return [*flags, f"--global_batch_size={global_batch}",
            f"--learning_rate={given_learning_rate(optimizer, factor):g}",
            f"--lr_scaling={scaling}",
            f"--reference_batch_size={args.reference_batch_size}",
            f"--warmup_epochs={args.warmup_epochs}", f"--epochs={args.epochs}",
            f"--target_accuracy={args.target}", f"--seed={seed}"]


def measure(run_dir, optimizer, global_batch, factor, seed, args, train_args):
    """One run to the target, the epoch budget or its divergence: its row, with its curve."""
    results = harness.run_app_train(
        run_dir, ["-np", str(args.processes)],
        [*harness.arguments_for(optimizer, train_args),
         *run_flags(optimizer, global_batch, factor, seed, args)],
        divergence_ok=True)
    if results is None:
        return {"global_batch": global_batch, "diverged": True, "reached": False,
                "learning_rate": arithmetic.scaled_learning_rate(
                    given_learning_rate(optimizer, factor), global_batch,
                    args.reference_batch_size, OPTIMIZERS[optimizer][2]),
                "epochs": None, "steps": None, "seconds": None, "score": None,
                "seconds_per_step": None, "state_elements_per_rank": None, "curve": []}
    metric = results["headline_metric"]
    if results.get("headline_lower_is_better"):  # its best LR would be the worst
        cli.fail(f"{metric} is an error, lower is better: app.studies.topology_study compares "
                 f"optimizers on it")
    with open(os.path.join(run_dir, "training_log.csv")) as log:
        epochs = list(csv.DictReader(log))
    reached = results["target_reached"]
    return {
        "global_batch": results["global_batch_size"],
        "learning_rate": results["learning_rate"],
        "diverged": False,
        "reached": reached is not None,
        "epochs": reached["epoch"] if reached else None,
        "steps": reached["epoch"] * results["steps_per_epoch"] if reached else None,
        "seconds": reached["wall_seconds"] if reached else None,
        "score": float(epochs[-1][metric]),
        # images/s summed over the ranks, each step a global batch
        "seconds_per_step": results["global_batch_size"] / results["images_per_sec"],
        "state_elements_per_rank": max(results["optimizer_state_elements_by_rank"]),
        "curve": [(float(row["wall_seconds"]), float(row[metric])) for row in epochs],
    }


def best_setting(runs):
    """Of one optimizer's runs at one batch (grouped by LR), the LR's summary row whose seeds
    reach the target in the fewest median steps, or end with the best median score (a
    diverged run scores below any other; an LR all of whose seeds diverged, below all)."""
    summaries = []
    for learning_rate in sorted({run["learning_rate"] for run in runs}):
        seeds = [run for run in runs if run["learning_rate"] == learning_rate]
        reached = [run for run in seeds if run["reached"]]
        finished = [run for run in seeds if not run["diverged"]]
        median_score = statistics.median(_score(run) for run in seeds)
        summaries.append({
            "learning_rate": learning_rate, "reached": len(reached),
            "diverged": len(seeds) - len(finished), "seeds": len(seeds),
            **_median_and_range(reached, "steps"), **_median_and_range(reached, "seconds"),
            "median_epochs": (statistics.median(run["epochs"] for run in reached)
                              if reached else None),
            "median_score": None if median_score == -math.inf else median_score,
            "seconds_per_step": (statistics.median(run["seconds_per_step"] for run in finished)
                                 if finished else None),
            "state_elements_per_rank": (finished[0]["state_elements_per_rank"] if finished
                                        else None),
            "curve": max(seeds, key=_score)["curve"]})
    return min(summaries, key=lambda row: (-row["reached"], row["median_steps"] or 0,
                                           -_score({"score": row["median_score"]})))


def _score(run):
    """A run's final score, -inf where there is none (it diverged)."""
    return -math.inf if run["score"] is None else run["score"]


def _median_and_range(runs, key):
    values = [run[key] for run in runs]
    if not values:
        return {f"median_{key}": None, f"{key}_range": ""}
    return {f"median_{key}": statistics.median(values),
            f"{key}_range": f"{min(values):.4g}-{max(values):.4g}"}


def main(argv=None):
    parser = harness.study_parser("app.studies.higher_order_study", __doc__)
    parser.add_argument("-np", "--processes", type=int, default=2,
                        help="processes of every run")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated, of " + ", ".join(OPTIMIZERS))
    parser.add_argument("--global_batches", default="1024,4096",
                        help="comma-separated global batch sizes")
    parser.add_argument("--lr_grid", default="0.5,1,2",
                        help="factors of each optimizer's scaled LR tried")
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds of every setting")
    parser.add_argument("--target", type=float, default=0.85,
                        help="the validation score each run stops at (headline metric)")
    parser.add_argument("--epochs", type=int, default=10, help="epoch budget of every run")
    parser.add_argument("--warmup_epochs", type=int, default=2, help="LR warmup of every run")
    parser.add_argument("--reference_batch_size", type=int, default=256,
                        help="the batch the optimizers' LRs are given at")
    parser.add_argument("--out_dir", default="runs/higher_order_study",
                        help="where the runs, the tables and the figure go")
    args, train_args = parser.parse_known_args(argv)
    optimizers = harness.known_names(parser, "optimizers", args.optimizers, OPTIMIZERS)
    batches = harness.whole_numbers(parser, "global_batches", args.global_batches)
    seeds = harness.whole_numbers(parser, "seeds", args.seeds)
    try:
        factors = [float(value) for value in args.lr_grid.split(",")]
    except ValueError:
        parser.error(f"--lr_grid={args.lr_grid}: must be numbers, comma-separated")
    if min(factors) <= 0 or min(args.epochs, args.processes) < 1 or not 0 < args.target <= 1:
        parser.error("--lr_grid, --epochs and -np must be positive, --target in (0, 1]")

    os.makedirs(args.out_dir, exist_ok=True)
    every_run, rows, curves = [], [], {}
    for batch in batches:
        for optimizer in optimizers:
            runs = []
            for factor in factors:
                for seed in seeds:
                    name = f"{optimizer}-{batch}bs-{factor:g}x-seed{seed}"
                    runs.append({"run": name, "optimizer": optimizer, **measure(
                        os.path.join(args.out_dir, name), optimizer, batch, factor, seed, args,
                        train_args)})
            every_run += runs
            best = best_setting(runs)
            rows.append({"optimizer": optimizer, "global_batch": batch, **best})
            curves[f"{optimizer} {batch} lr {best['learning_rate']:.3g}"] = best.pop("curve")

    with open(os.path.join(args.out_dir, "higher_order_runs.csv"), "w", newline="") as table:
        writer = csv.DictWriter(table, [key for key in every_run[0] if key != "curve"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(every_run)
    title = (f"{' '.join(train_args) or 'the default experiment'}: {args.processes} "
             f"processes, {os.cpu_count()} cores, target {args.target:g}, "
             f"{args.epochs} epochs at most, seeds {args.seeds}, LR x {args.lr_grid}")

    harness.write_study(os.path.join(args.out_dir, "higher_order"), rows,
                        harness.plain_columns(COLUMNS), title,
                        notes=["Steps and seconds to the target: medians over the seeds that "
                               "reached it, at each optimizer's best LR of the grid."])
    from app.studies import figures  # matplotlib only once there is something to draw
    figures.accuracy_against_time(os.path.join(args.out_dir, "time_to_target.png"), curves,
                                  title, target=args.target)
    print(f"wrote {args.out_dir}/time_to_target.png and higher_order_runs.csv")


if __name__ == "__main__":
    main()
