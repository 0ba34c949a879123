"""Lab 1 as a tool: the linear neuron y = w*x + b fitted with the MSE loss, from the same
start and with the same learning rate, by full-batch gradient descent, SGD (batch 1) and
minibatches, each until its epoch loss settles (--tolerance) or a limit.

    python -m app.studies.gradient_descent_study --flagfile=configs/gd_study.cfg

Writes to --out_dir: data.png, loss_curves.png, loss_surface.png, sgd_batch_loss.png,
summary.md, summary.csv and trajectories/METHOD.csv (w, b and the losses after every
update), then prints the table and what it shows.

The loop is Keras (the project's linear model, Keras' MSE and SGD) stepped by hand rather
than model.fit, because fit reports the running mean of an epoch's batch losses, and the
study needs each update's own batch loss and weights.
"""
import csv
import dataclasses
import os
import re
import time

from app.horovod import keras, tf  # first: it sets TF_XLA_FLAGS

import numpy as np
from absl import app, flags

import models
from app import flags as app_flags
from app.arithmetic import FlagError
from app.studies import harness
from input_pipeline import sources

FLAGS = flags.FLAGS
TRAJECTORY_COLUMNS = ("update", "epoch", "w", "b", "batch_loss", "full_loss")


def define_flags():
    """The study's flags (its own --seed and --learning_rate: the data's and shuffles' seed,
    and one unscaled LR for every method)."""
    flags.DEFINE_integer("num_examples", 1000, "Points (x, y) to generate.", lower_bound=2)
    flags.DEFINE_float("true_w", 2.0, "Slope w of the line the data come from.")
    flags.DEFINE_float("true_b", 1.0, "Intercept b of the line the data come from.")
    flags.DEFINE_float("noise", 0.5, "Standard deviation of the noise added to y.",
                       lower_bound=0.0)
    flags.DEFINE_integer("seed", 0, "Seed of the data and of every method's shuffles.")
    flags.DEFINE_float("initial_w", -2.0, "Where every method starts: w.")
    flags.DEFINE_float("initial_b", -2.0, "Where every method starts: b.")
    flags.DEFINE_float("learning_rate", 0.1, "The learning rate of every method (not scaled).",
                       lower_bound=0.0)
    flags.DEFINE_list("minibatch_sizes", ["16", "32", "64", "128"],
                      "Minibatch sizes trained besides full-batch GD and SGD (batch 1).")
    flags.DEFINE_float("tolerance", 1e-6,
                       "Convergence rule: stop when the full-data loss at an epoch's end "
                       "changed by less than this fraction of the previous epoch's.",
                       lower_bound=0.0)
    flags.DEFINE_integer("max_epochs", 500, "Limit: epochs per method.", lower_bound=1)
    flags.DEFINE_integer("max_updates", 20_000, "Limit: updates per method.", lower_bound=1)
    flags.DEFINE_string("out_dir", "runs/gd_study", "Where figures and tables go.")


def minibatch_sizes(values, num_examples):
    """--minibatch_sizes as whole numbers between 2 and num_examples - 1."""
    try:
        sizes = [int(value) for value in values]
    except ValueError:
        raise FlagError("minibatch_sizes", values, "must be whole numbers") from None
    if not all(1 < size < num_examples for size in sizes):
        raise FlagError("minibatch_sizes", values,
                        f"each must be between 2 and {num_examples - 1} (batch 1 and the full "
                        f"batch always run)")
    return sorted(set(sizes))


@dataclasses.dataclass
class Fit:
    """One method's run: `trajectory` has a row per update (row 0: the start) with the
    columns TRAJECTORY_COLUMNS; `epoch_losses` the full-data loss at each epoch's end."""
    method: str
    batch_size: int
    trajectory: np.ndarray
    epoch_losses: list
    converged: bool
    seconds: float

    @property
    def updates(self):
        return len(self.trajectory) - 1

    @property
    def final(self):
        return dict(zip(TRAJECTORY_COLUMNS, self.trajectory[-1]))


class MeanSquaredError:
    """The full-data MSE at any (w, b), from the data's moments: exact, and vectorized over
    arrays of w and b (every update of a run, or a whole grid) without touching the data."""

    def __init__(self, x, y):
        x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        self.xx, self.x, self.xy, self.y, self.yy = (
            np.mean(x * x), np.mean(x), np.mean(x * y), np.mean(y), np.mean(y * y))

    def __call__(self, w, b):
        w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
        return (w * w * self.xx + 2 * w * b * self.x + b * b - 2 * w * self.xy
                - 2 * b * self.y + self.yy)


