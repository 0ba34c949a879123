"""The stack works across processes: under mpirun and under horovodrun --gloo, ranks that start
from different weights and see different data end with identical weights and identical
averaged metrics, and the warmup raised the LR to its target."""
import json

import numpy as np
import pytest

from conftest import PYTHON, horovodrun, mpirun, run

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("launcher", [mpirun, horovodrun], ids=["mpirun", "horovodrun-gloo"])
def test_two_ranks_end_identical(launcher, tmp_path):
    run([*launcher(2), PYTHON, "tests/workers/sync_check.py", str(tmp_path)])

    weights = [np.load(tmp_path / f"weights-{rank}.npz") for rank in (0, 1)]
    metrics = [json.loads((tmp_path / f"metrics-{rank}.json").read_text()) for rank in (0, 1)]
    assert [m["size"] for m in metrics] == [2, 2]
    assert len(weights[0].files) == 4
    for name in weights[0].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])
    # The ranks' own data differ, so their local losses do; the averaged ones agree.
    assert metrics[0]["local_loss"] != pytest.approx(metrics[1]["local_loss"], rel=1e-3)
    assert metrics[0]["history"] == metrics[1]["history"]
    learning_rates = metrics[0]["history"]["lr"]
    assert learning_rates[0] < learning_rates[-1] == pytest.approx(0.1)


def test_the_threads_horovod_starts_run_at_the_lowest_priority_and_still_reduce(tmp_path):
    """app.train starts Horovod so on CPU ranks: its background thread's polling then takes no
    core from the compute threads (BENCHMARKS.md); the main thread keeps its priority."""
    run([*mpirun(2), PYTHON, "tests/workers/thread_priority_check.py", str(tmp_path)])
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert found["started"] and set(found["started"]) == {19}, found  # at least Horovod's
        assert found["main"] == 0 and found["sum"] == 3.0
