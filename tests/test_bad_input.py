"""Bad input at run time: each ends with one line saying what is wrong, a non-zero exit and
the checkpoints intact (flag values checked before anything runs are in test_train)."""
import json
import os
import shutil

import numpy as np
import pytest

import input_pipeline
from conftest import error_lines, mpirun, run, run_concurrently, train_command
from test_train import checkpoint_values

DIGITS = ["--flagfile=configs/digits_cnn.cfg", "--steps_per_epoch=5", "--validation_steps=1",
          "--warmup_epochs=0", "--lr_schedule=constant"]
TFRECORDS = ["--flagfile=configs/imagenet_resnet50.cfg", "--model=cnn", "--image_size=8",
             "--batch_size=16", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
             "--warmup_epochs=0", "--lr_schedule=constant"]


def fails_with(command, code, *fragments):
    result = run(command, check=False, timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.stderr[-3000:]
    return result


def test_a_model_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    fails_with(train_command(*DIGITS, f"--model_dir={tmp_path / 'a_file' / 'run'}"), 2,
               "--model_dir=", "is a file, not a folder")


def test_a_pattern_matching_no_tfrecord_is_named(tmp_path):
    fails_with(train_command(*TFRECORDS, f"--data_dir={tmp_path}",
                             f"--model_dir={tmp_path / 'run'}"), 2,
               "--dataset=imagenet: no TFRecord files match", str(tmp_path))


def damage(folder, name, keep_bytes):
    with open(folder / name, "r+b") as shard:
        shard.seek(keep_bytes)
        shard.write(b"\xff" * 8)


def test_a_corrupt_tfrecord_is_named_and_skip_corrupt_trains_on_the_rest(digits_tfrecords,
                                                                         tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_tfrecords, data)
    shard = sorted(name for name in os.listdir(data) if name.startswith("train-"))[1]
    damage(data, shard, 1000)
    fails_with(train_command(*TFRECORDS, f"--data_dir={data}", f"--model_dir={tmp_path / 'a'}"),
               2, str(data / shard), "corrupted record after", "--skip_corrupt")

    result = run(train_command(*TFRECORDS, f"--data_dir={data}", "--skip_corrupt",
                               f"--model_dir={tmp_path / 'b'}"))
    warnings = [line for line in result.stderr.splitlines() if "--skip_corrupt:" in line]
    good = input_pipeline.sources.scan_tfrecords([str(data / shard)])[0]
    assert good.error and 0 < good.records and good.unread_bytes > 0
    assert len(warnings) == 1 and f"after {good.records} good records" in warnings[0]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["epochs_completed"] == 1


def test_a_data_loss_met_while_training_names_its_file(digits_tfrecords, tmp_path):
    """For the full ImageNet nothing is read ahead of training; a damaged file surfaces as a
    DataLossError in training, and is then found and named."""
    data = tmp_path / "data"
    shutil.copytree(digits_tfrecords, data)
    shard = sorted(os.listdir(data))[-1]
    damage(data, shard, 500)
    source = input_pipeline.sources.tfrecord_images(
        shard.split("-")[0], str(data), 8, channels=1, num_examples=100)
    line = input_pipeline.name_damaged_file([source], RuntimeError("DataLoss"))
    assert line.startswith(str(data / shard)) and "corrupted record after" in line


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run(train_command(*DIGITS, "--epochs=1", f"--model_dir={tmp_path}"))
    before = checkpoint_values(tmp_path, 1, "model/")
    result = fails_with(train_command(*DIGITS, "--epochs=3", "--learning_rate=1e12",
                                      f"--model_dir={tmp_path}"),
                        1, "the loss became", "at step", "epoch 2")
    step = int(error_lines(result)[0].split("at step ")[1].split()[0])
    assert 5 < step <= 10  # in epoch 2 of 5 steps
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "checkpoint", "epoch-1.data-00000-of-00001", "epoch-1.index"]
    after = checkpoint_values(tmp_path, 1, "model/")
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_a_diverging_curvature_optimizer_stops_in_one_line(tmp_path):
    """K-FAC's and Shampoo's eigendecompositions of statistics gone NaN (taken every step
    here; K-FAC's KL clip, which bounds even this LR's step, off) give NaN, not eigh's error:
    the run ends at the loss, as any other."""
    for flags in (["--optimizer=kfac", "--kfac_inverse_steps=1", "--kfac_kl_clip=0"],
                  ["--optimizer=shampoo", "--shampoo_root_steps=1"]):
        fails_with(train_command(*DIGITS, *flags, "--epochs=1", "--learning_rate=1e12",
                                 f"--model_dir={tmp_path / flags[0][12:]}"),
                   1, "the loss became nan", "epoch 1")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    run(train_command(*DIGITS, "--epochs=1", f"--model_dir={tmp_path}"))
    fails_with(train_command(*DIGITS, "--epochs=2", "--model=mlp", f"--model_dir={tmp_path}"),
               1, "--model=mlp", "epoch-1 does not match this model")
    assert not (tmp_path / "checkpoints" / "epoch-2.index").exists()


@pytest.mark.distributed
def test_a_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path):
    run([*mpirun(2), *train_command(*DIGITS, "--epochs=1", f"--model_dir={tmp_path}")])
    result = run(train_command(*DIGITS, "--epochs=2", f"--model_dir={tmp_path}"))
    assert "trained at a global batch of 64; resuming on 1 processes at 64 each" in result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 1 and results["batch_size"] == 64
    assert results["global_batch_size"] == 64 and results["epochs_completed"] == 2


