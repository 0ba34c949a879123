"""The course's 3D application: synthetic seismic surveys (input_pipeline.seismic), their
patches, the U-Nets and segmentation's loss and exact metrics (models.segmentation)."""
import json
import os

import numpy as np
import pytest
from conftest import (PYTHON, error_lines, mpirun, read_log, run, run_concurrently,
                      train_command)
from scipy import ndimage
from test_train import checkpoint_values

import input_pipeline
import models
from app.horovod import keras, tf
from input_pipeline import seismic
from models import segmentation

SEEDS = ([1, 0, 0], [2, 0, 5], [3, 1, 7])


def offsets(layers):
    """Voxels beside a jump of the layers' depth between neighbours: where reflectors are
    offset (a smooth fold changes them by about the same from voxel to voxel)."""
    found = np.zeros(layers.shape, bool)
    for axis in range(3):
        steps = np.abs(np.diff(layers.astype(np.float64), axis=axis))
        jump = steps > np.median(steps) + 1.0
        before, after = [slice(None)] * 3, [slice(None)] * 3
        before[axis], after[axis] = slice(0, -1), slice(1, None)
        found[tuple(before)] |= jump
        found[tuple(after)] |= jump
    return found


def test_a_survey_is_its_seed_standardized_and_labelled_where_reflectors_are_offset():
    for seed in SEEDS:
        survey = seismic.synthetic_survey(32, seed)
        again = seismic.synthetic_survey(32, seed)
        for field in ("seismic", "faults", "facies", "layers"):
            np.testing.assert_array_equal(getattr(survey, field), getattr(again, field))
        assert abs(survey.seismic.mean()) < 1e-5 and abs(survey.seismic.std() - 1) < 1e-5
        offset = offsets(survey.layers)
        # offsets only at faults, and (but where a later fault moved an earlier one away
        # from its offset) faults only at offsets
        near_faults = ndimage.binary_dilation(survey.faults, None, 2)
        assert offset.any() and not (offset & ~near_faults).any()
        near_offset = ndimage.binary_dilation(offset, None, 2)[survey.faults.astype(bool)]
        assert near_offset.mean() > 0.8, (seed, near_offset.mean())
    other = seismic.synthetic_survey(32, [1, 0, 1])
    assert not np.array_equal(other.seismic, seismic.synthetic_survey(32, SEEDS[0]).seismic)


def test_facies_are_the_layers_binned_and_move_with_the_folding():
    survey = seismic.synthetic_survey(32, SEEDS[1], num_facies=6)
    layers = survey.layers.astype(np.float64)
    expected = np.minimum((layers - layers.min()) / np.ptp(layers) * 6, 5).astype(np.uint8)
    np.testing.assert_array_equal(survey.facies, expected)
    assert set(np.unique(survey.facies)) == set(range(6))
    unfaulted = ~survey.faults.any(axis=2)  # traces no fault crosses
    assert unfaulted.sum() > 10
    traces = survey.facies[unfaulted]
    assert (np.diff(traces.astype(int), axis=1) >= 0).all()  # deeper, younger never
    # a boundary between facies is folded: its depth changes from trace to trace
    depth = np.argmax(traces >= 3, axis=1)
    assert depth.max() - depth.min() >= 2, depth


def test_a_patch_keeps_seismic_and_label_aligned_under_every_flip_and_rotation():
    volume = tf.random.stateless_normal([12, 12, 10, 1], [0, 1])
    label = tf.cast(volume > 0.3, tf.float32)
    found = set()
    for index in range(64):
        seismic_patch, label_patch = seismic.augmented_patch(volume, label, 8, [7, index])
        assert seismic_patch.shape == label_patch.shape == (8, 8, 8, 1)
        np.testing.assert_array_equal(label_patch.numpy(), (seismic_patch > 0.3).numpy())
        found.add(_symmetry(volume.numpy()[..., 0], seismic_patch.numpy()[..., 0]))
    assert len(found) == 8, found  # the eight symmetries of the square, inline x crossline
    section, section_label = seismic.augmented_patch(volume[0], label[0], 8, [7, 0])
    np.testing.assert_array_equal(section_label.numpy(), (section > 0.3).numpy())


