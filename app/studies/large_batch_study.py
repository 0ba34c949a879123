"""Lab 3 as a measurement: the remedies for large-batch training, each run on N processes for
the same time budget on the bundled digits (or any experiment: other arguments go to every
run), then compared by validation accuracy against wall time.

    python -m app.studies.large_batch_study --flagfile=configs/digits_cnn.cfg

The runs: the small-batch baseline (plain SGD); + momentum; the large batch with the LR
scaled to it, without and with warmup; the large batch with NovoGrad, LAMB and LARS. Each is
an app.train through app.launch with --time_budget. Writes to --out_dir one CSV per run
(wall_seconds, epoch, val_accuracy; named like 2ranks-512bs-0.8lr-0.9m-5w-lars.csv),
accuracy.png (validation accuracy against wall time), scale_study.md and scale_study.csv,
then prints the table and, for each claim of the course, whether it reproduced here (by the
final accuracy: the mean over the last FINAL_EPOCHS epochs). When the warmup claim does not,
the study tries the large-batch pair again at half the LR.
"""
import argparse
import csv
import os

from app.studies import harness

FINAL_EPOCHS = 5
TABLE = ("run", "optimizer", "global_batch", "learning_rate", "momentum", "warmup_epochs",
         "epochs", "final_val_accuracy", "best_val_accuracy", "seconds", "csv")


def runs(args):
    """(name, app.train flags) of every run. SGD's LR is given at the small global batch and
    scaled linearly to each run's; the layer-wise optimizers' LRs are given at the large
    batch, where their papers tune them, and used as they are."""
    small, large = f"--batch_size={args.small_batch}", f"--batch_size={args.large_batch}"
    lr = [f"--reference_batch_size={args.small_batch * args.processes}", "--lr_scaling=linear"]
    layerwise = ["--lr_scaling=none"]
    sgd = ["--optimizer=momentum", "--momentum=0.9", f"--learning_rate={args.learning_rate}"]
    warmup = f"--warmup_epochs={args.warmup_epochs}"
    return {
        "baseline": [small, *lr, "--optimizer=sgd", f"--learning_rate={args.learning_rate}",
                     "--momentum=0", "--warmup_epochs=0"],
        "momentum": [small, *lr, *sgd, "--warmup_epochs=0"],
        "large_lr": [large, *lr, *sgd, "--warmup_epochs=0"],
        "large_lr_warmup": [large, *lr, *sgd, warmup],
        "novograd": [large, *layerwise, "--optimizer=novograd", "--momentum=0",
                     f"--learning_rate={args.novograd_lr}", warmup],
        "lamb": [large, *layerwise, "--optimizer=lamb", "--momentum=0",
                 f"--learning_rate={args.lamb_lr}", warmup],
        "lars": [large, *layerwise, "--optimizer=lars", "--momentum=0.9",
                 f"--learning_rate={args.lars_lr}", warmup],
    }


