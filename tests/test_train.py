"""app.train end to end: the default experiment, loss integrity across process counts, resume,
every experiment from its flagfile, and flag errors."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from conftest import (INTEGRITY_FLAGS, PYTHON, error_lines, mpirun, read_log, run,
                      run_concurrently, terminal_output, train_command)

# A few steps: one short epoch, so no warmup and a schedule that fits in it.
SHORT = ["--epochs=1", "--steps_per_epoch=2", "--validation_steps=1", "--warmup_epochs=0",
         "--lr_schedule=constant"]


def weights_and_slots(model_dir, epoch):
    """The model's weights and its optimizer's slots (Keras 3 keeps them apart)."""
    return {**checkpoint_values(model_dir, epoch, "model/"),
            **checkpoint_values(model_dir, epoch, "optimizer/_variables/")}


def checkpoint_values(model_dir, epoch, prefix="", folder="checkpoints"):
    """{path: value} of the variables of MODEL_DIR's epoch-EPOCH checkpoint whose path starts
    with `prefix`, each by its path in the checkpoint's object graph ("model/...",
    "optimizer/..."), not by its key: TensorFlow keys a variable by the first path it meets,
    and a Keras 3 model's weights are met first through its optimizer. The model's own
    optimizer (a child of a Keras 3 model) is left out of "model/"."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, folder, f"epoch-{epoch}"))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    top = prefix.split("/")[0]
    frontier = [(child.node_id, child.local_name) for child in graph.nodes[0].children
                if child.local_name == top or not top]
    found, seen = {}, {node_id for node_id, _ in frontier}
    while frontier:  # breadth first from `top`: each variable by its shortest path under it
        node_id, path = frontier.pop(0)
        for attribute in graph.nodes[node_id].attributes:
            found.setdefault(attribute.checkpoint_key, path)
        for child in graph.nodes[node_id].children:
            child_path = f"{path}/{child.local_name}"
            if child.node_id not in seen and child_path != "model/optimizer":
                seen.add(child.node_id)
                frontier.append((child.node_id, child_path))
    return {path: reader.get_tensor(key) for key, path in found.items()
            if path.startswith(prefix)}


