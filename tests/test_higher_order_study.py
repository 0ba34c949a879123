"""app.studies.higher_order_study: each run's steps and seconds to the target read from its
own log, each optimizer's best LR chosen by the seeds that reach the target (by hand), a
table and a PNG."""
import csv
import json

import pytest
from matplotlib import image

from app.studies import higher_order_study
from conftest import read_log, run_study


def test_the_best_lr_is_the_one_whose_seeds_reach_the_target_in_fewest_steps():
    def run(learning_rate, steps, score):
        return {"learning_rate": learning_rate, "reached": steps is not None, "steps": steps,
                "diverged": score is None,
                "epochs": steps and steps // 10, "seconds": steps and steps / 5.0,
                "score": score, "seconds_per_step": 0.2, "state_elements_per_rank": 7,
                "curve": [(1.0, score)]}
    # 0.1: both seeds reach it (median 30 steps); 0.2: one seed does, in 10; 0.4: none
    runs = [run(0.1, 20, 0.9), run(0.1, 40, 0.91), run(0.2, 10, 0.95), run(0.2, None, 0.3),
            run(0.4, None, 0.8), run(0.4, None, 0.85)]
    best = higher_order_study.best_setting(runs)
    assert (best["learning_rate"], best["reached"], best["seeds"]) == (0.1, 2, 2)
    assert (best["median_steps"], best["steps_range"], best["median_epochs"]) == (30, "20-40", 3)
    assert best["median_seconds"] == 6.0 and best["median_score"] == pytest.approx(0.905)
    # where no LR reaches it: the best median score, a diverged seed scoring below any other
    assert higher_order_study.best_setting(runs[4:] + [run(0.8, None, 0.5)])[
        "learning_rate"] == 0.4
    assert higher_order_study.best_setting(runs[4:] + [run(0.8, None, 0.9),
                                                       run(0.8, None, None)])[
        "learning_rate"] == 0.4
    # an LR all of whose seeds diverged: no score, no time per step, below every other
    gone = higher_order_study.best_setting([run(0.8, None, None), run(0.8, None, None)])
    assert (gone["diverged"], gone["median_score"], gone["seconds_per_step"]) == (2, None, None)
    assert higher_order_study.best_setting([run(0.8, None, None), run(0.8, None, None),
                                            run(0.1, None, 0.1)])["learning_rate"] == 0.1


@pytest.mark.distributed
def test_the_study_reads_each_runs_time_to_target_from_its_log(tmp_path):
    target = 0.5
    stdout, rows = run_study(
        tmp_path, "app.studies.higher_order_study", "higher_order.csv",
        "--flagfile=configs/digits_cnn.cfg", "-np", "1", "--optimizers=momentum,kfac",
        "--global_batches=128", "--lr_grid=2,1e12", "--seeds=1", "--epochs=3",
        f"--target={target}", "--warmup_epochs=0", "--validation_steps=2",
        "--kfac_damping", "0.3")
    assert [row["optimizer"] for row in rows] == ["momentum", "kfac"]
    with open(tmp_path / "higher_order_runs.csv") as table:
        runs = list(csv.DictReader(table))
    assert len(runs) == 4
    # an LR of 1e12: momentum's run diverges, counted so, and the study goes on; K-FAC's KL
    # clip bounds every step, whatever the LR
    huge = {found["optimizer"]: found for found in runs if "1e+12x" in found["run"]}
    assert (huge["momentum"]["diverged"], huge["kfac"]["diverged"]) == ("True", "False")
    gone = [huge["momentum"]]
    for found in gone:
        assert not (tmp_path / found["run"] / "results.json").exists()
        assert float(found["learning_rate"]) == pytest.approx(
            higher_order_study.OPTIMIZERS[found["optimizer"]][1] * 1e12 * 128 / 256)
    runs = [found for found in runs if found not in gone]
    for found in runs:  # K-FAC's flag went to its runs only (momentum's would refuse it)
        damping = 0.3 if found["optimizer"] == "kfac" else 0.003
        assert f"--kfac_damping={damping}\n" in (tmp_path / found["run"] / "flags.cfg").read_text()
    for found in runs:
        log = read_log(tmp_path / found["run"])
        results = json.loads((tmp_path / found["run"] / "results.json").read_text())
        first = next((int(row["epoch"]) + 1 for row in log
                      if float(row["val_accuracy"]) >= target), None)
        assert found["reached"] == str(first is not None)
        if first is not None:  # the run stopped at the epoch that reached it
            assert len(log) == first and int(found["epochs"]) == first
            assert int(found["steps"]) == first * results["steps_per_epoch"]
            assert float(found["seconds"]) == pytest.approx(float(log[-1]["wall_seconds"]))
        assert float(found["score"]) == float(log[-1]["val_accuracy"])
    for row in rows:  # each optimizer's best LR (momentum's the one that did not diverge)
        found, = [found for found in runs if (found["optimizer"], found["learning_rate"]) ==
                  (row["optimizer"], row["learning_rate"])]
        assert row["median_score"] == found["score"]
        assert int(row["reached"]) == (found["reached"] == "True")
    assert rows[0]["diverged"] == "0" and float(rows[0]["learning_rate"]) == pytest.approx(
        higher_order_study.OPTIMIZERS["momentum"][1] * 2 * 128 / 256)
    assert "target 0.5" in stdout and image.imread(tmp_path / "time_to_target.png").shape[0] > 200
