"""What the batch size does to a real model: the digits CNN at batch sizes from 8 to 512,
first for a fixed number of steps (images/s), then each trained until --target_accuracy or
--time_budget (time to accuracy), every run an `app.train` through app.launch.

    python -m app.studies.batch_size_study --flagfile=configs/digits_cnn.cfg

Writes to --out_dir: throughput.png (images/s against batch size), accuracy.png
(validation accuracy against training time), batch_study.md and batch_study.csv; prints
the table and what it shows. Other arguments go to every run (app.train flags); the
learning rate follows the experiment's scaling rule (--lr_scaling) at each batch size.
"""
import csv
import os

from app.studies import harness

COLUMNS = ("batch_size", "learning_rate", "images_per_sec", "reached", "epochs_to_target",
           "steps_to_target", "seconds_to_target", "best_val_accuracy", "seconds_trained")


def measure(out_dir, batch_size, args, train_args):
    """The throughput run and the time-to-accuracy run of one batch size, as one row."""
    launch = ["-np", str(args.processes)]
    speed = harness.run_app_train(
        os.path.join(out_dir, f"throughput-b{batch_size}"), launch,
        [*train_args, f"--batch_size={batch_size}", "--benchmark", "--epochs=1",
         f"--steps_per_epoch={args.steps}", "--warmup_epochs=0", "--lr_schedule=constant"])
    run_dir = os.path.join(out_dir, f"accuracy-b{batch_size}")
    trained = harness.run_app_train(
        run_dir, launch,
        [*train_args, f"--batch_size={batch_size}", f"--epochs={args.max_epochs}",
         "--lr_schedule=constant", f"--target_accuracy={args.target_accuracy}",
         f"--time_budget={args.time_budget}"])
    with open(os.path.join(run_dir, "training_log.csv")) as log:
        epochs = list(csv.DictReader(log))
    reached = next((row for row in epochs
                    if float(row["val_accuracy"]) >= args.target_accuracy), None)
    return {
        "batch_size": batch_size,
        "learning_rate": trained["learning_rate"],
        "images_per_sec": speed["images_per_sec"],
        "reached": reached is not None,
        "epochs_to_target": int(reached["epoch"]) + 1 if reached else None,
        "steps_to_target": (int(reached["epoch"]) + 1) * trained["steps_per_epoch"]
        if reached else None,
        "seconds_to_target": float(reached["wall_seconds"]) if reached else None,
        "best_val_accuracy": max(float(row["val_accuracy"]) for row in epochs),
        "seconds_trained": float(epochs[-1]["wall_seconds"]),
        "curve": [(float(row["wall_seconds"]), float(row["val_accuracy"])) for row in epochs],
    }


def conclusions(rows, target):
    """What the measured table shows, in sentences built from its numbers."""
    smallest, largest = rows[0], rows[-1]
    fastest = max(rows, key=lambda row: row["images_per_sec"])
    gain = fastest["images_per_sec"] / smallest["images_per_sec"]
    lines = [f"Throughput: {fastest['images_per_sec']:.0f} images/s at batch "
             f"{fastest['batch_size']}, {gain:.1f}x batch {smallest['batch_size']}'s "
             f"{smallest['images_per_sec']:.0f}; batch {largest['batch_size']} gives "
             f"{largest['images_per_sec']:.0f}."]
    reached = [row for row in rows if row["reached"]]
    missed = [row for row in rows if not row["reached"]]
    if reached:
        quickest = min(reached, key=lambda row: row["seconds_to_target"])
        fewest_epochs = min(reached, key=lambda row: row["epochs_to_target"])
        lines += [
            f"Time to {target:.1%} validation accuracy: shortest at batch "
            f"{quickest['batch_size']} ({quickest['seconds_to_target']:.1f} s, "
            f"{quickest['epochs_to_target']} epochs).",
            f"Fewest epochs to {target:.1%}: batch {fewest_epochs['batch_size']} "
            f"({fewest_epochs['epochs_to_target']}); fewest steps: batch "
            f"{min(reached, key=lambda row: row['steps_to_target'])['batch_size']}.",
        ]
        if quickest["batch_size"] != fastest["batch_size"]:
            lines.append(f"The highest throughput (batch {fastest['batch_size']}) is not the "
                         f"shortest time to accuracy (batch {quickest['batch_size']}): larger "
                         f"batches make fewer updates per epoch.")
    for row in missed:
        lines.append(f"Batch {row['batch_size']} did not reach {target:.1%} in "
                     f"{row['seconds_trained']:.0f} s (best {row['best_val_accuracy']:.1%}).")
    return lines


def write_outputs(out_dir, rows, title, target):
    headers = ["batch", "LR", "images/s", "reached", "epochs to target", "steps to target",
               "seconds to target", "best val accuracy", "seconds trained"]
    markdown = harness.write_table(
        os.path.join(out_dir, "batch_study"), rows, COLUMNS,
        [(header, lambda row, c=c: _cell(row[c])) for header, c in zip(headers, COLUMNS)],
        title)

    from app.studies import figures  # matplotlib only once there is something to draw
    figures.throughput_bars(os.path.join(out_dir, "throughput.png"), rows, title)
    figures.accuracy_against_time(
        os.path.join(out_dir, "accuracy.png"),
        {f"batch {row['batch_size']}": row["curve"] for row in rows}, title, target)
    return markdown


def _cell(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if value < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def main(argv=None):
    parser = harness.study_parser("app.studies.batch_size_study", __doc__)
    parser.add_argument("--batch_sizes", default="8,16,32,64,128,256,512",
                        help="per-process batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=100,
                        help="training steps of each throughput run")
    parser.add_argument("--target_accuracy", type=float, default=0.97,
                        help="validation accuracy each accuracy run trains to")
    parser.add_argument("--time_budget", type=float, default=60.0,
                        help="seconds of training per batch size at most")
    parser.add_argument("--max_epochs", type=int, default=1000,
                        help="epochs per batch size at most")
    parser.add_argument("-np", "--processes", type=int, default=1,
                        help="processes of every run")
    parser.add_argument("--out_dir", default="runs/batch_study",
                        help="where the runs, the table and the figures go")
    args, train_args = parser.parse_known_args(argv)
    try:
        batch_sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch_sizes={args.batch_sizes}: must be whole numbers")
    if batch_sizes[0] < 1 or args.steps < 1 or args.time_budget <= 0:
        parser.error("--batch_sizes, --steps and --time_budget must be positive")
    if not 0 < args.target_accuracy <= 1:
        parser.error(f"--target_accuracy={args.target_accuracy}: must be in (0, 1]")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [measure(args.out_dir, size, args, train_args) for size in batch_sizes]
    title = (f"{' '.join(train_args) or 'digits_cnn'}: {args.processes} process(es), "
             f"{os.cpu_count()} cores, target {args.target_accuracy:.1%} within "
             f"{args.time_budget:g} s")
    print(write_outputs(args.out_dir, rows, title, args.target_accuracy))
    print("\n".join(conclusions(rows, args.target_accuracy)))
    print(f"wrote {args.out_dir}/batch_study.md, batch_study.csv, throughput.png, accuracy.png")


if __name__ == "__main__":
    main()
