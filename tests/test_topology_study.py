"""app.studies.topology_study: each variant's run and its design scores from its own log;
growing the resolution: a run continued at the larger size from the small run's last
checkpoint, and one from scratch stopped at both runs' seconds."""
import pytest

from conftest import read_log, run_study


@pytest.mark.distributed
def test_the_study_grows_each_variant_and_races_it_against_scratch(tmp_path):
    stdout, rows = run_study(
        tmp_path, "app.studies.topology_study", "topology.csv", "-np", "1",
        "--variants=resunet_adam", "--grow_to=12", "--grow_volumes=2",
        "--grow_epochs=1", "--volume_size=8", "--num_volumes=2", "--epochs=2",
        "--steps_per_epoch=1", "--warmup_epochs=0", f"--data_dir={tmp_path / 'designs'}")
    assert [(row["variant"], row["side"], row["start"].split(",")[0]) for row in rows] == [
        ("resunet_adam", side, start)
        for side, start in (("8", "scratch"), ("12", "from 8^3"), ("12", "scratch"))]
    for row in rows:
        log = read_log(tmp_path / row["run"])
        assert float(row["val_compliance_ratio"]) == float(log[-1]["val_compliance_ratio"])
        assert 0 <= float(row["val_connected"]) <= 1 and int(row["epochs"]) == len(log)
    small, grown, scratch = rows[:3]
    flags = (tmp_path / grown["run"] / "flags.cfg").read_text()
    assert f"--init_checkpoint={tmp_path}/{small['run']}/checkpoints/epoch-2" in flags
    assert "--volume_size=12" in flags and "--model=resunet3d_small" in flags
    budget = float(small["seconds"]) + float(grown["seconds"])
    assert scratch["start"] == f"scratch, {budget:.0f} s"
    assert f"--time_budget={budget:.0f}" in (tmp_path / scratch["run"] / "flags.cfg").read_text()
    assert "wrote" in stdout
