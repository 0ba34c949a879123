"""The gradient options do what they claim: k accumulated batches of b make the same update
as one batch of k*b; fp16 allreduce averages the ranks' gradients in float16; Adasum combines
them by its formula; float16 loss scaling skips an overflow on every rank alike; mixed
precision and XLA train the app's model, on one process and under mpirun."""
import json

import numpy as np
import pytest

from conftest import HOROVODRUN, PYTHON, mpirun, run, run_concurrently, train_command
from test_train import checkpoint_values

SAME_DATA = ["--flagfile=configs/digits_cnn.cfg", "--global_batch_size=32", "--deterministic",
             "--lr_scaling=none", "--warmup_epochs=0", "--lr_schedule=constant", "--epochs=2",
             "--validation_steps=1", "--mixed_precision=float32"]  # on any processor


def test_two_accumulated_batches_of_16_update_like_one_batch_of_32(tmp_path):
    """The small CNN has no batch norm or dropout, so the two runs differ only by float32
    rounding (the mean of two means of 16 against one mean of 32)."""
    run(train_command(*SAME_DATA, "--steps_per_epoch=10", f"--model_dir={tmp_path / 'one'}"))
    run(train_command(*SAME_DATA, "--accumulation_steps=2", "--steps_per_epoch=20",
                      f"--model_dir={tmp_path / 'accumulated'}"))
    results = json.loads((tmp_path / "accumulated" / "results.json").read_text())
    assert results["batch_size"] == 16 and results["global_batch_size"] == 32
    one, accumulated = ({**checkpoint_values(tmp_path / name, 2, "model/"),  # the weights
                         **checkpoint_values(tmp_path / name, 2, "optimizer/_variables/")}
                        for name in ("one", "accumulated"))  # and their momentum slots
    assert one.keys() == accumulated.keys() and len(one) == 16
    for name in one:
        np.testing.assert_allclose(accumulated[name], one[name], rtol=0, atol=1e-6,
                                   err_msg=name)
    # and the updates were not every batch's: the first epoch alone moves weights far more
    first = checkpoint_values(tmp_path / "one", 1, "model/")
    assert max(np.abs(one[n] - first[n]).max() for n in first) > 1e-3


@pytest.fixture(scope="module")
def allreduced(tmp_path_factory):
    """The two ranks' records of tests/workers/allreduce_options_check.py under mpirun."""
    out_dir = tmp_path_factory.mktemp("allreduce_options")
    run([*mpirun(2), PYTHON, "tests/workers/allreduce_options_check.py", str(out_dir)])
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.distributed
def test_fp16_allreduce_averages_the_ranks_gradients_in_float16(allreduced):
    ranks = allreduced
    assert ranks[0]["fp32"] == ranks[1]["fp32"] and ranks[0]["fp16"] == ranks[1]["fp16"]
    g0, g1 = (np.array(g) for g in ranks[0]["gradients"])
    # one SGD step at LR 1 from 0: the weights are minus the combined gradient
    np.testing.assert_allclose(ranks[0]["fp32"], -(g0.astype(np.float32) + g1.astype(np.float32))
                               / 2, rtol=1e-7)
    in_float16 = (g0.astype(np.float16) + g1.astype(np.float16)) / np.float16(2)
    np.testing.assert_array_equal(np.float32(ranks[0]["fp16"]), -in_float16.astype(np.float32))
    assert np.abs(np.array(ranks[0]["fp16"]) - ranks[0]["fp32"]).max() > 1e-4


def adasum(g1, g2):
    """Adasum of two gradients (Maleki et al. 2021): each loses half its projection on the
    other, then they are added."""
    dot = g1 @ g2
    return (1 - dot / (2 * (g1 @ g1))) * g1 + (1 - dot / (2 * (g2 @ g2))) * g2


