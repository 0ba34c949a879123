"""The studies' figures (matplotlib, PNG, no screen needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402

_MAX_POINTS = 4000  # per drawn line: more is invisible and slow


def _thinned(values):
    """Every k-th row, so that a line has at most _MAX_POINTS points (the last one kept)."""
    step = max(1, len(values) // _MAX_POINTS)
    return np.concatenate([values[::step], values[-1:]])


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def data(path, x, y, truth, solution):
    """The generated points, the line they come from and the least-squares line."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(x, y, s=6, alpha=0.4, label=f"data ({len(x)} points)")
    line = np.array([x.min(), x.max()])
    axes.plot(line, truth[0] * line + truth[1], "k--",
              label=f"true line: y = {truth[0]:g}x + {truth[1]:g}")
    axes.plot(line, solution[0] * line + solution[1], "tab:red",
              label=f"least squares: y = {solution[0]:.3f}x + {solution[1]:.3f}")
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    axes.legend()
    _save(figure, path)


def loss_curves(path, fits, minimum):
    """Full-data loss above its minimum (the least-squares loss), against updates and against
    epochs, log-log, one line per method: the floor each method's noise leaves is visible."""
    figure, (by_update, by_epoch) = plt.subplots(1, 2, figsize=(12, 4.5))
    for fit in fits:
        points = _thinned(fit.trajectory)
        by_update.plot(points[:, 0] + 1, points[:, 5] - minimum, label=fit.method)
        by_epoch.plot(np.arange(len(fit.epoch_losses)) + 1,
                      np.array(fit.epoch_losses) - minimum, marker=".", label=fit.method)
    by_update.set_xlabel("updates + 1")
    by_epoch.set_xlabel("epochs + 1")
    for axes in (by_update, by_epoch):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_ylabel("MSE on all the data - least-squares MSE")
        axes.legend(fontsize=8)
    _save(figure, path)


def loss_surface(path, fits, full_loss, solution):
    """Contours of the MSE over a (w, b) grid holding every trajectory, each drawn on it."""
    all_w = np.concatenate([fit.trajectory[:, 2] for fit in fits] + [[solution[0]]])
    all_b = np.concatenate([fit.trajectory[:, 3] for fit in fits] + [[solution[1]]])
    margin_w, margin_b = 0.1 * np.ptp(all_w) + 0.1, 0.1 * np.ptp(all_b) + 0.1
    w_grid, b_grid = np.meshgrid(
        np.linspace(all_w.min() - margin_w, all_w.max() + margin_w, 200),
        np.linspace(all_b.min() - margin_b, all_b.max() + margin_b, 200))
    figure, axes = plt.subplots(figsize=(7.5, 6))
    surface = full_loss(w_grid, b_grid)
    contours = axes.contour(w_grid, b_grid, surface,
                            levels=np.geomspace(surface.min() * 1.01, surface.max(), 15),
                            cmap="viridis")
    axes.clabel(contours, fontsize=7, fmt="%.2g")
    for fit in sorted(fits, key=lambda fit: fit.batch_size):  # the noisiest drawn first
        points = _thinned(fit.trajectory)
        axes.plot(points[:, 2], points[:, 3], linewidth=1, alpha=0.8,
                  label=f"{fit.method} ({fit.updates} updates)")
    axes.plot(*fits[0].trajectory[0, 2:4], "ko", label="start")
    axes.plot(*solution, "r*", markersize=14, label="least squares")
    axes.set_xlabel("w")
    axes.set_ylabel("b")
    axes.legend(fontsize=8)
    _save(figure, path)


def batch_against_full_loss(path, fit, max_updates=500):
    """SGD's loss on each update's own batch beside the loss on all the data, over the
    first `max_updates` updates: the noise of the gradient estimate made visible."""
    rows = fit.trajectory[1:max_updates + 1]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.plot(rows[:, 0], rows[:, 4], ".", markersize=2, alpha=0.4,
              label=f"{fit.method}: loss on its batch")
    axes.plot(rows[:, 0], rows[:, 5], "k", linewidth=1.5, label="loss on all the data")
    axes.set_yscale("log")
    axes.set_xlabel("update")
    axes.set_ylabel("MSE")
    axes.legend()
    _save(figure, path)


def throughput_bars(path, rows, title):
    """Training images/s against batch size, one bar each."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    labels = [str(row["batch_size"]) for row in rows]
    bars = axes.bar(labels, [row["images_per_sec"] for row in rows], color="tab:blue")
    axes.bar_label(bars, fmt="%.0f", fontsize=8)
    axes.set_xlabel("batch size per process")
    axes.set_ylabel("training images/s")
    axes.set_title(title, fontsize=9)
    _save(figure, path)


def accuracy_against_time(path, curves, title, target=None):
    """Validation accuracy after each epoch against training time, one line per run
    (`curves`: label -> [(seconds, accuracy)]), with the target the runs stopped at."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        seconds, accuracy = zip(*curve)
        axes.plot(seconds, accuracy, marker=".", label=label)
    if target is not None:
        axes.axhline(target, color="k", linestyle="--", linewidth=1,
                     label=f"target {target:.1%}")
    axes.set_xscale("log")
    axes.set_xlabel("training seconds (log scale)")
    axes.set_ylabel("validation accuracy")
    lowest = min(accuracy for curve in curves.values() for _, accuracy in curve)
    axes.set_ylim(max(0.0, lowest - 0.02), 1.0)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    _save(figure, path)