def _symmetry(volume, patch):
    """Which of the square's symmetries (in the inline-crossline plane) makes `patch` a
    crop of `volume`."""
    for turns in range(4):
        for flip in (False, True):
            turned = np.rot90(volume, turns, axes=(0, 1))
            turned = turned[::-1] if flip else turned
            for i in range(turned.shape[0] - 7):
                for j in range(turned.shape[1] - 7):
                    for k in range(turned.shape[2] - 7):
                        if np.array_equal(turned[i:i + 8, j:j + 8, k:k + 8], patch):
                            return turns, flip
    raise AssertionError("the patch is no crop of the volume under any symmetry")


def test_the_faultseg3d_unet_is_the_published_one_and_divides_its_input_by_8():
    model = models.build("unet3d", (16, 16, 16, 1), 1)
    assert model.count_params() == 1_459_585  # FaultSeg3D's
    assert model.output_shape == (None, 16, 16, 16, 1)
    assert models.BUILDERS["unet3d"].downsampling == 8
    small = models.build("unet2d_small", (8, 8, 1), 5)
    assert small.output_shape == (None, 8, 8, 5)
    with pytest.raises(ValueError):  # 12 is not divisible by 8
        models.build("unet3d", (12, 16, 16, 1), 1)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:  # the output layer computes in float32 under mixed precision
        assert models.build("unet3d_small", (8, 8, 8, 1), 3).output.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_a_unet_recomputing_its_levels_computes_the_same_outputs_and_gradients():
    keras.mixed_precision.set_global_policy("float64")
    try:
        volume = tf.random.stateless_normal([2, 8, 8, 8, 1], [0, 3], dtype=tf.float64)
        found = []
        for recompute in (False, True):
            model = models.build("unet3d_small", (8, 8, 8, 1), 1, seed=4, recompute=recompute)
            with tf.GradientTape() as tape:
                output = model(volume, training=True)
                loss = tf.reduce_sum(output ** 2)
            found.append((output, tape.gradient(loss, model.trainable_variables)))
        assert any(isinstance(layer, models.unet.Level) and layer.recompute
                   for layer in model.layers)
        np.testing.assert_allclose(found[1][0], found[0][0], rtol=1e-12)
        assert len(found[1][1]) == len(found[0][1]) == 22  # 11 convolutions
        for plain, recomputed in zip(found[0][1], found[1][1]):
            np.testing.assert_allclose(recomputed, plain, rtol=1e-10, atol=1e-14)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_the_balanced_loss_weights_each_example_by_its_own_class_shares():
    labels = np.zeros([2, 4, 4, 4, 1], np.float32)
    labels[0, 0] = 1  # a quarter of example 0 are faults, none of example 1
    outputs = np.full(labels.shape, 0.3, np.float32)
    loss = segmentation.loss("balanced_crossentropy")(labels, outputs).numpy()
    beta = 0.75  # the negatives' share in example 0
    expected_0 = -(beta * 0.25 * np.log(0.3) + (1 - beta) * 0.75 * np.log(0.7))
    np.testing.assert_allclose(loss, [expected_0, -np.log(0.7) * 0.0], rtol=1e-6, atol=1e-7)
    # the loss of an example does not depend on the others in its batch
    alone = segmentation.loss("balanced_crossentropy")(labels[:1], outputs[:1]).numpy()
    np.testing.assert_allclose(alone, loss[:1], rtol=1e-6)
    dice = segmentation.loss("dice")(labels, np.where(labels > 0, 1.0, 0.0)).numpy()
    np.testing.assert_allclose(dice[0], 0.0, atol=1e-6)


