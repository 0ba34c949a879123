"""app.studies.batch_size_study: every number of its table comes from its runs' own results
and logs, each accuracy run stops at the target, and the figures are PNG images."""
import json

import pytest
from matplotlib import image

from conftest import read_log, run_study

pytestmark = pytest.mark.distributed  # every run goes through app.launch (mpirun)
TARGET = 0.9


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("batch_study")
    stdout, rows = run_study(out_dir, "app.studies.batch_size_study", "batch_study.csv",
                             "--batch_sizes=128,16", "--steps=30",
                             f"--target_accuracy={TARGET}", "--time_budget=60",
                             "--flagfile=configs/digits_cnn.cfg", "--validation_steps=4")
    return out_dir, rows, stdout


def test_the_table_holds_each_runs_own_numbers(study):
    out_dir, rows, _ = study
    assert [int(row["batch_size"]) for row in rows] == [16, 128]
    for row in rows:
        speed = json.loads((out_dir / f"throughput-b{row['batch_size']}" / "results.json")
                           .read_text())
        assert float(row["images_per_sec"]) == speed["images_per_sec"]
        trained = json.loads((out_dir / f"accuracy-b{row['batch_size']}" / "results.json")
                             .read_text())
        assert float(row["learning_rate"]) == trained["learning_rate"]
        log = read_log(out_dir / f"accuracy-b{row['batch_size']}")
        assert float(row["best_val_accuracy"]) == max(float(r["val_accuracy"]) for r in log)
        assert row["reached"] == "True"  # the digits CNN gets past 90% well within a minute
        assert int(row["epochs_to_target"]) == len(log) == trained["epochs_completed"]
        assert trained["target_reached"]["epoch"] == len(log)
        assert float(row["seconds_to_target"]) == float(log[-1]["wall_seconds"])
        assert int(row["steps_to_target"]) == len(log) * trained["steps_per_epoch"]
        # stopped right after the first epoch at the target
        assert float(log[-1]["val_accuracy"]) >= TARGET
        assert all(float(r["val_accuracy"]) < TARGET for r in log[:-1])


def test_the_conclusions_are_computed_from_the_table(study):
    _, rows, stdout = study
    fastest = max(rows, key=lambda row: float(row["images_per_sec"]))
    assert (f"Throughput: {float(fastest['images_per_sec']):.0f} images/s at batch "
            f"{fastest['batch_size']}") in stdout
    quickest = min(rows, key=lambda row: float(row["seconds_to_target"]))
    assert (f"shortest at batch {quickest['batch_size']} "
            f"({float(quickest['seconds_to_target']):.1f} s") in stdout


def test_the_figures_are_png_images(study):
    out_dir, _, _ = study
    for name in ("throughput.png", "accuracy.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.imread(out_dir / name).shape[0] > 200