@pytest.mark.distributed
def test_default_experiment_trains_on_two_processes_and_leaves_its_outputs(tmp_path):
    """What `make train` runs: digits_cnn on 2 processes through app.launch."""
    model_dir = tmp_path / "digits"
    result = run([PYTHON, "-m", "app.launch", "-np", "2", "--flagfile=configs/digits_cnn.cfg",
                  f"--model_dir={model_dir}"])
    assert result.stdout.splitlines()[0].startswith("mpirun -np 2 ")
    results = json.loads((model_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 64
    assert results["epochs_completed"] == 16
    assert results["val_accuracy"] >= 0.97
    assert results["loss"] < results["final_metrics"]["loss"] * 1.0001
    assert results["images_per_sec"] > 0 and results["wall_seconds"] > 0
    assert {"epoch-16.index", "checkpoint"} <= set(os.listdir(model_dir / "checkpoints"))
    for phase in ("train", "validation"):
        assert list((model_dir / "tensorboard" / phase).glob("events.out.tfevents.*"))
    log = read_log(model_dir)
    assert len(log) == 16
    # Rank 0 alone prints each epoch's logs once (Keras' verbose=2), with no progress bar.
    lines = result.stdout.splitlines()
    epochs = [index for index, line in enumerate(lines) if line.startswith("Epoch ")]
    assert [lines[index] for index in epochs] == [f"Epoch {e}/16" for e in range(1, 17)]
    for index, row in zip(epochs, log):
        assert f" - val_accuracy: {float(row['val_accuracy']):.4f}" in lines[index + 1]
    assert "ETA" not in result.stdout
    flagfile = (model_dir / "flags.cfg").read_text().splitlines()
    assert {"--experiment=digits_cnn", "--batch_size=32", "--model=cnn",
            f"--model_dir={model_dir}"} <= set(flagfile)


@pytest.mark.parametrize("benchmark", [False, True])
def test_one_process_on_a_terminal_shows_keras_progress_bar_unless_benchmarking(benchmark,
                                                                                tmp_path):
    """One process on a terminal gets Keras' bar; a benchmark gets the epoch lines (as rank 0
    of several processes does, tested above), so that the bar's per-step work is not timed."""
    output = terminal_output(train_command(
        "--flagfile=configs/digits_cnn.cfg", *SHORT, "--epochs=2", f"--model_dir={tmp_path}",
        *(["--benchmark"] if benchmark else [])))
    assert "Epoch 2/2" in output
    assert ("2/2\x1b[0m \x1b[32m━━━━" in output) is not benchmark  # Keras 3's bar, bold count
    assert ("2/2 - " in output) is benchmark


@pytest.mark.distributed
def test_launch_runs_horovodrun_with_gloo_on_a_host_list(tmp_path):
    result = run([PYTHON, "-m", "app.launch", "-np", "2", "--launcher=horovodrun",
                  "--hosts=localhost:2", "--flagfile=configs/linear_regression.cfg", *SHORT,
                  f"--model_dir={tmp_path}"])
    launched = result.stdout.splitlines()[0]
    assert " -np 2 --gloo " in launched and " -H localhost:2 " in launched
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 64


def per_step_learning_rates(model_dir):
    """The LR every training step ran with, from the run's TensorBoard events."""
    from app.studies.plot_runs import per_step_learning_rate
    return per_step_learning_rate(str(model_dir))


@pytest.mark.distributed
def test_same_global_batch_gives_the_same_weights_on_one_two_and_four_processes(
        integrity_runs):
    """digits_cnn with its own schedule (16 epochs: 2 of warmup, then cosine) at a global
    batch of 128, twice the reference batch, so that the warmup rises from 0.1 to 0.2: with
    --deterministic, 1, 2 and 4 processes see the same global batches and run the same LR at
    every step. Their gradients differ only by summation order (one mean over 128 examples
    against the average of means over 64 or 32). In float32 that is about 1e-7 relative a
    step, which training amplifies by an amount that depends on the CPU (after these 16
    steps: under 1e-5 on one machine, 1.4e-4 on another; BENCHMARKS.md), so the runs compute
    in float64 (--float64), where rounding stays near 1e-16: weights and momentum agree to
    1e-10, while the steps move them by far more. Anything the number of processes changed
    besides rounding (an LR, a batch, an average) would show a million times over."""
    one = weights_and_slots(integrity_runs[1], 16)
    earlier = weights_and_slots(integrity_runs[1], 14)
    rates = per_step_learning_rates(integrity_runs[1])
    assert sorted(rates) == list(range(1, 16 + 1))
    assert rates[1] == pytest.approx(0.15) and rates[2] == pytest.approx(0.2)  # warmup
    for processes in (2, 4):
        other = weights_and_slots(integrity_runs[processes], 16)
        assert one.keys() == other.keys() and len(one) == 16  # 8 weights, 8 momentum slots
        assert {value.dtype for value in other.values()} == {np.dtype("float64")}
        for name in one:
            np.testing.assert_allclose(other[name], one[name], rtol=0, atol=1e-10,
                                       err_msg=f"np={processes}: {name}")
        assert per_step_learning_rates(integrity_runs[processes]) == rates
    print("moved", max(np.abs(one[n] - earlier[n]).max() for n in one))
    assert max(np.abs(one[n] - earlier[n]).max() for n in one) > 1e-3


@pytest.mark.distributed
def test_the_step_schedule_after_the_warmup_gives_the_same_weights_on_one_and_two_processes(
        tmp_path):
    """The schedule of cifar10_resnet20 and imagenet_resnet50 (the LR x0.1 at given epochs,
    after their warmup, with Horovod's momentum correction at each drop) on the integrity
    runs above, np=1 and np=2 at once: drops at epochs 8 and 12 of digits_cnn's 16, after its
    own 2 warmup epochs. Those experiments' own runs take 160 and 90 epochs (over 500 s here
    even at one step an epoch), so the schedule is tested where a run takes seconds."""
    flags = [*INTEGRITY_FLAGS, "--lr_schedule=step", "--lr_decay_epochs=8,12"]
    run_concurrently(run, [
        train_command(*flags, f"--model_dir={tmp_path / 'np1'}"),
        [*mpirun(2), *train_command(*flags, f"--model_dir={tmp_path / 'np2'}")]])
    rates = per_step_learning_rates(tmp_path / "np1")
    assert rates[1] == pytest.approx(0.15) and rates[2] == pytest.approx(0.2)  # warmup
    assert [rates[step] for step in (8, 9, 12, 13, 16)] == pytest.approx(
        [0.2, 0.02, 0.02, 0.002, 0.002])
    assert per_step_learning_rates(tmp_path / "np2") == rates
    one, two = (weights_and_slots(tmp_path / name, 16) for name in ("np1", "np2"))
    assert one.keys() == two.keys() and len(one) == 16
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-10, err_msg=name)
    earlier = weights_and_slots(tmp_path / "np1", 14)  # the last 2 steps, at 0.002
    assert max(np.abs(one[name] - earlier[name]).max() for name in one) > 1e-4


@pytest.mark.distributed
def test_same_global_batch_gives_the_same_losses_in_bfloat16_on_one_and_two_processes(tmp_path):
    """The same runs as above in bfloat16 (float32 variables, bfloat16 compute), np=1 and
    np=2 at once. bfloat16 keeps 8 bits of mantissa: one mean over 128 examples and the
    average of two means over 64 round differently by about 2^-8 of a value, so the
    tolerance is bfloat16's: the first step's loss is the same, every step's training loss
    agrees to 2% (measured: 0.9% at most), and the LR is the same at every step. The
    weights are not compared: bfloat16's rounding parts them by as much as a step moves
    them (BENCHMARKS.md)."""
    flags = ["--flagfile=configs/digits_cnn.cfg", "--global_batch_size=128", "--deterministic",
             "--steps_per_epoch=1", "--validation_steps=1", "--summary_steps=1",
             "--mixed_precision=bfloat16"]
    run_concurrently(run, [
        train_command(*flags, f"--model_dir={tmp_path / 'np1'}"),
        [*mpirun(2), *train_command(*flags, f"--model_dir={tmp_path / 'np2'}")]])
    one, two = (read_log(tmp_path / name) for name in ("np1", "np2"))
    assert len(one) == len(two) == 16
    losses = [(float(a["loss"]), float(b["loss"])) for a, b in zip(one, two)]
    assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-6)
    for step, (np1_loss, np2_loss) in enumerate(losses, 1):
        assert np2_loss == pytest.approx(np1_loss, rel=0.02), step
    assert losses[-1][0] < 0.5 * losses[0][0]  # and it trained
    assert per_step_learning_rates(tmp_path / "np2") == per_step_learning_rates(tmp_path / "np1")
    assert json.loads((tmp_path / "np2" / "results.json").read_text())["precision"] == (
        "mixed_bfloat16")