def test_a_keras_other_than_keras_3_on_tensorflow_is_refused_in_one_line(tmp_path):
    """tf_keras (TF_USE_LEGACY_KERAS), or a Keras backend other than TensorFlow's, chosen in
    the environment or in keras.json: one line each, before anything is built."""
    (tmp_path / "keras.json").write_text('{"backend": "numpy"}')
    for env, reason in (({"TF_USE_LEGACY_KERAS": "1"}, "TF_USE_LEGACY_KERAS=1: the project "
                         "runs on Keras 3; unset it"),
                        ({"KERAS_BACKEND": "jax"}, "KERAS_BACKEND=jax: Horovod's operations "
                         "need Keras' tensorflow backend"),
                        ({"KERAS_HOME": str(tmp_path)}, f"{tmp_path}/keras.json: sets Keras' "
                         f"backend to numpy; Horovod's operations need its tensorflow backend")):
        refused = run(train_command(*DIGITS, f"--model_dir={tmp_path / 'run'}"), check=False,
                      env=env)
        lines = error_lines(refused)
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
        assert lines[0].startswith(f"app.train: error: {reason}")
        assert not (tmp_path / "run").exists()


def test_init_checkpoint_starts_a_new_run_from_another_runs_weights(tmp_path):
    run(train_command(*DIGITS, "--epochs=1", f"--model_dir={tmp_path / 'a'}"))
    start = str(tmp_path / "a" / "checkpoints" / "epoch-1")
    # LR 0 leaves the weights as they start (and momentum correction has no ratio to apply)
    run(train_command(*DIGITS, "--epochs=1", "--learning_rate=0",
                      f"--init_checkpoint={start}", f"--model_dir={tmp_path / 'b'}"))
    a, b = (checkpoint_values(tmp_path / run, 1, "model/") for run in ("a", "b"))
    assert len(a) == 8 and a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    optimizer_b = checkpoint_values(tmp_path / "b", 1, "optimizer/")
    assert optimizer_b["optimizer/_iterations"] == 5  # a fresh optimizer
    fails_with(train_command(*DIGITS, "--epochs=1", f"--init_checkpoint={start}-missing",
                             f"--model_dir={tmp_path / 'c'}"), 2, "--init_checkpoint=")


@pytest.mark.distributed
def test_sync_batch_norm_on_a_model_without_batch_normalization_is_refused_on_every_rank(
        tmp_path):
    """The CNN and the U-Nets have no batch normalization for --sync_batch_norm to
    synchronize: each rank says why once built (rank 0 prints it) and exits 2, before any
    training; a shell after each rank reports its exit code."""
    cases = [("cnn", ["--flagfile=configs/digits_cnn.cfg"]),
             ("unet3d_small", ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=8",
                               "--patch_size=8", "--num_volumes=2"])]

    def refused(case):
        model, flags = case
        command = train_command(*flags, "--sync_batch_norm", f"--model_dir={tmp_path / model}")
        return run([*mpirun(2), "sh", "-c",
                    '"$0" "$@"; echo "rank $OMPI_COMM_WORLD_RANK exited $?"', *command],
                   timeout=120)
    for (model, _), result in zip(cases, run_concurrently(refused, cases)):
        assert error_lines(result) == [
            f"app.train: error: --sync_batch_norm=True: --model={model} has no batch "
            f"normalization to synchronize"], result.stderr[-3000:]
        assert sorted(line for line in result.stdout.splitlines() if " exited " in line) == [
            "rank 0 exited 2", "rank 1 exited 2"], result.stdout[-2000:]
        assert "Traceback" not in result.stderr and "Epoch" not in result.stdout
        assert not (tmp_path / model / "checkpoints").exists()


def test_a_regression_refuses_a_target_accuracy(tmp_path):
    result = run(train_command("--flagfile=configs/linear_regression.cfg",
                               "--target_accuracy=0.5", f"--model_dir={tmp_path / 'linear'}"),
                 check=False)
    assert result.returncode == 2 and error_lines(result) == [
        "app.train: error: --target_accuracy=0.5: --dataset=linear is a regression data "
        "set, with no headline metric to reach"], result.stderr[-2000:]


def test_a_target_above_one_is_refused_for_a_share_and_taken_for_a_ratio(tmp_path):
    """An accuracy is at most 1; the topology task's compliance ratio is an error whose
    target is at most a value above 1 (its short run stops there after one epoch)."""
    result = run(train_command("--flagfile=configs/digits_cnn.cfg", "--target_accuracy=1.5",
                               f"--model_dir={tmp_path / 'digits'}"), check=False)
    assert result.returncode == 2 and error_lines(result) == [
        "app.train: error: --target_accuracy=1.5: a classification data set's headline is a "
        "share: at most 1"], result.stderr[-2000:]
    run(train_command("--flagfile=configs/topology_cpu.cfg", "--volume_size=8",
                      "--num_volumes=2", "--steps_per_epoch=1", "--epochs=3",
                      "--warmup_epochs=0", "--target_accuracy=1e9",
                      f"--data_dir={tmp_path / 'designs'}", f"--model_dir={tmp_path / 'run'}"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["target_reached"]["epoch"] == 1 and results["epochs_completed"] == 1