def runs_side_by_side(path, runs):
    """app.studies.plot_runs's figure: loss, accuracy and learning rate against epochs, one
    colour per run (training solid, validation dashed); `runs` as plot_runs.read_run returns
    them."""
    figure, (loss, accuracy, learning_rate) = plt.subplots(1, 3, figsize=(16, 4.5))
    for index, run in enumerate(runs):
        colour, epochs = f"C{index % 10}", run["epochs"]
        for axes, metric in ((loss, "loss"), (accuracy, "accuracy")):
            for prefix, style, phase in (("", "-", "training"), ("val_", "--", "validation")):
                values = epochs.get(prefix + metric)
                if values and None not in values:
                    axes.plot(epochs["epoch"], values, style, color=colour,
                              label=f"{run['name']} ({phase})")
        learning_rate.plot(*run["lr"], color=colour, label=run["name"])
    for axes, title in ((loss, "loss"), (accuracy, "accuracy"),
                        (learning_rate, "learning rate (as applied)")):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    _save(figure, path)


def pipeline_study(path, bubble_rows, memory_rows, budget_mb, title):
    """Left: speedup over one process against microbatches, measured and GPipe's theory, one
    colour per number of stages. Right: each memory run's peak memory per rank, with the
    budget."""
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for number, stages in enumerate(sorted({row["stages"] for row in bubble_rows[1:]})):
        rows = [row for row in bubble_rows if row["stages"] == stages]
        microbatches = [row["microbatches"] for row in rows]
        colour = f"C{number}"
        speed.plot(microbatches, [row["speedup"] for row in rows], "o-", color=colour,
                   label=f"S={stages}, measured"
                   + (" (more stages than cores)" if rows[0]["oversubscribed"] else ""))
        speed.plot(microbatches, [row["theory_speedup"] for row in rows], "--", color=colour,
                   label=f"S={stages}, theory S·M/(M+S-1)")
    speed.axhline(1.0, color="k", linewidth=0.8)
    speed.set_xscale("log", base=2)
    speed.set_xlabel("microbatches per step (M)")
    speed.set_ylabel("images/s over one process's")
    speed.legend(fontsize=8)
    labels = [row["run"] for row in memory_rows]
    bars = memory.bar(labels, [row["peak_memory_mb"] for row in memory_rows], color="tab:blue")
    memory.bar_label(bars, fontsize=8, labels=[
        f"{row['peak_memory_mb']:.0f}" + {True: ", trained within budget",
                                          False: ", failed within budget"}.get(
            row.get("trained_within_budget"), "") for row in memory_rows])
    if budget_mb:
        memory.axhline(budget_mb, color="tab:red", linestyle="--",
                       label=f"budget: {budget_mb} MiB of data segment per process")
        memory.legend(fontsize=8)
    memory.set_ylabel("peak resident MiB, largest rank")
    memory.set_ylim(0, 1.15 * max(row["peak_memory_mb"] for row in memory_rows))
    figure.suptitle(title, fontsize=9)
    _save(figure, path)


def spatial_study(path, rows, budget_mb, title):
    """Left: each mode's peak memory per rank against the volume's side, with the budget.
    Right: its throughput in voxels/s."""
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for number, mode in enumerate(dict.fromkeys(row["mode"] for row in rows)):
        own = [row for row in rows if row["mode"] == mode]
        sizes = [row["size"] for row in own]
        style = dict(color=f"C{number}", marker="o",
                     label=mode + (" (more processes than cores)" if own[0]["oversubscribed"]
                                   else ""))
        memory.plot(sizes, [row["peak_memory_mb"] for row in own], **style)
        speed.plot(sizes, [row["voxels_per_sec"] / 1e6 for row in own], **style)
    if budget_mb:
        memory.axhline(budget_mb, color="tab:red", linestyle="--",
                       label=f"budget: {budget_mb} MiB of data segment per process")
    memory.set_ylabel("peak resident MiB, largest rank")
    speed.set_ylabel("million voxels trained per second")
    for axes in (memory, speed):
        axes.set_xlabel("volume side (voxels)")
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    _save(figure, path)


def sharded_study(path, rows, budget_mb, title):
    """Left: each mode's optimizer state and peak memory per rank against the processes, at
    the largest model. Right: its time per update over the allreduce's."""
    largest = max(row["parameters_m"] for row in rows)
    own_size = [row for row in rows if row["parameters_m"] == largest]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for number, mode in enumerate(dict.fromkeys(row["mode"] for row in own_size)):
        own = [row for row in own_size if row["mode"] == mode]
        processes = [row["processes"] for row in own]
        memory.plot(processes, [row["peak_memory_mb"] for row in own], color=f"C{number}",
                    marker="o", label=f"{mode}: peak")
        memory.plot(processes, [row["optimizer_state_mb"] for row in own], color=f"C{number}",
                    marker="s", linestyle=":", label=f"{mode}: optimizer state")
        speed.plot(processes, [row["update_over_allreduce"] for row in own],
                   color=f"C{number}", marker="o", label=mode)
    if budget_mb:
        memory.axhline(budget_mb, color="tab:red", linestyle="--",
                       label=f"budget: {budget_mb} MiB of data segment per process")
    memory.set_ylabel(f"MiB per rank (largest rank), {largest:.0f}M parameters")
    speed.set_ylabel("time per update / allreduce's")
    for axes in (memory, speed):
        axes.set_xlabel("processes")
        axes.set_xticks(sorted({row["processes"] for row in rows}))
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    _save(figure, path)
