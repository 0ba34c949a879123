"""--sync_batch_norm: on 2 ranks that see different data, the moving statistics are those of
the two batches together, on both ranks; and where E[x^2] - E[x]^2 cancels, Horovod's own
layer gives a negative variance and NaN outputs while the project's does not."""
import json

import numpy as np
import pytest

from conftest import PYTHON, mpirun, run, train_command

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sync_batch_norm")
    run([*mpirun(2), PYTHON, "tests/workers/sync_batch_norm_check.py", str(out_dir)])
    return [np.load(out_dir / f"rank-{rank}.npz") for rank in (0, 1)]


def test_moving_statistics_are_those_of_the_concatenated_batch(ranks):
    together = np.concatenate([r["batch"] for r in ranks]).astype(np.float64)[:, :8]
    for r in ranks:
        np.testing.assert_allclose(r["project_mean"][:8], together.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(r["project_variance"][:8], together.var(axis=0), rtol=1e-5)
        # plain batch norm only sees its own rank's batch, which differs
        own = r["batch"].astype(np.float64)[:, :8]
        np.testing.assert_allclose(r["plain_mean"][:8], own.mean(axis=0), atol=1e-5)
        assert np.abs(r["plain_mean"][:8] - together.mean(axis=0)).min() > 0.5
    np.testing.assert_array_equal(ranks[0]["project_variance"], ranks[1]["project_variance"])


def test_a_cancelling_variance_is_clamped_instead_of_giving_nan(ranks):
    for r in ranks:
        assert (r["horovod_variance"][8:] < 0).any()  # the failure being guarded against
        assert np.isnan(r["horovod_outputs"]).any()
        assert (r["project_variance"] >= 0).all()
        assert np.isfinite(r["project_outputs"]).all()


def test_train_runs_a_resnet_with_sync_batch_norm_on_two_processes(tmp_path):
    run([*mpirun(2), *train_command(
        "--flagfile=configs/synthetic_resnet50.cfg", "--model=resnet20", "--image_size=32",
        "--batch_size=8", "--steps_per_epoch=3", "--epochs=1", "--sync_batch_norm",
        f"--model_dir={tmp_path}")])
    results = json.loads((tmp_path / "results.json").read_text())
    assert np.isfinite(results["loss"]) and np.isfinite(results["val_loss"])
    assert "--sync_batch_norm" in (tmp_path / "flags.cfg").read_text().splitlines()
