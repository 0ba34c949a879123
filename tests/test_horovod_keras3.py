"""Horovod's Keras layer on Keras 3 (the build patched by scripts/horovod-keras3.patch), under
mpirun -np 2 with Keras 3 models in float64: tests/workers/horovod_keras3_check.py runs each
case on both ranks and against the same computation on one process; and an elastic run under
horovodrun (tests/workers/horovod_keras3_elastic.py)."""
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from conftest import HOROVODRUN, PYTHON, REPO, mpirun, run


CASES = ("optimizers_in_fit_and_custom_loop", "options", "loss_scaling", "bfloat16", "broadcast",
         "collectives", "learning_rate_callbacks", "metric_average", "load_model",
         "sync_batch_norm", "elastic_state", "best_model_checkpoint")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{case: its findings} of every case of the worker, from one mpirun (starting two ranks costs
    more than most cases); both ranks' findings must agree."""
    out_dir = tmp_path_factory.mktemp("keras3")
    run([*mpirun(2), PYTHON, "tests/workers/horovod_keras3_check.py", str(out_dir),
         ",".join(CASES)])
    by_rank = [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert by_rank[0] == by_rank[1]
    return by_rank[0]


def test_horovods_keras_layers_import_and_take_keras_3s_backend():
    """Both of Horovod's Keras modules import on Keras 3 (no tf_keras installed), and
    horovod.tensorflow.keras and its callbacks take Keras 3's backend (tf.keras's, which is
    Keras 3's)."""
    check = ("import tensorflow as tf, horovod.tensorflow.keras as hvd, horovod.keras; "
             "print(hvd.K.__name__, hvd.K is hvd.callbacks.K is tf.keras.backend)")
    backend, same = run([PYTHON, "-c", check]).stdout.split()
    assert backend.startswith("keras.") and same == "True", (backend, same)


@pytest.mark.distributed
def test_each_optimizer_averages_gradients_in_fit_and_in_a_custom_loop(cases):
    """SGD with momentum and with Nesterov, Adam, AdamW, Lamb and Lion wrapped by
    hvd.DistributedOptimizer, 4 steps on each rank's half of the batches, by model.fit and by a
    tf.function calling apply_gradients: the weights of one process on the whole batches."""
    found = cases["optimizers_in_fit_and_custom_loop"]
    assert len(found) == 12
    assert all(distance < 1e-10 for distance in found.values()), found


@pytest.mark.distributed
def test_distributed_optimizer_options_against_one_process(cases):
    """Adam through model.fit with num_groups/groups (an integer, and lists of the model's
    variables, whose names repeat across layers), gradient_predivide_factor, op=Sum (one
    process with twice the gradient), a process set of the rank alone (its own batches),
    an Embedding's sparse gradients with and without sparse_as_dense (dense gradients on one
    process), backward_passes_per_step=2 with and without average_aggregated_gradients (Keras
    3's own gradient_accumulation_steps=2, on twice the gradient for the sum), counting the
    updates in `iterations` as Keras does."""
    found = cases["options"]
    for case, value in found.items():
        if case.endswith("_iterations"):
            assert value == [2, 2], (case, value)
        else:
            assert value < 1e-10, (case, value)
    assert len(found) == 12


def _adasum(a, b):
    """Adasum of two gradients (Maleki et al. 2021), exact in float64."""
    return (1 - a @ b / (2 * a @ a)) * a + (1 - a @ b / (2 * b @ b)) * b


@pytest.mark.distributed
def test_reductions_on_four_ranks_as_horovod_defines_them(tmp_path):
    """One SGD(1) step from zero on each of 4 ranks' own gradient: compression=fp16 the fp16
    average (within fp16's rounding of the sum), op=Adasum the pairs' Adasum of the pairs'
    Adasums, the process sets of the even and the odd ranks each their own average, fp16
    gradients of 60000 overflowing in the sum unless gradient_predivide_factor=4 divides
    them first. model.fit with jit_compile=True is refused in one line (XLA has no kernel
    for Horovod's ops on this CPU build). (Until the project left tf_keras, the same worker
    on tf_keras gave identical results: BUILD.md.)"""
    run([*mpirun(4), PYTHON, "tests/workers/horovod_reductions_check.py", str(tmp_path)])
    found = {"keras3": [json.loads((tmp_path / f"rank-{rank}.json").read_text())
                        for rank in range(4)]}
    for rank in range(4):
        keras3 = found["keras3"][rank]
        assert keras3 == {**found["keras3"][rank % 2], "parity_set": keras3["parity_set"]}
    g = np.array(found["keras3"][0]["gradients"])
    for rank in range(4):
        np.testing.assert_array_equal(found["keras3"][rank]["parity_set"],
                                      g[rank % 2::2].mean(axis=0))
    fp16 = np.array(found["keras3"][0]["fp16"])
    assert np.array_equal(fp16.astype(np.float16), fp16)
    assert np.all(np.abs(fp16 - g.mean(axis=0)) <= 2 ** -10 * np.abs(g).sum(axis=0))
    np.testing.assert_allclose(found["keras3"][0]["adasum"],
                               _adasum(_adasum(g[0], g[1]), _adasum(g[2], g[3])), rtol=1e-12)
    assert np.all(np.isinf(found["keras3"][0]["fp16_60000_predivide_1"]))
    assert found["keras3"][0]["fp16_60000_predivide_4"] == [60000.0] * 4
    assert found["keras3"][0]["jit_compile"].startswith(
        "ValueError: Horovod's gradient allreduce cannot be compiled by XLA here")
    assert "jit_compile=False" in found["keras3"][0]["jit_compile"]


@pytest.mark.distributed
def test_loss_scaling_and_bfloat16_train_as_one_process(cases):
    """LossScaleOptimizer around hvd.DistributedOptimizer and inside it train as one process
    does; with the distributed one around it, an infinite gradient on rank 1 only makes both
    ranks skip the step and halve the scale. Under the mixed_bfloat16 policy the weights are
    exactly those of one process applying the mean of the halves' gradients."""
    found = {**cases["loss_scaling"], **cases["bfloat16"]}
    assert found["bfloat16_dtypes"] == ["float32", "bfloat16"]
    assert found["bfloat16"] == 0
    assert found["loss_scale_distributed_outside"] < 1e-10
    assert found["loss_scale_distributed_inside"] < 1e-10
    assert found["overflow_on_one_rank"] == {"weight": [1.0, 1.0], "scale": 2.0 ** 14}


@pytest.mark.distributed
def test_broadcast_callback_gives_rank0s_weights_and_optimizer_slots(cases):
    """Each rank starts from its own initial weights and its own Adam slots and iteration
    count; BroadcastGlobalVariablesCallback(0) makes them rank 0's before the first step:
    the weights and slots after fit are one process's from rank 0's start. Horovod's
    collectives (allreduce, allgather, broadcast, reducescatter, broadcast_variables,
    broadcast_object) take Keras 3 variables, each rank's holding rank + 1."""
    found = {**cases["broadcast"], **cases["collectives"]}
    assert found["broadcast_weights"] < 1e-10 and found["broadcast_slots"] < 1e-10, found
    assert found["collectives"] == {
        "allreduce": [1.5] * 3, "allgather": [1.0] * 3 + [2.0] * 3, "broadcast": [2.0] * 3,
        "reducescatter": [[0.0, 1.5], [3.0, 4.5]], "broadcast_variables": [2.0] * 3,
        "broadcast_object": [1.0, 1.0]}


@pytest.mark.distributed
def test_learning_rate_callbacks_follow_their_formulas(cases):
    """LearningRateWarmupCallback (2 epochs of 2 steps, then one more epoch) sets
    lr = 0.1 / size * (epoch' * (size - 1) / 2 + 1) with epoch' = epoch + (batch + 1) / 2, and
    its momentum correction reaches the update (the weights of one process with momentum
    times new / old learning rate in the warmup, 1e-10); LearningRateScheduleCallback with
    multiplier 0.5 from epoch 1 sets 0.1 * 0.5 ** (epoch - 1) at each epoch's start; one
    whose first epoch is at 0 trains as if the epoch were not there (no correction from 0); an
    optimizer built with a schedule object is refused in one line."""
    found = cases["learning_rate_callbacks"]
    warmup = [0.1 / 2 * ((epoch + (batch + 1) / 2) * (2 - 1) / 2 + 1)
              for epoch in (0, 1) for batch in (0, 1)] + [0.1, 0.1]
    np.testing.assert_allclose(found["warmup_steps"], warmup, rtol=1e-12)
    schedule = [0.1 * 0.5 ** max(epoch - 1, 0) for epoch in (0, 1, 2) for _ in (0, 1)]
    np.testing.assert_allclose(found["schedule_steps"], schedule, rtol=1e-12)
    assert found["warmup_weights"] < 1e-10
    assert found["warmup_loss_scaled"] == 0
    assert found["from_zero_lr"] == 0
    assert "schedule" in found["schedule_object_refused"]
    assert "\n" not in found["schedule_object_refused"]


@pytest.mark.distributed
def test_metric_average_callback_logs_the_ranks_mean_loss(cases):
    """One step an epoch: each rank's epoch loss is its batch's loss at the initial weights,
    computed by hand; MetricAverageCallback logs their mean on both ranks."""
    found = cases["metric_average"]["metric_average"]
    assert found["losses"][0] != pytest.approx(found["losses"][1])
    assert found["logged"] == pytest.approx(np.mean(found["losses"]), rel=1e-6)


@pytest.mark.distributed
def test_load_model_best_checkpoint_sync_batch_norm_and_elastic_state_on_keras3(cases):
    """hvd.load_model of a .keras file (Adam after 2 steps) wraps its optimizer with its
    state: 2 more steps on each rank's half are the loaded model's on the whole batches;
    hvd.SyncBatchNormalization on the halves is BatchNormalization on the whole batches
    (weights and moving statistics); hvd.elastic.KerasState.sync() gives every rank rank 0's
    weights and builds the optimizer's variables (iterations, learning rate, Adam's 2 slots
    for each of 4 variables), and restore() after 2 steps brings back the saved ones. Rank 0's
    BestModelCheckpoint over 4 epochs holds the weights of the epoch of least validation loss
    (not the last), and the file loads without Horovod."""
    found = {name: value for case in ("load_model", "sync_batch_norm", "elastic_state",
                                      "best_model_checkpoint")
             for name, value in cases[case].items()}
    best = found["best_model_checkpoint"]
    assert best["best_epoch"] == int(np.argmin(best["val_losses"])) < 3
    assert best["distance"] == 0
    assert found["load_model"] < 1e-10 and found["load_model_optimizer"] == ["Adam", 4]
    assert found["sync_batch_norm"] < 1e-10
    assert found["elastic_sync"] == 0 and found["elastic_optimizer_variables"] == 10
    assert found["elastic_restore"] == [0, 0]


def _sgd(data, steps):
    """The model's weights after SGD with momentum on the global batches of `steps` (global step
    numbers), by hand in numpy: Dense(4, tanh), Dense(1), mean squared error."""
    weights = [data[f"w{i}"].copy() for i in range(4)]
    velocities = [np.zeros_like(w) for w in weights]
    for step in steps:
        x, y = data["x"][step % len(data["x"])], data["y"][step % len(data["y"])]
        hidden = np.tanh(x @ weights[0] + weights[1])
        out = 2 * (hidden @ weights[2] + weights[3] - y) / y.size
        pre = out @ weights[2].T * (1 - hidden ** 2)
        gradients = [x.T @ pre, pre.sum(0), hidden.T @ out, out.sum(0)]
        for i, gradient in enumerate(gradients):
            velocities[i] = data["momentum"] * velocities[i] - data["learning_rate"] * gradient
            weights[i] = weights[i] + velocities[i]
    return weights


@pytest.mark.distributed
def test_an_elastic_keras3_run_loses_a_worker_and_goes_on(tmp_path):
    """horovodrun --min-np 1 --max-np 2 on this machine under two names (Horovod blacklists the
    host of a failed worker, and ends a job whose hosts are all blacklisted), 4 epochs of 4
    steps (0 to 15) at a global batch of 8, committing after every 3 steps and each epoch: the
    worker of rank 1 SIGKILLs itself before step 7; the other loses step 6, rolls back to the
    commit after step 5 (KerasState's weights, momentum and step count, the epoch and batch the
    callbacks set), redoes step 6 alone on the whole global batch, exits 0 and ends with the
    weights of SGD on the 16 global batches by hand (1e-10), which step 6 applied twice (the step
    count rolled back, the weights not) misses."""
    rng = np.random.default_rng(3)
    data = {"x": rng.normal(size=(4, 8, 3)), "y": rng.normal(size=(4, 8, 1)),
            # Keras 3's SGD takes its momentum through float32, where 0.75 is exact.
            "learning_rate": 0.1, "momentum": 0.75}
    for i, shape in enumerate(((3, 4), (4,), (4, 1), (1,))):
        data[f"w{i}"] = rng.normal(size=shape) / 2
    np.savez(tmp_path / "data.npz", **data)
    discovery = tmp_path / "discover_hosts.sh"
    discovery.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    discovery.chmod(0o755)
    command = [HOROVODRUN, "-np", "2", "--min-np", "1", "--max-np", "2",
               "--host-discovery-script", str(discovery), "--network-interface", "lo",
               PYTHON, "tests/workers/horovod_keras3_elastic.py", str(tmp_path), "4", "3", "7"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": REPO})
    try:
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, (stdout[-3000:], stderr[-3000:])
    assert json.loads((tmp_path / "killed.json").read_text()) == {"rank": 1, "step": 7}
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["starts"] == [{"size": 2, "rank": 0, "step": 0, "epoch": 0, "batch": 0},
                                {"size": 1, "rank": 0, "step": 6, "epoch": 1, "batch": 1}]
    assert result["step_sizes"] == [2] * 6 + [1] * 10
    assert result["step"] == 16 and result["epoch"] == 4
    weights = [np.array(w) for w in result["weights"]]
    for found, expected in zip(weights, _sgd(data, range(16)), strict=True):
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-10)
    twice = _sgd(data, [*range(7), *range(6, 16)])
    assert max(np.max(np.abs(a - b)) for a, b in zip(weights, twice)) > 1e-3
