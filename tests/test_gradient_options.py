"""--accumulation_steps and --fp16_allreduce do what they claim: k accumulated batches of b
make the same update as one batch of k*b, and fp16 allreduce averages the ranks' gradients
in float16."""
import json

import numpy as np
import pytest

from conftest import PYTHON, mpirun, run, train_command
from test_train import checkpoint_values

SAME_DATA = ["--flagfile=configs/digits_cnn.cfg", "--global_batch_size=32", "--deterministic",
             "--lr_scaling=none", "--warmup_epochs=0", "--lr_schedule=constant", "--epochs=2",
             "--validation_steps=1"]


def test_two_accumulated_batches_of_16_update_like_one_batch_of_32(tmp_path):
    """The small CNN has no batch norm or dropout, so the two runs differ only by float32
    rounding (the mean of two means of 16 against one mean of 32)."""
    run(train_command(*SAME_DATA, "--steps_per_epoch=10", f"--model_dir={tmp_path / 'one'}"))
    run(train_command(*SAME_DATA, "--accumulation_steps=2", "--steps_per_epoch=20",
                      f"--model_dir={tmp_path / 'accumulated'}"))
    results = json.loads((tmp_path / "accumulated" / "results.json").read_text())
    assert results["batch_size"] == 16 and results["global_batch_size"] == 32
    one, accumulated = (checkpoint_values(tmp_path / name, 2, "model/")
                        for name in ("one", "accumulated"))
    assert one.keys() == accumulated.keys() and len(one) == 16
    for name in one:
        np.testing.assert_allclose(accumulated[name], one[name], rtol=0, atol=1e-6,
                                   err_msg=name)
    # and the updates were not every batch's: the first epoch alone moves weights far more
    first = checkpoint_values(tmp_path / "one", 1, "model/")
    assert max(np.abs(one[n] - first[n]).max() for n in one) > 1e-3


@pytest.mark.distributed
def test_fp16_allreduce_averages_the_ranks_gradients_in_float16(tmp_path):
    run([*mpirun(2), PYTHON, "tests/workers/allreduce_options_check.py", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["fp32"] == ranks[1]["fp32"] and ranks[0]["fp16"] == ranks[1]["fp16"]
    g0, g1 = (np.array(g) for g in ranks[0]["gradients"])
    # one SGD step at LR 1 from 0: the weights are minus the combined gradient
    np.testing.assert_allclose(ranks[0]["fp32"], -(g0.astype(np.float32) + g1.astype(np.float32))
                               / 2, rtol=1e-7)
    in_float16 = (g0.astype(np.float16) + g1.astype(np.float16)) / np.float16(2)
    np.testing.assert_array_equal(np.float32(ranks[0]["fp16"]), -in_float16.astype(np.float32))
    assert np.abs(np.array(ranks[0]["fp16"]) - ranks[0]["fp32"]).max() > 1e-4