def test_the_scores_of_summed_counts_are_those_of_all_the_voxels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, [3, 8, 8, 8, 1]).astype(np.float32)
    outputs = rng.uniform(size=labels.shape).astype(np.float32)
    whole = segmentation.ConfusionCounts(1)
    whole.update_state(labels, outputs)
    parts = [segmentation.ConfusionCounts(1) for _ in range(2)]
    parts[0].update_state(labels[:2], outputs[:2])  # unequal shards: 2 volumes and 1
    parts[1].update_state(labels[2:], outputs[2:])
    summed = segmentation.scores(parts[0].counts + parts[1].counts, 2)
    predicted, truth = outputs > 0.5, labels > 0.5
    tp, fp, fn = (predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()
    expected = {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                "precision": tp / (tp + fp), "recall": tp / (tp + fn)}
    for name, value in expected.items():
        assert float(summed[name]) == pytest.approx(value, rel=1e-12)
        assert float(whole.result()[name]) == pytest.approx(value, rel=1e-12)
    shard_mean = np.mean([float(part.result()["iou"]) for part in parts])
    assert abs(shard_mean - expected["iou"]) > 1e-6  # what averaging the ranks' IoUs gives
    facies = segmentation.scores(np.array([[5, 1, 0], [2, 6, 0], [0, 0, 0]]), 3)
    assert float(facies["pixel_accuracy"]) == pytest.approx(11 / 14)
    assert float(facies["mean_class_accuracy"]) == pytest.approx((5 / 6 + 6 / 8) / 2)
    iou = [5 / 8, 6 / 9]
    assert float(facies["mean_iou"]) == pytest.approx(np.mean(iou))
    assert float(facies["fw_iou"]) == pytest.approx(6 / 14 * iou[0] + 8 / 14 * iou[1])


SMALL_SURVEYS = ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=16",
                 "--patch_size=16", "--num_volumes=30", "--global_batch_size=4",
                 "--epochs=12", "--steps_per_epoch=1", "--deterministic", "--float64"]


