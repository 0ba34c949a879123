"""app.studies.gradient_descent_study: GD reaches the least-squares solution without its loss
ever rising, the figures are PNG images, and the table and conclusions hold the run's own
numbers."""

import numpy as np
import pytest
from matplotlib import image

from conftest import PYTHON, error_lines, run, run_study
from input_pipeline.sources import linear_arrays

DATA = dict(num_examples=200, true_w=2.0, true_b=1.0, noise=0.5, seed=3)
FIGURES = ("data.png", "loss_curves.png", "loss_surface.png", "sgd_batch_loss.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gd_study")
    stdout, rows = run_study(out_dir, "app.studies.gradient_descent_study", "summary.csv",
                             "--flagfile=configs/gd_study.cfg",
                             *[f"--{name}={value}" for name, value in DATA.items()],
                             "--minibatch_sizes=16,64", "--tolerance=1e-9",
                             "--max_updates=3000")
    return out_dir, {row["method"]: row for row in rows}, stdout


def trajectory(out_dir, row):
    return np.loadtxt(out_dir / row["trajectory"], delimiter=",", skiprows=1)


def data_mse(w, b):
    x, y = linear_arrays(**{k: DATA[k] for k in ("num_examples", "noise", "seed")},
                         weight=DATA["true_w"], bias=DATA["true_b"])
    return float(np.mean((w * x.astype(np.float64) + b - y.astype(np.float64)) ** 2))


def test_gradient_descent_ends_at_the_least_squares_solution(study):
    _, rows, _ = study
    x, y = linear_arrays(**{k: DATA[k] for k in ("num_examples", "noise", "seed")},
                         weight=DATA["true_w"], bias=DATA["true_b"])
    w_star, b_star = np.polyfit(x.ravel().astype(np.float64), y.ravel(), 1)
    gd = rows["GD (full batch)"]
    assert gd["converged"] == "True"
    assert float(gd["w"]) == pytest.approx(w_star, abs=1e-3)
    assert float(gd["b"]) == pytest.approx(b_star, abs=1e-3)


def test_gradient_descents_loss_never_rises(study):
    out_dir, rows, _ = study
    assert rows["GD (full batch)"]["trajectory"] == "trajectories/gd_full_batch.csv"
    losses = trajectory(out_dir, rows["GD (full batch)"])[:, 5]
    assert len(losses) > 10
    assert np.all(np.diff(losses) <= 1e-9 * losses[:-1])


def test_sgd_batch_losses_scatter_around_the_full_data_loss(study):
    out_dir, rows, _ = study
    updates = trajectory(out_dir, rows["SGD (batch 1)"])
    batch, full = updates[1:, 4], updates[1:, 5]
    assert np.std(batch - full) > 0.1 * np.mean(full)  # single-example losses are noisy


def test_every_figure_is_a_png_image(study):
    out_dir, _, _ = study
    for name in FIGURES:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width, _ = image.imread(out_dir / name).shape
        assert height > 200 and width > 200, name


def test_the_table_and_conclusions_hold_the_runs_numbers(study):
    out_dir, rows, stdout = study
    assert set(rows) == {"GD (full batch)", "SGD (batch 1)", "minibatch 16", "minibatch 64"}
    markdown = (out_dir / "summary.md").read_text()
    for method, row in rows.items():
        path = trajectory(out_dir, row)
        last = path[-1]
        assert int(row["updates"]) == len(path) - 1 == int(last[0])
        assert int(row["epochs"]) == int(last[1])
        assert float(row["w"]) == last[2] and float(row["b"]) == last[3]
        assert float(row["final_loss"]) == pytest.approx(data_mse(last[2], last[3]), rel=1e-9)
        assert f"| {method} | {row['batch_size']} |" in markdown
        assert f"| {float(row['w']):.4f} | {float(row['b']):.4f} |" in markdown
    converged = {method: row for method, row in rows.items() if row["converged"] == "True"}
    fewest = min(converged.values(), key=lambda row: int(row["updates"]))
    assert (f"Fewest updates to converge: {fewest['method']} ({fewest['updates']} updates)"
            in stdout)
    sgd = rows["SGD (batch 1)"]
    assert int(sgd["updates"]) <= 3000 and int(sgd["updates"]) >= int(fewest["updates"])


def test_a_bad_minibatch_size_is_named(tmp_path):
    result = run([PYTHON, "-m", "app.studies.gradient_descent_study", "--minibatch_sizes=16,0",
                  f"--out_dir={tmp_path}"], check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert lines == ["app.studies.gradient_descent_study: error: --minibatch_sizes=16,0: each "
                     "must be between 2 and 999 (batch 1 and the full batch always run)"]
    assert not error_lines(result)  # not reported as app.train