def least_squares(x, y):
    """The closed-form minimizer (w, b) of the MSE."""
    design = np.column_stack([x.ravel(), np.ones(len(x))]).astype(np.float64)
    (w, b), *_ = np.linalg.lstsq(design, y.ravel().astype(np.float64), rcond=None)
    return float(w), float(b)


def method_name(batch_size, num_examples):
    if batch_size == num_examples:
        return "GD (full batch)"
    return "SGD (batch 1)" if batch_size == 1 else f"minibatch {batch_size}"


def train(batch_size, x, y, full_loss):
    """Trains a fresh neuron from (--initial_w, --initial_b) with minibatches of
    `batch_size` (the last of an epoch may be smaller), reshuffled every epoch with the same
    seeded order for every method, until the convergence rule or a limit."""
    model = models.build("linear", (1,), 1)
    kernel, bias = model.get_layer("neuron").weights
    kernel.assign([[FLAGS.initial_w]])
    bias.assign([FLAGS.initial_b])
    optimizer = keras.optimizers.SGD(FLAGS.learning_rate)
    mse = keras.losses.MeanSquaredError()

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32)] * 2)
    def step(features, targets):
        with tf.GradientTape() as tape:
            loss = mse(targets, model(features, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        return loss, kernel[0, 0], bias[0]

    step.get_concrete_function()  # traced before the clock starts
    order_rng = np.random.default_rng(FLAGS.seed)
    rows = [(0, 0, FLAGS.initial_w, FLAGS.initial_b, np.nan)]
    epoch_losses = [float(full_loss(FLAGS.initial_w, FLAGS.initial_b))]
    converged, started = False, time.perf_counter()
    for epoch in range(1, FLAGS.max_epochs + 1):
        order = order_rng.permutation(len(x))
        for first in range(0, len(x), batch_size):
            batch = order[first:first + batch_size]
            loss, w, b = step(x[batch], y[batch])
            rows.append((len(rows), epoch, float(w), float(b), float(loss)))
            if len(rows) > FLAGS.max_updates:
                break
        epoch_losses.append(float(full_loss(rows[-1][2], rows[-1][3])))
        previous, current = epoch_losses[-2:]
        if abs(previous - current) <= FLAGS.tolerance * previous:
            converged = True
            break
        if len(rows) > FLAGS.max_updates:
            break
    seconds = time.perf_counter() - started
    trajectory = np.array(rows, dtype=np.float64)
    trajectory = np.column_stack([trajectory, full_loss(trajectory[:, 2], trajectory[:, 3])])
    return Fit(method_name(batch_size, len(x)), batch_size, trajectory, epoch_losses,
               converged, seconds)


def summary_rows(fits, solution, full_loss):
    """The table: per method, updates and epochs to stop, final (w, b) against the
    least-squares solution, losses and wall time."""
    w_star, b_star = solution
    rows = []
    for fit in fits:
        final = fit.final
        rows.append({
            "method": fit.method, "batch_size": fit.batch_size, "converged": fit.converged,
            "updates": fit.updates, "epochs": int(final["epoch"]),
            "w": final["w"], "b": final["b"], "w_error": abs(final["w"] - w_star),
            "b_error": abs(final["b"] - b_star), "final_loss": final["full_loss"],
            "excess_loss": final["full_loss"] - float(full_loss(w_star, b_star)),
            "seconds": fit.seconds, "updates_per_sec": fit.updates / fit.seconds,
            "trajectory": trajectory_file(fit.method),
        })
    return rows


def conclusions(rows, solution):
    """What the measured table shows, in sentences built from its numbers."""
    def named(row):
        return f"{row['method']}"
    converged = [row for row in rows if row["converged"]]
    limited = [row for row in rows if not row["converged"]]
    lines = [f"Least-squares solution: w = {solution[0]:.4f}, b = {solution[1]:.4f}."]
    if converged:
        fewest_updates = min(converged, key=lambda row: row["updates"])
        fewest_epochs = min(converged, key=lambda row: row["epochs"])
        fastest = min(converged, key=lambda row: row["seconds"])
        lines += [
            f"Met the convergence rule: {', '.join(named(row) for row in converged)}.",
            f"Fewest updates to converge: {named(fewest_updates)} "
            f"({fewest_updates['updates']} updates).",
            f"Fewest epochs (passes over the data) to converge: {named(fewest_epochs)} "
            f"({fewest_epochs['epochs']} epochs).",
            f"Shortest wall time to converge: {named(fastest)} ({fastest['seconds']:.2f} s).",
        ]
    if limited:
        lines.append(f"Stopped by the limit, the epoch loss still moving by more than the "
                     f"tolerance: {', '.join(named(row) for row in limited)}.")
    closest = min(rows, key=lambda row: row["excess_loss"])
    farthest = max(rows, key=lambda row: row["excess_loss"])
    lines.append(f"Closest to the least-squares loss: {named(closest)} (excess "
                 f"{closest['excess_loss']:.2e}); farthest: {named(farthest)} "
                 f"(excess {farthest['excess_loss']:.2e}).")
    quickest = max(rows, key=lambda row: row["updates_per_sec"])
    slowest = min(rows, key=lambda row: row["updates_per_sec"])
    lines.append(f"Updates per second: from {slowest['updates_per_sec']:.0f} "
                 f"({named(slowest)}) to {quickest['updates_per_sec']:.0f} "
                 f"({named(quickest)}).")
    return lines


def write_tables(out_dir, fits, rows):
    os.makedirs(os.path.join(out_dir, "trajectories"), exist_ok=True)
    for fit in fits:
        with open(os.path.join(out_dir, trajectory_file(fit.method)), "w",
                  newline="") as table:
            writer = csv.writer(table)
            writer.writerow(TRAJECTORY_COLUMNS)
            writer.writerows(fit.trajectory.tolist())

    def shown(key, spec=""):
        return lambda row: format(row[key], spec)
    columns = [("method", shown("method")), ("batch", shown("batch_size")),
               ("converged", lambda row: "yes" if row["converged"] else "no"),
               ("updates", shown("updates")), ("epochs", shown("epochs")),
               ("w", shown("w", ".4f")), ("b", shown("b", ".4f")),
               ("|w - w*|", shown("w_error", ".2e")), ("|b - b*|", shown("b_error", ".2e")),
               ("loss", shown("final_loss", ".5f")), ("excess loss", shown("excess_loss", ".2e")),
               ("seconds", shown("seconds", ".2f")),
               ("updates/s", shown("updates_per_sec", ".0f"))]
    return harness.write_table(os.path.join(out_dir, "summary"), rows, list(rows[0]), columns)


def trajectory_file(method):
    """Where a method's trajectory goes, under --out_dir: "GD (full batch)" ->
    trajectories/gd_full_batch.csv."""
    return os.path.join("trajectories", re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")
                        + ".csv")


def main(_):
    x, y = sources.linear_arrays(FLAGS.num_examples, FLAGS.true_w, FLAGS.true_b, FLAGS.noise,
                                 FLAGS.seed)
    batch_sizes = [FLAGS.num_examples, 1, *minibatch_sizes(
        FLAGS.minibatch_sizes, FLAGS.num_examples)]
    full_loss = MeanSquaredError(x, y)
    solution = least_squares(x, y)
    fits = [train(batch_size, x, y, full_loss) for batch_size in batch_sizes]
    rows = summary_rows(fits, solution, full_loss)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    markdown = write_tables(FLAGS.out_dir, fits, rows)

    from app.studies import figures  # matplotlib only once there is something to draw
    figures.data(os.path.join(FLAGS.out_dir, "data.png"), x, y,
                     (FLAGS.true_w, FLAGS.true_b), solution)
    figures.loss_curves(os.path.join(FLAGS.out_dir, "loss_curves.png"), fits,
                            float(full_loss(*solution)))
    figures.loss_surface(os.path.join(FLAGS.out_dir, "loss_surface.png"), fits,
                             full_loss, solution)
    figures.batch_against_full_loss(os.path.join(FLAGS.out_dir, "sgd_batch_loss.png"),
                                        next(fit for fit in fits if fit.batch_size == 1))
    print(markdown)
    print("\n".join(conclusions(rows, solution)))
    print(f"wrote {FLAGS.out_dir}/: data.png, loss_curves.png, loss_surface.png, "
          f"sgd_batch_loss.png, summary.md, summary.csv, trajectories/")


def run():
    define_flags()
    app.run(main, flags_parser=app_flags.parser(lambda argv: minibatch_sizes(
        FLAGS.minibatch_sizes, FLAGS.num_examples)))


if __name__ == "__main__":
    run()