@pytest.mark.distributed
def test_the_unet_trains_alike_on_1_and_2_processes_with_exact_validation_counts(tmp_path):
    """The 3D U-Net with the experiment's own schedule (2 warmup epochs, then cosine; here 12
    epochs of one step) and
    loss, at a global batch of 4, in float64: 1 and 2 processes end with the same weights;
    on 2 processes the 3 validation volumes are split 2 and 1, and the logged IoU and Dice
    are those of all three volumes' voxels, as one process evaluates them."""
    for processes in (1, 2):
        command = train_command(*SMALL_SURVEYS, f"--model_dir={tmp_path / str(processes)}")
        run([*mpirun(processes), *command] if processes > 1 else command)
    logs = [read_log(tmp_path / str(processes)) for processes in (1, 2)]
    assert len(logs[0]) == 12 and [row["lr"] for row in logs[0]] == [row["lr"] for row in logs[1]]
    for key in ("loss", "val_loss", "val_iou", "val_dice"):
        assert float(logs[1][-1][key]) == pytest.approx(float(logs[0][-1][key]), rel=1e-9), key
    one, two = (checkpoint_values(tmp_path / str(p), 12, "model/") for p in (1, 2))
    assert len(one) >= 22 and one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-10, atol=1e-12, err_msg=name)
    results = json.loads((tmp_path / "2" / "results.json").read_text())
    assert {"iou", "dice", "precision", "recall", "mean_iou"} <= set(results["final_metrics"])
    # TensorBoard's slices run: each epoch's slices of a validation volume
    images = []
    events = tmp_path / "2" / "tensorboard" / "slices"
    for path in sorted(events.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            images += [(event.step, value) for value in event.summary.value
                       if value.tag == "slices"]
    assert [step for step, _ in images] == list(range(1, 13))
    picture = tf.image.decode_png(images[-1][1].tensor.string_val[2])  # width, height, PNG
    assert picture.shape[0] > 100 and picture.shape[1] > 200  # 3 rows, 3 columns


def test_the_unet_learns_faults_beyond_what_chance_gives_and_stops_at_its_target(tmp_path):
    """120 steps of the CPU experiment on 24^3 surveys: the validation IoU well above the
    chance level, the IoU of calling every voxel a fault (the share of faults; no guess
    that ignores the seismic does better), which the ~1-step runs above never show. The
    same run with --target_accuracy between two epochs' IoUs stops at the later one: on a
    fault segmentation the target is the validation IoU, which results.json names."""
    surveys = ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=24",
               "--patch_size=16", "--num_volumes=16", "--global_batch_size=4", "--epochs=10",
               "--steps_per_epoch=12", "--warmup_epochs=1", "--deterministic",
               "--mixed_precision=float32"]  # bfloat16 beside it: test_precision.py
    run(train_command(*surveys, f"--model_dir={tmp_path / 'whole'}"))
    validation = input_pipeline.load("seismic_faults", "validation", volume_size=24,
                                     patch_size=16, num_volumes=16, seed=42)
    labels = np.concatenate([label.numpy().ravel() for _, label in
                             input_pipeline.evaluation_dataset(
                                 validation, rank=0, size=1, batch_size=2)])
    chance = labels.mean()  # 0.27 at seed 42
    log = read_log(tmp_path / "whole")
    last = log[-1]
    assert float(last["val_iou"]) > chance + 0.15, (last["val_iou"], chance)  # measured: 0.50
    assert float(last["val_precision"]) > 2 * chance, (last["val_precision"], chance)

    ious = [float(row["val_iou"]) for row in log]
    stop = next(epoch for epoch in range(2, len(ious) - 1)
                if ious[epoch] > max(ious[:epoch]) + 0.01)  # a new best, by a margin
    target = (ious[stop] + max(ious[:stop])) / 2
    run(train_command(*surveys, f"--target_accuracy={target}",
                      f"--model_dir={tmp_path / 'target'}"))
    stopped = [float(row["val_iou"]) for row in read_log(tmp_path / "target")]
    assert stopped == pytest.approx(ious[:stop + 1], rel=1e-6)
    results = json.loads((tmp_path / "target" / "results.json").read_text())
    assert results["headline_metric"] == "val_iou"
    assert results["target_reached"]["epoch"] == results["epochs_completed"] == stop + 1


TINY_SURVEYS = ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=16",
                "--patch_size=16", "--num_volumes=4", "--global_batch_size=2",
                "--steps_per_epoch=1", "--validation_steps=1", "--warmup_epochs=0"]


@pytest.mark.distributed
def test_checkpoints_cross_between_recomputed_and_plain_levels(tmp_path):
    """One checkpoint layout whatever --recompute: a recomputing run resumes without it,
    initializes a plain run, and app.predict applies it."""
    recomputed = tmp_path / "recomputed"
    run(train_command(*TINY_SURVEYS, "--epochs=1", "--recompute", f"--model_dir={recomputed}"))
    run(train_command(*TINY_SURVEYS, "--epochs=2", f"--model_dir={recomputed}"))
    assert [row["epoch"] for row in read_log(recomputed)] == ["0", "1"]
    initialized = tmp_path / "initialized"
    run(train_command(*TINY_SURVEYS, "--epochs=1", "--learning_rate=0",
                      f"--init_checkpoint={recomputed / 'checkpoints' / 'epoch-2'}",
                      f"--model_dir={initialized}"))
    values = [checkpoint_values(folder, epoch, "model/")
              for folder, epoch in ((recomputed, 2), (initialized, 1))]
    kernels = [name for name in values[0] if name.endswith("kernel")]
    assert len(kernels) == 11 and values[0].keys() == values[1].keys()
    for name in kernels:  # learning rate 0: the initial weights are the checkpoint's
        np.testing.assert_array_equal(values[1][name], values[0][name])
    np.save(tmp_path / "cube.npy", seismic.synthetic_survey(16, [9, 9, 9]).seismic)
    run([PYTHON, "-m", "app.predict", f"--model_dir={recomputed}",
         f"--input={tmp_path / 'cube.npy'}", f"--output_dir={tmp_path / 'predicted'}"])
    assert np.load(tmp_path / "predicted" / "probability.npy").shape == (16, 16, 16)