@pytest.mark.distributed
def test_a_resume_inside_the_warmup_and_the_cosine_continues_the_same_steps(tmp_path):
    """digits_cnn's own schedule shape (warmup, then cosine) over 5 epochs of 8 steps, 4 of
    them warmup: resumed from the straight run's checkpoint after epoch 3 (inside the warmup,
    where the LR changes every step), the run logs the straight run's LR and losses and ends
    with its weights, momentum and step count: its first step corrects the momentum by the
    same ratio of LRs."""
    flags = ["--flagfile=configs/digits_cnn.cfg", "--global_batch_size=128", "--deterministic",
             "--steps_per_epoch=8", "--validation_steps=1", "--epochs=5", "--warmup_epochs=4",
             "--summary_steps=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*mpirun(2), *train_command(*flags, f"--model_dir={straight}")])
    (resumed / "checkpoints").mkdir(parents=True)
    for path in (straight / "checkpoints").glob("epoch-3.*"):
        (resumed / "checkpoints" / path.name).write_bytes(path.read_bytes())
    (resumed / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "epoch-3"\nall_model_checkpoint_paths: "epoch-3"\n')
    run([*mpirun(2), *train_command(*flags, f"--model_dir={resumed}")])

    rates = per_step_learning_rates(straight)
    assert rates[3 * 8 + 1] < rates[4 * 8] == pytest.approx(rates[4 * 8 + 1])  # warmup's end
    assert rates[5 * 8] < rates[4 * 8 + 1]  # the cosine
    assert per_step_learning_rates(resumed) == {step: rate for step, rate in rates.items()
                                                if step > 3 * 8}
    assert [row["epoch"] for row in read_log(resumed)] == ["3", "4"]
    for resumed_row, straight_row in zip(read_log(resumed), read_log(straight)[3:]):
        for key in ("lr", "loss", "val_loss"):
            assert float(resumed_row[key]) == pytest.approx(float(straight_row[key]), rel=1e-5)
    final_resumed, final_straight = (checkpoint_values(d, 5) for d in (resumed, straight))
    assert final_resumed["optimizer/_iterations"] == 5 * 8
    assert final_resumed.keys() == final_straight.keys()
    for name, value in final_straight.items():
        np.testing.assert_allclose(final_resumed[name], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


EXPERIMENT_RUNS = [
    ("digits_cnn", []),
    ("linear_regression", []),
    ("synthetic_resnet50", ["--image_size=32", "--batch_size=4"]),
    ("imagenet_resnet50", ["--image_size=32", "--batch_size=4"]),
    ("fashion_mnist_cnn", []),
    ("fashion_mnist_wrn", ["--batch_size=4"]),
    ("cifar10_resnet20", ["--batch_size=8"]),
    ("faultseg3d", ["--volume_size=16", "--num_volumes=2"]),
    ("seismic_faults_cpu", ["--volume_size=16", "--patch_size=16", "--num_volumes=4"]),
    # a target of mean IoU any model reaches: the run stops after its first of 2 epochs
    ("seismic_facies_sections", ["--volume_size=16", "--num_volumes=4", "--epochs=2",
                                 "--target_accuracy=1e-6"]),
    ("topology_cpu", ["--volume_size=8", "--num_volumes=4"]),
    ("topology_gpu64", ["--volume_size=8", "--num_volumes=2", "--batch_size=1"]),
    ("topology_gpu128", ["--volume_size=8", "--num_volumes=2"]),
]


def test_every_experiment_has_its_short_run():
    from app.experiments import EXPERIMENTS
    assert sorted(experiment for experiment, _ in EXPERIMENT_RUNS) == sorted(EXPERIMENTS)




@pytest.fixture(scope="module")
def experiment_runs(tmp_path_factory, digits_tfrecords):
    """Each EXPERIMENT_RUNS experiment's model_dir after a short run from its flagfile."""
    def run_experiment(case):
        experiment, extra = case
        model_dir = tmp_path_factory.mktemp(experiment)
        short = SHORT
        if experiment.startswith("topology"):  # its scores take every validation design
            short = [flag for flag in SHORT if not flag.startswith("--validation_steps")]
        flags = [f"--flagfile=configs/{experiment}.cfg", *short, *extra,
                 f"--model_dir={model_dir}"]
        if experiment == "imagenet_resnet50":
            flags.append(f"--data_dir={digits_tfrecords}")
        if experiment.startswith("topology"):  # its designs kept here, not the flagfile's
            flags.append(f"--data_dir={model_dir / 'designs'}")
        if experiment in ("fashion_mnist_wrn", "cifar10_resnet20"):
            command = [PYTHON, "tests/workers/train_with_mock_tfds.py", *flags,
                       f"--data_dir={model_dir}"]
        else:
            command = train_command(*flags)
        return run(command, check=False), model_dir
    return run_concurrently(run_experiment, EXPERIMENT_RUNS)


@pytest.mark.parametrize("case", range(len(EXPERIMENT_RUNS)),
                         ids=[experiment for experiment, _ in EXPERIMENT_RUNS])
def test_every_experiment_runs_from_its_flagfile(case, experiment_runs):
    experiment, extra = EXPERIMENT_RUNS[case]
    result, model_dir = experiment_runs[case]
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["experiment"] == experiment and results["epochs_completed"] == 1
    assert np.isfinite(results["loss"]) and np.isfinite(results["val_loss"])
    if experiment == "linear_regression":
        assert results["accuracy"] is None and "mae" in results["final_metrics"]
    if experiment.startswith(("faultseg", "seismic_faults")):
        assert {"iou", "dice", "val_iou", "val_dice"} <= set(results["final_metrics"])
    if experiment == "seismic_facies_sections":
        assert {"pixel_accuracy", "val_fw_iou"} <= set(results["final_metrics"])
        assert results["headline_metric"] == "val_mean_iou"
        assert results["target_reached"]["epoch"] == 1
    if experiment.startswith("topology"):
        assert results["headline_metric"] == "val_compliance_ratio"
        assert {"val_iou", "val_compliance_ratio_p90", "val_connected"} <= set(
            results["final_metrics"])
        trained = next(int(flag.split("=")[1]) for flag in extra
                       if flag.startswith("--num_volumes="))
        assert len(list((model_dir / "designs").glob("*/*.npz"))) == trained + 2


BAD_FLAGS = [
    ("digits_cnn", ["--batch_size=0"], "--batch_size=0"),
    ("digits_cnn", ["--seed=0"], "--seed=0"),
    ("digits_cnn", ["--batch_size=16", "--global_batch_size=64"], "--global_batch_size"),
    ("digits_cnn", ["--warmup_epochs=16"], "--warmup_epochs=16"),
    ("digits_cnn", ["--experiment=nope"], "--experiment"),
    ("digits_cnn", ["--no_such_flag=1"], "no_such_flag"),
    ("digits_cnn", ["--lr_schedule=step", "--lr_decay_epochs=5,3"], "--lr_decay_epochs"),
    ("digits_cnn", ["--batch_size=2000"], "--batch_size"),
    ("digits_cnn", ["--elastic"], "--elastic=True: needs horovodrun's elastic mode"),
    ("digits_cnn", ["--profile_steps=5,3"], "--profile_steps=5,3: must be two step numbers"),
    ("digits_cnn", ["--accumulation_steps=2", "--steps_per_epoch=5"],
     "--steps_per_epoch=5: must be a multiple of --accumulation_steps=2"),
    ("digits_cnn", ["--pipeline_stages=2"], "--pipeline_stages=2: must divide the 1 processes"),
    ("digits_cnn", ["--microbatches=5"],
     "--microbatches=5: must divide the batch of 32 per replica"),
    ("digits_cnn", ["--float64", "--mixed_precision=bfloat16"],
     "--float64=True: computes in float64, --mixed_precision=bfloat16 in another type"),
    ("digits_cnn", ["--float64", "--mixed_precision=float32"],
     "--float64=True: computes in float64, --mixed_precision=float32 in another type"),
    ("digits_cnn", ["--kfac_damping=0.1"],
     "--kfac_damping=0.1: is --optimizer=kfac's, not --optimizer=momentum's"),
    ("digits_cnn", ["--optimizer=kfac", "--shard_optimizer_state"],
     "--shard_optimizer_state=True: is not supported with --optimizer=kfac"),
    ("digits_cnn", ["--optimizer=kfac", "--shampoo_grafting=adagrad"],
     "--shampoo_grafting=adagrad: is --optimizer=shampoo's, not --optimizer=kfac's"),
    ("digits_cnn", ["--optimizer=kfac", "--kfac_damping=0"],
     "--kfac_damping=0.0: must be above 0"),
    ("digits_cnn", ["--optimizer=kfac", "--kfac_grad_workers=2"],
     "--kfac_grad_workers=2: must divide the 1 processes"),
    ("digits_cnn", ["--recompute", "--sync_batch_norm"],
     "--sync_batch_norm=True: is not supported with --pipeline_stages"),
    ("cifar10_resnet20", ["--data_dir=/does/not/exist"], "--data_dir"),
    ("cifar10_resnet20", ["--data_dir="], "--data_dir"),
    ("cifar10_resnet20", [], "--dataset=cifar10: cifar10 is not prepared"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """Each BAD_FLAGS command's result and model_dir."""
    def run_case(case):
        experiment, flags, _ = case
        folder = tmp_path_factory.mktemp("bad_flags")
        if experiment == "cifar10_resnet20" and not flags:
            flags = [f"--data_dir={folder}"]  # a folder without the prepared data set
        result = run(train_command(f"--flagfile=configs/{experiment}.cfg", *flags,
                                   f"--model_dir={folder / 'run'}"), check=False)
        return result, folder / "run"
    return run_concurrently(run_case, BAD_FLAGS)


@pytest.mark.parametrize("case", range(len(BAD_FLAGS)),
                         ids=[f"{e}-{' '.join(f)}" for e, f, _ in BAD_FLAGS])
def test_bad_flags_end_with_one_line_naming_the_flag(case, bad_flag_runs):
    named = BAD_FLAGS[case][2]
    result, model_dir = bad_flag_runs[case]
    assert result.returncode == 2, result.stderr[-2000:]
    errors = error_lines(result)
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert not model_dir.exists()  # nothing written


@pytest.mark.distributed
def test_a_bad_flag_stops_every_rank_without_a_hang(tmp_path):
    result = run([*mpirun(2), *train_command(
        "--flagfile=configs/digits_cnn.cfg", "--global_batch_size=33",
        f"--model_dir={tmp_path}")], timeout=120, check=False)
    assert result.returncode != 0
    assert result.stderr.count("--global_batch_size=33: the global batch of 33 is not divisible "
                               "by 2 processes") == 1  # from rank 0 only


@pytest.mark.distributed
def test_training_ends_at_the_target_accuracy_or_the_time_budget_on_every_rank(tmp_path):
    flags = ["--flagfile=configs/digits_cnn.cfg", "--epochs=60", "--validation_steps=2"]
    for name, stop in (("target", "--target_accuracy=0.8"), ("budget", "--time_budget=4")):
        run([*mpirun(2), *train_command(*flags, stop, f"--model_dir={tmp_path / name}")])
    results = json.loads((tmp_path / "target" / "results.json").read_text())
    log = read_log(tmp_path / "target")
    assert results["epochs_completed"] == len(log) == results["target_reached"]["epoch"] < 60
    assert float(log[-1]["val_accuracy"]) >= 0.8
    assert all(float(row["val_accuracy"]) < 0.8 for row in log[:-1])

    results = json.loads((tmp_path / "budget" / "results.json").read_text())
    seconds = [float(row["wall_seconds"]) for row in read_log(tmp_path / "budget")]
    assert results["epochs_completed"] == len(seconds) < 60 and results["target_reached"] is None
    assert seconds[-1] >= 4 and all(second < 4 for second in seconds[:-1])
    assert seconds == sorted(seconds)


def evaluate(model_dir, epoch, source, datasets):
    """(loss, accuracy) of the cnn checkpointed after `epoch`, evaluated in this process on
    the examples of all `datasets` (of `source`) together."""
    import models
    from app import optimizers, tasks
    model = models.build("cnn", source.feature_shape, source.num_outputs,
                         input_scaling=source.input_scaling)
    tf.train.Checkpoint(model=model).restore(
        os.path.join(model_dir, "checkpoints", f"epoch-{epoch}")).expect_partial()
    tasks.compile_for(model, optimizers.build("sgd", 0.1), source.task, source.num_outputs)
    examples = datasets[0]
    for dataset in datasets[1:]:
        examples = examples.concatenate(dataset)
    return model.evaluate(examples, verbose=0)


@pytest.mark.distributed
@pytest.mark.parametrize("validation_steps", [None, 2])
def test_validation_metrics_are_those_of_every_example_the_ranks_evaluated(
        validation_steps, tmp_path, digits_tfrecords):
    """3 processes on 4 validation files of 90 digits each: rank 0 evaluates 180 of them,
    the others 90. The run's val_loss and val_accuracy are those of one process evaluating
    the same weights on the examples the ranks evaluated: the whole split, or with
    --validation_steps=2 each rank's first 2 batches. The mean of the ranks' means is not."""
    import input_pipeline
    flags = ["--flagfile=configs/imagenet_resnet50.cfg", "--model=cnn", "--image_size=8",
             "--batch_size=16", "--epochs=1", "--steps_per_epoch=10", "--weight_decay=0",
             "--warmup_epochs=0", "--lr_schedule=constant", f"--data_dir={digits_tfrecords}",
             "--mixed_precision=float32", f"--model_dir={tmp_path}"]  # as evaluate() computes
    if validation_steps:
        flags.append(f"--validation_steps={validation_steps}")
    run([*mpirun(3), *train_command(*flags)])
    source = input_pipeline.load("imagenet", "validation", data_dir=str(digits_tfrecords),
                                 image_size=8)
    shards = [input_pipeline.evaluation_dataset(source, rank=rank, size=3, batch_size=16,
                                                repeat=validation_steps is not None)
              for rank in range(3)]
    if validation_steps:
        shards = [shard.take(validation_steps) for shard in shards]
    loss, accuracy = evaluate(tmp_path, 1, source, shards)
    logged = read_log(tmp_path)[-1]
    assert float(logged["val_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(logged["val_accuracy"]) == pytest.approx(accuracy, rel=1e-5)
    if not validation_steps:
        rank_means = [evaluate(tmp_path, 1, source, [shard])[0] for shard in shards]
        assert abs(np.mean(rank_means) - loss) > 1e-4 * loss, (rank_means, loss)