def measure(out_dir, name, flags, args, train_args):
    """One run to the time budget; its row, its curve, and its CSV written."""
    run_dir = os.path.join(out_dir, name)
    results = harness.run_app_train(
        run_dir, ["-np", str(args.processes)],
        [*train_args, *flags, f"--epochs={args.max_epochs}", "--lr_schedule=constant",
         f"--time_budget={args.time_budget}"])
    with open(os.path.join(run_dir, "training_log.csv")) as log:
        epochs = list(csv.DictReader(log))
    with open(os.path.join(run_dir, "flags.cfg")) as resolved:
        used = dict(line.strip()[2:].split("=", 1) for line in resolved if "=" in line)
    warmup, momentum = int(used.get("warmup_epochs", 0)), float(used.get("momentum", 0))
    momentum = momentum if used["optimizer"] in ("momentum", "lars") else 0.0
    csv_name = (f"{results['world_size']}ranks-{results['global_batch_size']}bs-"
                f"{results['learning_rate']:g}lr-{momentum:g}m-{warmup}w"
                + ("" if used["optimizer"] in ("sgd", "momentum") else f"-{used['optimizer']}")
                + ".csv")
    with open(os.path.join(out_dir, csv_name), "w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(("wall_seconds", "epoch", "val_accuracy"))
        writer.writerows((row["wall_seconds"], row["epoch"], row["val_accuracy"])
                         for row in epochs)
    accuracies = [float(row["val_accuracy"]) for row in epochs]
    return {
        "run": name, "optimizer": used["optimizer"],
        "global_batch": results["global_batch_size"],
        "learning_rate": results["learning_rate"], "momentum": momentum,
        "warmup_epochs": warmup, "epochs": len(epochs),
        "final_val_accuracy": sum(accuracies[-FINAL_EPOCHS:]) / len(accuracies[-FINAL_EPOCHS:]),
        "best_val_accuracy": max(accuracies),
        "seconds": float(epochs[-1]["wall_seconds"]), "csv": csv_name,
        "curve": [(float(row["wall_seconds"]), float(row["val_accuracy"])) for row in epochs],
    }


def better(row, other):
    """Whether `row` ended more accurate than `other` (final accuracy, by over 0.5 points)."""
    return row["final_val_accuracy"] > other["final_val_accuracy"] + 0.005


def findings(rows):
    """Each claim of the course checked against the measured rows, in the same time budget."""
    by_run = {row["run"]: row for row in rows}
    lines = []

    def compare(claim, winner, loser):
        if winner in by_run and loser in by_run:
            first, second = by_run[winner], by_run[loser]
            lines.append(f"{claim}: {winner} {first['final_val_accuracy']:.1%} against "
                         f"{loser} {second['final_val_accuracy']:.1%} (final validation "
                         f"accuracy, {second['seconds']:.0f} s): "
                         f"{'reproduced' if better(first, second) else 'NOT reproduced here'}.")

    compare("Momentum helps the small-batch baseline", "momentum", "baseline")
    compare("Warmup makes the large, linearly scaled LR train", "large_lr_warmup", "large_lr")
    compare("Warmup makes half that LR train", "large_lr_warmup_half", "large_lr_half")
    sgd_runs = [name for name in ("large_lr_warmup", "large_lr_warmup_half") if name in by_run]
    if sgd_runs:  # against the best momentum SGD run at the large batch
        best_sgd = max(sgd_runs, key=lambda name: by_run[name]["final_val_accuracy"])
        for optimizer, shown in (("novograd", "NovoGrad"), ("lamb", "LAMB"), ("lars", "LARS")):
            compare(f"{shown} beats the best momentum SGD at the large batch", optimizer,
                    best_sgd)
    return lines


def warmup_reproduced(rows):
    by_run = {row["run"]: row for row in rows}
    if "large_lr" not in by_run or "large_lr_warmup" not in by_run:
        return True
    return better(by_run["large_lr_warmup"], by_run["large_lr"])


def write_outputs(out_dir, rows, title):
    markdown = harness.write_table(
        os.path.join(out_dir, "scale_study"), rows, TABLE,
        [(c, lambda row, c=c: f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]))
         for c in TABLE], title)
    from app.studies import figures  # matplotlib only once there is something to draw
    figures.accuracy_against_time(os.path.join(out_dir, "accuracy.png"),
                                      {row["run"]: row["curve"] for row in rows}, title)
    return markdown


def main(argv=None):
    parser = harness.study_parser("app.studies.large_batch_study", __doc__)
    parser.add_argument("-np", "--processes", type=int, default=2,
                        help="processes of every run")
    parser.add_argument("--time_budget", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--small_batch", type=int, default=16, help="per process")
    parser.add_argument("--large_batch", type=int, default=256, help="per process")
    parser.add_argument("--learning_rate", type=float, default=0.05,
                        help="SGD's LR at the small global batch (scaled linearly)")
    parser.add_argument("--warmup_epochs", type=int, default=5,
                        help="LR warmup of the runs with warmup")
    parser.add_argument("--novograd_lr", type=float, default=0.05, help="at the large batch")
    parser.add_argument("--lamb_lr", type=float, default=0.01, help="at the large batch")
    parser.add_argument("--lars_lr", type=float, default=2.0, help="at the large batch")
    parser.add_argument("--max_epochs", type=int, default=10_000,
                        help="epochs per run at most (the time budget ends it first)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated subset of the runs (None: all)")
    parser.add_argument("--out_dir", default="runs/scale_study",
                        help="where the runs, the table and the figure go")
    args, train_args = parser.parse_known_args(argv)
    planned = runs(args)
    chosen = harness.known_names(parser, "runs", args.runs, planned) if args.runs else list(
        planned)
    if args.time_budget <= 0 or min(args.processes, args.small_batch, args.large_batch) < 1:
        parser.error("--time_budget, -np and the batch sizes must be positive")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [measure(args.out_dir, name, planned[name], args, train_args) for name in chosen]
    if not warmup_reproduced(rows):  # look for a setting where it does: half the LR
        halved = argparse.Namespace(**{**vars(args), "learning_rate": args.learning_rate / 2})
        for name in ("large_lr", "large_lr_warmup"):
            rows.append(measure(args.out_dir, f"{name}_half", runs(halved)[name], args,
                                train_args))
    title = (f"{' '.join(train_args) or 'digits_cnn'}: {args.processes} processes, "
             f"{os.cpu_count()} cores, {args.time_budget:g} s per run")
    print(write_outputs(args.out_dir, rows, title))
    print("\n".join(findings(rows)))
    print(f"wrote {args.out_dir}/: one CSV per run, accuracy.png, scale_study.md, "
          f"scale_study.csv")


if __name__ == "__main__":
    main()
