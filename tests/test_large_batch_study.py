"""app.studies.large_batch_study: one CSV per run, named after its settings and holding its own
log; a table and findings computed from those runs; a PNG."""
import csv

import pytest
from matplotlib import image

from conftest import read_log, run_study

pytestmark = pytest.mark.distributed
NAMES = {"baseline": "2ranks-32bs-0.05lr-0m-0w.csv", "momentum": "2ranks-32bs-0.05lr-0.9m-0w.csv",
         "lamb": "2ranks-512bs-0.01lr-0m-5w-lamb.csv"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("scale_study")
    stdout, rows = run_study(out_dir, "app.studies.large_batch_study", "scale_study.csv",
                             "--flagfile=configs/digits_cnn.cfg", "--time_budget=4",
                             "--runs=baseline,momentum,lamb", "--validation_steps=2")
    return out_dir, {row["run"]: row for row in rows}, stdout


def test_each_run_has_its_csv_named_after_its_settings(study):
    out_dir, rows, _ = study
    assert list(rows) == list(NAMES)
    for name, row in rows.items():
        assert row["csv"] == NAMES[name]
        log = read_log(out_dir / name)
        with open(out_dir / row["csv"]) as table:
            saved = list(csv.DictReader(table))
        assert saved == [{k: r[k] for k in ("wall_seconds", "epoch", "val_accuracy")}
                         for r in log]
        accuracies = [float(r["val_accuracy"]) for r in log]
        assert int(row["epochs"]) == len(log)
        assert float(row["best_val_accuracy"]) == max(accuracies)
        assert float(row["final_val_accuracy"]) == pytest.approx(
            sum(accuracies[-5:]) / len(accuracies[-5:]))
        assert float(row["seconds"]) == float(log[-1]["wall_seconds"]) >= 4  # the budget


def test_the_findings_come_from_the_table(study):
    out_dir, rows, stdout = study
    momentum, baseline = (float(rows[n]["final_val_accuracy"]) for n in ("momentum", "baseline"))
    verdict = "reproduced" if momentum > baseline + 0.005 else "NOT reproduced here"
    assert (f"Momentum helps the small-batch baseline: momentum {momentum:.1%} against "
            f"baseline {baseline:.1%}") in stdout
    assert f"): {verdict}." in stdout
    assert image.imread(out_dir / "accuracy.png").shape[0] > 200
