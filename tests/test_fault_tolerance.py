"""Preemption and lost ranks: a job that loses a rank stops promptly instead of hanging, and
the same command resumes it from its last complete checkpoint."""
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import tensorflow as tf

from conftest import (INTEGRITY_FLAGS, PYTHON, REPO, error_lines, mpirun, read_log, run,
                      train_command)

EPOCHS = 5
# Epochs of 150 steps: long enough that a kill lands mid-epoch.
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


def signal_rank_1(command, model_dir, signal_number, timeout, epoch=3, checkpoints=None):
    """Starts `command`, sends `signal_number` to rank 1 early in `epoch` (counted from 1),
    once the epoch before is saved in `checkpoints` (by default model_dir's), and waits up
    to `timeout` s for the job to end (it is killed if not); returns (its return code, the
    seconds from the signal to its end, its stderr)."""
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": REPO})
    try:
        wait_for((checkpoints or model_dir / "checkpoints") / f"epoch-{epoch - 1}.index", job)
        time.sleep(0.5)  # into `epoch`
        rank_process(job, 1).send_signal(signal_number)
        sent = time.monotonic()
        _, stderr = job.communicate(timeout=timeout)
        return job.returncode, time.monotonic() - sent, stderr
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def resumed_after_a_signal_mid_epoch(flags, tmp_path, timeout, steps_per_epoch, every=1):
    """signalled_beside_uninterrupted over 3 epochs: the signalled job exited 75 with one
    mid-epoch checkpoint (in epoch 2, or 3 when the signal came late) at a multiple of
    `every` steps, named in its one error line, and the same command resumed it from there
    to the end, whose epoch's save removed it; (straight, stopped), the two runs'
    model_dirs."""
    command, straight, stopped, returncode, stderr = signalled_beside_uninterrupted(
        flags, tmp_path, timeout)
    assert returncode == 75, stderr[-3000:]
    saved = sorted((stopped / "checkpoints").glob("epoch-*-step-*.index"))
    assert len(saved) == 1, saved
    epochs_done, steps_done = map(int, saved[0].name[len("epoch-"):-len(".index")].split(
        "-step-"))
    assert epochs_done in (1, 2) and 0 < steps_done < steps_per_epoch, saved
    assert steps_done % every == 0, saved
    assert error_lines(stderr) == [
        f"app.train: error: stopped by SIGUSR1 at epoch {epochs_done + 1}, step {steps_done}: "
        f"saved {saved[0].with_suffix('')}; the same command resumes there"], stderr[-3000:]
    result = run(command(stopped))
    assert f"Epoch {epochs_done + 1}/3" in result.stdout
    assert not list((stopped / "checkpoints").glob("epoch-*-step-*"))
    return straight, stopped