@pytest.mark.distributed
def test_adasum_adds_what_the_ranks_gradients_do_not_share(allreduced):
    """Orthogonal gradients are added up, identical ones kept as they are, and any other pair
    combined by the formula, each tensor on its own."""
    ranks = allreduced
    assert ranks[0]["adasum"] == ranks[1]["adasum"]
    combined = {name: -np.array(values) for name, values in ranks[0]["adasum"].items()}
    pairs = {name: [np.array(g, np.float64) for g in gradients]
             for name, gradients in ranks[0]["adasum_gradients"].items()}
    np.testing.assert_array_equal(combined["orthogonal"], pairs["orthogonal"][0]
                                  + pairs["orthogonal"][1])
    np.testing.assert_array_equal(combined["identical"], pairs["identical"][0])
    np.testing.assert_allclose(combined["general"], adasum(*pairs["general"]), rtol=1e-6)
    average = (pairs["general"][0] + pairs["general"][1]) / 2
    assert np.abs(combined["general"] - average).max() > 0.5


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["distributed", "sharded"])
def test_float16_loss_scaling_skips_an_overflow_on_every_rank(optimizer, tmp_path):
    """Loss scaling inside the distributed optimizer: the overflow of rank 1 alone reaches
    rank 0 through the allreduce, both skip the step and halve the scale; the next step is
    the plain average. Sharded, the overflow lands in rank 0's half of the reduce-scatter
    only, and the ranks' agreement makes rank 1 skip too."""
    run([*mpirun(2), PYTHON, "tests/workers/loss_scale_check.py", str(tmp_path), optimizer])
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["compute_dtype"] == "float16" and ranks[0]["variable_dtype"] == "float32"
    skipped, applied = ranks[0]["steps"]
    assert skipped == {"kernel": [0.0, 0.0], "loss_scale": 2.0 ** 14}  # from 2^15
    assert applied["kernel"] == [-(1.0 + 3.0) / 2, -(2.0 + 0.5) / 2]


def compiled_by_xla(result):
    return "Compiled cluster using XLA" in result.stderr


TRAIN_CNN = ["--flagfile=configs/digits_cnn.cfg", "--epochs=4", "--warmup_epochs=1"]


def test_mixed_precision_and_xla_train_the_cnn(tmp_path):
    """bfloat16 with XLA on the default experiment as `make train` runs it (its 16 epochs):
    the 97% it reaches in float32; float16 (loss scaled) without XLA, 4 epochs: it learns the
    digits. Only the first compiles with XLA; only float16 keeps a loss scale in its
    checkpoint."""
    cases = (("bfloat16", ["--flagfile=configs/digits_cnn.cfg", "--jit_compile"], 16, 0.97),
             ("float16", TRAIN_CNN, 4, 0.9))
    outputs = run_concurrently(  # XLA's INFO line says it compiled
        lambda case: run(train_command(*case[1], f"--mixed_precision={case[0]}",
                                       f"--model_dir={tmp_path / case[0]}"),
                         env={"TF_CPP_MIN_LOG_LEVEL": "0"}), cases)
    for (precision, _, epochs, accuracy), result in zip(cases, outputs):
        assert compiled_by_xla(result) == (precision == "bfloat16")
        results = json.loads((tmp_path / precision / "results.json").read_text())
        assert results["epochs_completed"] == epochs
        assert results["val_accuracy"] >= accuracy, precision
        assert results["precision"] == f"mixed_{precision}"  # the policy the run used
        loss_scale = {name: value for name, value
                      in checkpoint_values(tmp_path / precision, epochs, "optimizer/").items()
                      if name in ("optimizer/dynamic_scale", "optimizer/step_counter")}
        assert len(loss_scale) == (2 if precision == "float16" else 0), loss_scale.keys()


@pytest.mark.distributed
def test_adasum_with_xla_trains_on_two_processes_at_one_processs_learning_rate(tmp_path):
    result = run([*mpirun(2), *train_command(*TRAIN_CNN, "--adasum", "--jit_compile",
                                             f"--model_dir={tmp_path}")],
                 env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert compiled_by_xla(result)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_batch_size"] == 64 and results["val_accuracy"] > 0.9
    assert results["learning_rate"] == 0.1 * 32 / 64  # per-process batch / reference batch


@pytest.mark.distributed
def test_adasum_needs_mpi_and_a_power_of_two_processes(tmp_path):
    for launcher, named in (([HOROVODRUN, "-np", "2", "--gloo"], "needs Horovod's MPI"),
                            (mpirun(3), "--adasum=True: needs a power-of-2 number of "
                                        "processes (Horovod's Adasum), not 3")):
        result = run([*launcher, *train_command(*TRAIN_CNN, "--adasum",
                                                f"--model_dir={tmp_path}")],
                     timeout=120, check=False)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if "app.train: error:" in line]
        assert len(errors) == 1 and named in errors[0], result.stderr[-3000:]  # rank 0's
        assert not any(tmp_path.iterdir())
