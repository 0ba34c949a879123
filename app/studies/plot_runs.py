"""Loss, accuracy and learning-rate curves of several app.train runs side by side.

    python -m app.studies.plot_runs runs/small_batch runs/large_batch [--out comparison.png]

Reads what each run leaves in its MODEL_DIR: training_log.csv (loss and accuracy per epoch,
training solid, validation dashed) and, for the learning rate, TensorBoard's per-step
`learning_rate` (warmup and schedule as applied), or the CSV's per-epoch `lr` when the run
wrote no TensorBoard summaries. The x axis is epochs for all three.
"""
import csv
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from app import cli
from app.studies import figures


class RunError(ValueError):
    """A RUN_DIR that holds no app.train log."""


def read_run(model_dir):
    """{"name", "epochs": {column: [values]}, "lr": (epochs, values)} of one run."""
    log_path = os.path.join(model_dir, "training_log.csv")
    if not os.path.isfile(log_path):
        raise RunError(f"{model_dir}: no training_log.csv (not an app.train MODEL_DIR)")
    with open(log_path) as log:
        rows = list(csv.DictReader(log))
    if not rows:
        raise RunError(f"{log_path}: no epoch logged yet")
    epochs = {column: [float(row[column]) if row.get(column) else None for row in rows]
              for column in rows[0]}
    epochs["epoch"] = [value + 1 for value in epochs["epoch"]]  # a row is an epoch's end
    return {"name": os.path.basename(os.path.normpath(model_dir)), "epochs": epochs,
            "lr": _learning_rate(model_dir, epochs)}


def _learning_rate(model_dir, epochs):
    """The per-step LR from TensorBoard's events, in epochs, or else the CSV's per epoch."""
    steps_per_epoch = _steps_per_epoch(model_dir)
    rates = per_step_learning_rate(model_dir) if steps_per_epoch else {}
    if rates:
        return tuple(zip(*sorted((step / steps_per_epoch, rate) for step, rate in rates.items())))
    return epochs["epoch"], epochs.get("lr") or [None] * len(epochs["epoch"])


def per_step_learning_rate(model_dir):
    """{training step: the LR it ran with} of every step the run logged to TensorBoard (every
    --summary_steps), {} for a run without those events."""
    events = os.path.join(model_dir, "tensorboard", "train")
    if not os.path.isdir(events):
        return {}
    accumulator = event_accumulator.EventAccumulator(
        events, size_guidance={event_accumulator.TENSORS: 0})  # 0: keep every step
    accumulator.Reload()
    if "learning_rate" not in accumulator.Tags()["tensors"]:
        return {}
    return {event.step: float(tensor_util.make_ndarray(event.tensor_proto))
            for event in accumulator.Tensors("learning_rate")}


def _steps_per_epoch(model_dir):
    try:
        with open(os.path.join(model_dir, "results.json")) as results:
            return json.load(results).get("steps_per_epoch")
    except FileNotFoundError:
        return None


def main(argv=None):
    parser = cli.argument_parser("app.studies.plot_runs", __doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="MODEL_DIR of an app.train run")
    parser.add_argument("--out", default="comparison.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(model_dir) for model_dir in args.run_dirs]
    except RunError as error:
        sys.exit(cli.error_line(error))
    figures.runs_side_by_side(args.out, runs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