def signalled_beside_uninterrupted(flags, tmp_path, timeout, checkpoints="checkpoints"):
    """`app.launch -np 2 FLAGS` twice at once: into TMP/straight uninterrupted, and into
    TMP/stopped with SIGUSR1 to rank 1 early in epoch 2 (once epoch 1 is saved in its
    `checkpoints` folder); (the command for a model_dir, straight, stopped, the signalled
    job's return code and stderr)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    def command(model_dir):
        return [PYTHON, "-m", "app.launch", "-np", "2", *flags, f"--model_dir={model_dir}"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        uninterrupted = pool.submit(run, command(straight))
        returncode, _, stderr = signal_rank_1(command(stopped), stopped, signal.SIGUSR1,
                                              timeout, epoch=2,
                                              checkpoints=stopped / checkpoints)
        uninterrupted.result()
    return command, straight, stopped, returncode, stderr


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_a_killed_rank_ends_the_job_within_a_minute_and_the_same_command_resumes(
        launcher, tmp_path):
    command = [PYTHON, "-m", "app.launch", "-np", "2", f"--launcher={launcher}", *FLAGS,
               f"--model_dir={tmp_path}"]
    returncode, seconds, _ = signal_rank_1(command, tmp_path, signal.SIGKILL, 60)
    assert returncode != 0 and seconds < 60
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


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_a_stopped_rank_is_named_and_ends_the_job_within_the_stall_timeout(launcher,
                                                                           tmp_path):
    """SIGSTOP, as a hung filesystem read or a stuck device would: the other rank waits in
    an allreduce for ever, unless the watchdog ends the job, from its last checkpoint."""
    timeout = 15
    command = [PYTHON, "-m", "app.launch", "-np", "2", f"--launcher={launcher}", *FLAGS,
               f"--stall_timeout={timeout}", f"--model_dir={tmp_path}"]
    returncode, seconds, stderr = signal_rank_1(command, tmp_path, signal.SIGSTOP,
                                                timeout + 60, epoch=2)
    assert returncode != 0 and seconds < timeout + 60
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    if launcher == "horovodrun":  # and not its traceback
        assert error_lines(stderr, "app.launch") == [
            f"app.launch: error: horovodrun: process 0 exited first, with code {returncode}; "
            f"the job was ended"], stderr[-3000:]
    assert errors[0].startswith(f"app.train: error: --stall_timeout={timeout}: no training "
                                f"progress for ")
    assert "; rank 1 silent for " in errors[0] and "rank 0 silent" not in errors[0]
    assert "Traceback" not in stderr
    # What the same command resumes from (resuming itself: the killed-rank test above).
    from app import checkpoints
    assert checkpoints.latest(str(tmp_path))[0] >= 1


def checkpoint_values(path):
    reader = tf.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE")}


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_either_signal_stops_training_at_the_next_check_but_not_at_an_epochs_last_step(
        signal_number):
    from app import preemption
    saved = []
    stop = preemption.StopOnSignal(lambda received: received,
                                   lambda epochs, steps: saved.append((epochs, steps)) or "here",
                                   steps_per_epoch=20, check_steps=5)
    before = signal.getsignal(signal_number)
    stop.on_train_begin()
    try:
        stop.on_epoch_begin(3)
        os.kill(os.getpid(), signal_number)
        stop.on_train_batch_end(2)  # step 3: not a check
        stop.on_train_batch_end(19)  # step 20: the epoch's last, whose end comes first
        assert saved == []
        with pytest.raises(preemption.Preempted, match=f"stopped by {signal_number.name} at "
                                                        f"epoch 4, step 10: saved here"):
            stop.on_train_batch_end(9)
        assert saved == [(3, 10)]
    finally:
        stop.on_train_end()
    assert signal.getsignal(signal_number) == before


@pytest.mark.distributed
def test_a_signal_under_accumulation_stops_at_an_update_and_the_rerun_ends_as_if_uninterrupted(
        tmp_path):
    """What SLURM sends ahead of the time limit (--signal=USR1@...; SIGTERM alike: the test
    above), to rank 1 only, under --accumulation_steps=4 with checks every 25 steps: both
    ranks stop at the same step, rank 0 saves it, the job exits 75 with one line; a stop at
    step 25, 50 or 75 would drop the batches accumulated since the last update (Horovod's
    aggregation is not in the checkpoint), so the checks fall at 28, 56 and 84 instead; the
    same command resumes there and ends with the uninterrupted run's weights and momentum
    (float64, 1e-10)."""
    flags = [*INTEGRITY_FLAGS, "--accumulation_steps=4", "--preemption_check_steps=25",
             "--epochs=3", "--warmup_epochs=1", "--steps_per_epoch=96"]
    straight, stopped = resumed_after_a_signal_mid_epoch(flags, tmp_path, 120, 96, every=4)
    final_stopped, final_straight = (checkpoint_values(folder / "checkpoints" / "epoch-3")
                                     for folder in (stopped, straight))
    assert final_stopped.keys() == final_straight.keys()
    for name, value in final_straight.items():
        np.testing.assert_allclose(final_stopped[name], value, rtol=0, atol=1e-10,
                                   err_msg=name)


@pytest.mark.distributed
def test_a_signal_is_acted_on_at_the_next_epoch_when_no_check_falls_within_one(tmp_path):
    """--preemption_check_steps=200 against 96 steps an epoch: no check falls within an
    epoch, and the signal (before: never acted on) stops the job as epoch 3 begins, with
    epoch 2 saved and nothing mid-epoch; the rerun ends as the uninterrupted run."""
    flags = [*INTEGRITY_FLAGS, "--preemption_check_steps=200", "--epochs=3",
             "--warmup_epochs=1", "--steps_per_epoch=96"]
    command, straight, stopped, returncode, stderr = signalled_beside_uninterrupted(
        flags, tmp_path, 120)
    assert returncode == 75, stderr[-3000:]
    saved = sorted(path.name for path in (stopped / "checkpoints").glob("epoch-*.index"))
    assert saved == ["epoch-1.index", "epoch-2.index"], saved
    assert "after epoch 2, saved" in stderr
    run(command(stopped))
    final_stopped, final_straight = (checkpoint_values(folder / "checkpoints" / "epoch-3")
                                     for folder in (stopped, straight))
    for name, value in final_straight.items():
        np.testing.assert_allclose(final_stopped[name], value, rtol=0, atol=1e-10,
                                   err_msg=name)


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


def truncate(path):
    with open(path, "r+b") as data:
        data.truncate(os.path.getsize(path) // 2)


def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(tmp_path):
    """Truncated data and a bad index: each newest checkpoint in turn."""
    trained = tmp_path / "trained"
    flags = [*FLAGS, "--steps_per_epoch=5"]
    run(train_command(*flags, "--epochs=3", f"--model_dir={trained}"))
    for damage in ("truncated data", "bad index"):
        model_dir = tmp_path / damage.replace(" ", "_")
        shutil.copytree(trained, model_dir)
        folder = model_dir / "checkpoints"
        data = next(folder.glob("epoch-3.data-*"))
        if damage == "truncated data":
            truncate(data)
        else:
            (folder / "epoch-3.index").write_bytes(b"not an index")
        result = run(train_command(*flags, "--epochs=4", f"--model_dir={model_dir}"))
        warnings = [line for line in result.stderr.splitlines()
                    if line.startswith("app.train: warning: damaged checkpoint")]
        assert len(warnings) == 1, (damage, result.stderr[-3000:])
        assert f"{folder / 'epoch-3'} (" in warnings[0]
        assert warnings[0].endswith(f"resuming from {folder / 'epoch-2'} instead")
        assert "Traceback" not in result.stderr
        assert json.loads((model_dir / "results.json").read_text())["epochs_completed"] == 4
        assert [int(row["epoch"]) for row in read_log(model_dir)] == [0, 1, 2, 2, 3]


@pytest.mark.distributed
def test_no_intact_checkpoint_stops_every_rank_with_one_line_and_deletes_nothing(tmp_path):
    flags = [*FLAGS, "--steps_per_epoch=5", f"--model_dir={tmp_path}"]
    run(train_command(*flags, "--epochs=2"))
    folder = tmp_path / "checkpoints"
    for data in folder.glob("epoch-*.data-*"):
        truncate(data)
    files = sorted(os.listdir(folder))
    result = run([*mpirun(2), *train_command(*flags)], check=False, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"app.train: error: --model_dir={tmp_path}: no intact checkpoint")
    assert str(folder / "epoch-1") in errors[0] and str(folder / "epoch-2") in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(folder)) == files


@pytest.mark.distributed
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_ends_every_rank_with_one_line_and_keeps_the_checkpoints_before(tmp_path):
    """--model_dir on a 3 MB tmpfs: a checkpoint of the digits CNN with its momentum is
    1.2 MB, so a save soon finds the disk full."""
    from app import checkpoints
    model_dir = tmp_path / "small_disk"
    model_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(model_dir)],
                   check=True)
    try:
        result = run([*mpirun(2), *train_command(*FLAGS, "--steps_per_epoch=5", "--epochs=10",
                                                  f"--model_dir={model_dir}")],
                     check=False, timeout=180)
        assert result.returncode == 1, result.stderr[-3000:]
        errors = error_lines(result)
        assert len(errors) == 1, result.stderr[-3000:]
        assert errors[0].startswith(f"app.train: error: --model_dir={model_dir}")
        assert "No space left on device" in errors[0], errors[0]
        assert "Traceback" not in result.stderr
        saved, _, _ = checkpoints.latest(str(model_dir))  # reads each one whole
        assert saved >= 1 and f"epoch-{saved + 1}" in errors[0]
    finally:
        subprocess.run(["umount", "--lazy", str(model_dir)], check=True)
