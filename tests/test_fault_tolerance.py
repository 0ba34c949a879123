"""Preemption and lost ranks: a job that loses a rank stops promptly instead of hanging, and
the same command resumes it from its last complete checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import tensorflow as tf

from conftest import PYTHON, REPO, read_log, run, train_command

EPOCHS = 5
# Long enough epochs (about 2 s at np=2) that a kill lands mid-epoch.
FLAGS = ["--flagfile=configs/digits_cnn.cfg", f"--epochs={EPOCHS}", "--steps_per_epoch=150",
         "--warmup_epochs=1", "--validation_steps=2"]


def wait_for(path, job, timeout=240):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert job.poll() is None, f"the job ended before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def rank_process(job, rank):
    """The app.train process of `rank` among the launcher's descendants."""
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            environment = child.environ()
            is_train = "app.train" in child.cmdline()
        except psutil.Error:
            continue
        ranks = {environment.get(name) for name in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK")}
        if is_train and str(rank) in ranks:
            return child
    raise AssertionError(f"no app.train process of rank {rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_a_killed_rank_ends_the_job_within_a_minute_and_the_same_command_resumes(
        launcher, tmp_path):
    command = [PYTHON, "-m", "app.launch", "-np", "2", f"--launcher={launcher}", *FLAGS,
               f"--model_dir={tmp_path}"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": REPO})
    try:
        wait_for(tmp_path / "checkpoints" / "epoch-2.index", job)
        time.sleep(0.5)  # into epoch 3
        rank_process(job, 1).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        job.communicate(timeout=60)
        assert time.monotonic() - killed < 60
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert not (tmp_path / "results.json").exists()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    completed = int(latest.rsplit("-", 1)[1])  # 2, or 3 when the kill came late
    assert 2 <= completed < EPOCHS

    result = run(command)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs_completed"] == EPOCHS
    log = read_log(tmp_path)
    assert [int(row["epoch"]) for row in log] == list(range(EPOCHS))  # no epoch run twice
    assert f"Epoch {completed + 1}/{EPOCHS}" in result.stdout  # resumed where it stopped
    assert "Epoch 1/" not in result.stdout


def test_a_save_cut_short_leaves_the_last_complete_checkpoint_to_resume_from(tmp_path):
    """A save killed midway leaves data files without their index, and the `checkpoint`
    file (replaced atomically) still naming the previous epoch."""
    flags = [*FLAGS, "--steps_per_epoch=5", f"--model_dir={tmp_path}"]
    run(train_command(*flags, "--epochs=2"))
    folder = tmp_path / "checkpoints"
    for name in os.listdir(folder):
        if name.startswith("epoch-2.data"):
            partial = folder / name.replace("epoch-2", "epoch-3")
            shutil.copyfile(folder / name, partial)
            with open(partial, "r+b") as data:
                data.truncate(os.path.getsize(partial) // 2)
    run(train_command(*flags))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs_completed"] == EPOCHS
    assert (folder / f"epoch-{EPOCHS}.index").exists()
    assert [int(row["epoch"]) for row in read_log(tmp_path)] == list(range(EPOCHS))


@pytest.mark.distributed
def test_elastic_training_goes_on_when_a_worker_is_removed(tmp_path):
    """horovodrun's elastic mode with a host discovery script: 2 workers on localhost, then
    the script offers 1 slot; the job finishes on one worker, at half the global batch and
    half the learning rate, without losing or repeating an epoch."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    discovery = tmp_path / "discover_hosts.sh"
    discovery.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discovery.chmod(0o755)
    model_dir, epochs = tmp_path / "run", 30
    command = [PYTHON, "-m", "app.launch", "-np", "2", "--min_np=1", "--max_np=2",
               f"--host_discovery_script={discovery}", "--network_interface=lo",
               "--flagfile=configs/digits_cnn.cfg",
               f"--epochs={epochs}", "--warmup_epochs=0", "--lr_schedule=constant",
               "--validation_steps=2", f"--model_dir={model_dir}"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": REPO})
    try:
        wait_for(model_dir / "checkpoints" / "epoch-2.index", job)
        hosts.write_text("localhost:1\n")
        stdout, stderr = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr[-4000:]
    assert "elastic: world size 2 from epoch 1, global batch 64" in stdout
    assert "elastic: world size 1 from epoch" in stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["world_size"] == 1 and results["global_batch_size"] == 32
    assert results["epochs_completed"] == epochs
    log = read_log(model_dir)
    assert [int(row["epoch"]) for row in log] == list(range(epochs))
    first_lr, last_lr = float(log[0]["lr"]), float(log[-1]["lr"])
    assert last_lr == pytest.approx(first_lr / 2) and last_lr == pytest.approx(
        results["learning_rate"])