def test_a_file_cache_is_read_only_by_runs_of_the_data_that_made_it(tmp_path):
    """--cache=PATH written by a run of seed 1 and then given to a run of seed 2: the second
    trains on its own surveys, as a run without the file cache does (not on seed 1's)."""
    surveys = ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=8",
               "--patch_size=8", "--num_volumes=4", "--global_batch_size=2", "--epochs=1",
               "--steps_per_epoch=2", "--warmup_epochs=0", "--deterministic", "--float64"]
    cache = f"--cache={tmp_path / 'cache'}"

    def train(name, *flags):
        run(train_command(*surveys, *flags, f"--model_dir={tmp_path / name}"))
        return read_log(tmp_path / name)[0]
    run_concurrently(lambda case: train(*case), [("seed1", "--seed=1", cache),
                                                 ("uncached", "--seed=2")])
    cached, uncached = train("seed2", "--seed=2", cache), read_log(tmp_path / "uncached")[0]
    for key in ("loss", "val_loss"):
        assert float(cached[key]) == pytest.approx(float(uncached[key]), rel=1e-12), key
    assert len(list(tmp_path.glob("cache.seismic_faults-train-unsharded.*.index"))) == 2


def test_bad_seismic_flags_are_refused_with_one_line(tmp_path):
    cases = [(["--patch_size=48"],
              "--patch_size=48: is larger than the volumes (--volume_size=40)"),
             (["--patch_size=30"], "--patch_size=30: gives patches of 30x30x30, which "
                                   "--model=unet3d_small's down-sampling by 4 does not divide"),
             (["--dataset=digits"], "--model=unet3d_small: is a segmentation model, "
                                    "--dataset=digits a classification data set"),
             (["--pipeline_stages=2"], "--pipeline_stages=2: --model=unet3d_small has 1 block "
                                       "(a pipeline cuts it only where one tensor passes), "
                                       "so at most 1 stage")]
    for extra, line in cases:
        result = run(train_command("--flagfile=configs/seismic_faults_cpu.cfg", *extra,
                                   f"--model_dir={tmp_path}"), check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert error_lines(result) == [f"app.train: error: {line}"]
    assert not os.listdir(tmp_path)


def test_the_seismic_sources_give_patches_and_central_validation_volumes():
    options = dict(volume_size=16, patch_size=8, num_volumes=4, seed=3)
    train = input_pipeline.load("seismic_faults", "train", **options)
    validation = input_pipeline.load("seismic_facies", "validation", num_facies=5, **options)
    batch = next(iter(input_pipeline.training_dataset(
        train, rank=0, size=1, batch_size=2, steps_per_epoch=1, seed=3)))
    assert batch[0].shape == batch[1].shape == (2, 8, 8, 8, 1)
    assert set(np.unique(batch[1])) <= {0.0, 1.0}
    volumes = list(input_pipeline.evaluation_dataset(validation, rank=0, size=1, batch_size=8))
    assert len(volumes) == 1 and volumes[0][0].shape == (2, 8, 8, 8, 1)
    assert volumes[0][1].shape == (2, 8, 8, 8) and volumes[0][1].dtype == tf.int64
    survey = seismic.synthetic_survey(16, [3, 1, 0], num_facies=5)
    np.testing.assert_array_equal(volumes[0][0][0, ..., 0], survey.seismic[4:12, 4:12, 4:12])
    np.testing.assert_array_equal(volumes[0][1][0], survey.facies[4:12, 4:12, 4:12])
    sections = input_pipeline.load("seismic_facies_sections", "train", **options)
    section = next(iter(input_pipeline.training_dataset(
        sections, rank=0, size=1, batch_size=2, steps_per_epoch=1, seed=3)))
    assert section[0].shape == (2, 8, 8, 1) and section[1].shape == (2, 8, 8)
