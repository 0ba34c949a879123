"""Spatial parallelism (app.parallel.spatial, --spatial_parts): slabs compute what the whole model
computes, training on slabs ends where one process ends, one checkpoint format, a signal
mid-epoch, each rank's memory, and the refusals."""
import json
import shutil

import numpy as np
import pytest

from conftest import (PYTHON, error_lines, horovodrun, mpirun, read_log, run, run_concurrently,
                      run_study, train_command)
from input_pipeline import seismic
from test_fault_tolerance import resumed_after_a_signal_mid_epoch
from test_predict import predict_command
from test_train import checkpoint_values

import tensorflow as tf


def _spatial_check(tmp_path, parts, *policy):
    """Each rank's cases of tests/workers/spatial_check.py at P=`parts` (under `policy`),
    each with the whole model's variables and its slab of the example."""
    run([*mpirun(parts), PYTHON, "tests/workers/spatial_check.py", str(tmp_path), *policy])
    by_rank = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(parts)]
    for cases in by_rank:
        assert set(cases) == {"stack3d", "stack2d", "unet3d", "unet3d_recompute"}
        for name, case in cases.items():
            assert case["variables"], name
            assert case["slab_shape"][0] * parts in (16, 32), name
    return by_rank


@pytest.mark.distributed
@pytest.mark.parametrize("parts", [2, 4])
def test_slabs_give_the_whole_models_outputs_and_gradients(parts, tmp_path):
    """tests/workers/spatial_check.py in float64: a 3D stack of convolutions (kernels 3 and
    5, strided, anisotropic, a `valid` strided one of one plane along the slabs' axis) with
    pooling and upsampling, a 2D stack with batch normalization, Keras' pooling, a strided
    even kernel, a dilated one and a skip connection, FaultSeg3D's U-Net and a recomputing
    U-Net, each split into `parts` slabs: every rank's slab of the output, the weights'
    gradients summed over the ranks and the input's gradient equal the whole model's on the
    whole batch to 1e-10, with the whole model's variables; the split model's Keras clone
    (halo convolutions and the group's batch normalization from their configs) computes
    the split model's output."""
    for cases in _spatial_check(tmp_path, parts):
        for name, case in cases.items():
            for measure in ("output", "weights", "input", "clone"):
                assert case[measure] < 1e-10, (name, measure, case)


@pytest.mark.distributed
def test_bfloat16_slabs_give_the_whole_models_outputs_to_bfloat16s_precision(tmp_path):
    """The same models' P=2 slabs computing in mixed bfloat16 (the halos cross as bfloat16
    values, in float32: Horovod's alltoall takes no bfloat16): every rank's slab of the
    output is within 2^-5 of the whole float64 model's largest output value. bfloat16 keeps
    8 significant bits (a rounding of 2^-8 per operation), and each model rounds its input,
    weights and each layer's result, some 8 times in a row (measured: 0.006); halos of zeros
    in place of the neighbours' planes miss the bound on every model (measured: 0.04 to
    0.22). The gradients, sums of many terms of both signs, cancel too far at bfloat16's
    precision for a bound (the float64 test checks their halos)."""
    for cases in _spatial_check(tmp_path, 2, "mixed_bfloat16"):
        for name, case in cases.items():
            assert case["output"] < 2 ** -5 and case["clone"] == 0, (name, case)


# The seismic experiment's schedule (2 warmup epochs, then cosine) shortened to 8 epochs of
# one step, on 16^3 volumes, in float64.
SURVEYS = ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=16", "--patch_size=16",
           "--num_volumes=30", "--global_batch_size=4", "--steps_per_epoch=1",
           "--deterministic", "--float64", "--summary_steps=1"]


def _train(model_dir, processes, *flags):
    command = train_command(*SURVEYS, f"--model_dir={model_dir}", *flags)
    return run([*mpirun(processes), *command] if processes > 1 else command)


def _checkpoint_values(model_dir, epoch):
    """{name: value} of every float variable of the run's epoch-`epoch` checkpoint: the
    model's and the optimizer's."""
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / f"epoch-{epoch}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if ("model/" in name or "optimizer/" in name)
            and reader.get_tensor(name).dtype.kind == "f"}


def _assert_same_values(found, expected):
    assert found.keys() == expected.keys() and len(expected) >= 30
    for name in expected:
        np.testing.assert_allclose(found[name], expected[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def _slices_image(model_dir):
    events = model_dir / "tensorboard" / "slices"
    images = [value.tensor.string_val[2] for path in sorted(events.glob("events.out.*"))
              for event in tf.compat.v1.train.summary_iterator(str(path))
              for value in event.summary.value if value.tag == "slices"]
    return tf.image.decode_png(images[-1]).numpy()


@pytest.mark.distributed
def test_training_on_slabs_ends_with_one_processs_weights_and_checkpoints_cross_over(tmp_path):
    """At a global batch of 4 with the experiment's loss, 4 epochs: P=2 on 2 processes ends
    with one process's weights and Adam's moments (1e-10) and logs its loss and exact
    validation scores; one process's checkpoint after epoch 2 resumed by P=2 x R=2 on 4
    processes, and a P=2 checkpoint after epoch 2 resumed by one process that recomputes its
    levels, end there too (one checkpoint format). TensorBoard's slices of the P=2 run are
    the whole volume's."""
    epochs = "--epochs=4"
    run_concurrently(lambda case: _train(*case), [(tmp_path / "one", 1, epochs),
                                                  (tmp_path / "slabs", 2, epochs,
                                                   "--spatial_parts=2")])
    for run_dir, resumed_from in (("one_then_hybrid", "one"), ("slabs_then_one", "slabs")):
        shutil.copytree(tmp_path / resumed_from, tmp_path / run_dir)
        for path in (tmp_path / run_dir / "checkpoints").glob("epoch-[34].*"):
            path.unlink()  # as if the run had stopped after epoch 2 of its 4
    hybrid, resumed = run_concurrently(
        lambda case: _train(*case),
        [(tmp_path / "one_then_hybrid", 4, epochs, "--spatial_parts=2"),
         (tmp_path / "slabs_then_one", 1, epochs, "--recompute")])
    for resumed_run in (hybrid, resumed):
        assert "Epoch 3/4" in resumed_run.stdout and "Epoch 2/4" not in resumed_run.stdout

    reference = _checkpoint_values(tmp_path / "one", 4)
    for run_dir in ("slabs", "one_then_hybrid", "slabs_then_one"):
        _assert_same_values(_checkpoint_values(tmp_path / run_dir, 4), reference)
    one, slabs = read_log(tmp_path / "one"), read_log(tmp_path / "slabs")
    for key in ("val_iou", "val_dice", "lr"):  # from exact counts
        assert float(slabs[-1][key]) == pytest.approx(float(one[-1][key]), rel=1e-9), key
    for key in ("loss", "val_loss"):  # Keras' running means, kept in float32: a rounding
        assert float(slabs[-1][key]) == pytest.approx(float(one[-1][key]), rel=1e-6), key
    results = json.loads((tmp_path / "slabs" / "results.json").read_text())
    assert results["parallelism"] == "spatial" and results["spatial_parts"] == 2
    assert len(results["peak_memory_mb_by_rank"]) == 2
    hybrid_results = json.loads((tmp_path / "one_then_hybrid" / "results.json").read_text())
    assert hybrid_results["world_size"] == 4 and hybrid_results["global_batch_size"] == 4
    whole, from_slabs = _slices_image(tmp_path / "one"), _slices_image(tmp_path / "slabs")
    assert whole.shape == from_slabs.shape
    assert np.mean(np.abs(whole.astype(float) - from_slabs)) < 0.5


@pytest.mark.distributed
def test_slabs_compose_with_accumulation_steps(tmp_path):
    """--accumulation_steps=2 (Horovod's optimizer averages two batches per update) at P=2
    ends with one process's weights at the same flags (float64, 1e-10)."""
    accumulated = ["--epochs=4", "--accumulation_steps=2", "--steps_per_epoch=2"]
    _train(tmp_path / "one", 1, *accumulated)
    _train(tmp_path / "slabs", 2, *accumulated, "--spatial_parts=2")
    _assert_same_values(_checkpoint_values(tmp_path / "slabs", 4),
                        _checkpoint_values(tmp_path / "one", 4))


@pytest.mark.distributed
def test_init_checkpoint_starts_slabs_from_another_runs_weights(tmp_path):
    """A one-process run's checkpoint initializes a P=2 run (--init_checkpoint reads it into
    a Keras clone of the slab's model): at LR 0 its one step leaves the weights where they
    started, which are the checkpoint's, exactly; app.predict applies the P=2 run."""
    once = ["--epochs=1", "--warmup_epochs=0"]
    _train(tmp_path / "start", 1, *once)
    _train(tmp_path / "slabs", 2, *once, "--spatial_parts=2", "--learning_rate=0",
           f"--init_checkpoint={tmp_path / 'start' / 'checkpoints' / 'epoch-1'}")
    start, slabs = ({name: value for name, value in checkpoint_values(
        tmp_path / run_dir, 1, "model/").items() if "OPTIMIZER_SLOT" not in name}
        for run_dir in ("start", "slabs"))
    assert start.keys() == slabs.keys() and len(start) == 22  # 11 kernels and biases
    for name in start:
        np.testing.assert_array_equal(slabs[name], start[name], err_msg=name)
    # app.predict restores the slabs' checkpoint into the whole model (a layout that did not
    # match would end it with MismatchError) and predicts as from the one-process run's
    np.save(tmp_path / "survey.npy", seismic.synthetic_survey(16, [7, 1, 0]).seismic)

    def predicted(run_dir):
        run(predict_command(f"--model_dir={tmp_path / run_dir}",
                            f"--input={tmp_path / 'survey.npy'}",
                            f"--output_dir={tmp_path / run_dir / 'predicted'}"))
        return np.load(tmp_path / run_dir / "predicted" / "probability.npy")
    from_start, from_slabs = run_concurrently(predicted, ("start", "slabs"))
    np.testing.assert_array_equal(from_slabs, from_start)


@pytest.mark.distributed
def test_a_signal_stops_a_spatial_run_mid_epoch_and_the_rerun_ends_as_if_uninterrupted(
        tmp_path):
    """SIGUSR1 to rank 1 (the second slab) in epoch 2: rank 0 saves the step both reached,
    the job exits 75, and the same command resumes there and ends with the uninterrupted
    run's weights (float64, 1e-10)."""
    flags = [*SURVEYS, "--spatial_parts=2", "--model=unet3d_small", "--epochs=3",
             "--warmup_epochs=1", "--steps_per_epoch=16", "--validation_steps=1",
             "--global_batch_size=2"]
    straight, stopped = resumed_after_a_signal_mid_epoch(flags, tmp_path, 120, 16)
    _assert_same_values(_checkpoint_values(stopped, 3), _checkpoint_values(straight, 3))


@pytest.mark.distributed
def test_what_cannot_be_split_is_refused_on_every_rank_with_one_line(tmp_path):
    """Before any training, exit 2 on both ranks and one line naming the flag and why: a
    model with a layer that mixes the slabs (named), slabs the model's down-sampling does
    not divide, --spatial_parts with --pipeline_stages, under Gloo, and a P that does not
    divide the processes."""
    cases = [
        (mpirun(2), ["--flagfile=configs/digits_cnn.cfg", "--spatial_parts=2"],
         ["--spatial_parts=2", "cannot split --model=cnn", "'flatten'", "Flatten"]),
        (mpirun(2), [*SURVEYS, "--spatial_parts=2", "--volume_size=12", "--patch_size=12"],
         ["--spatial_parts=2", "12 planes", "down-sampling by 4"]),
        (mpirun(2), [*SURVEYS, "--spatial_parts=2", "--pipeline_stages=2"],
         ["--pipeline_stages=2", "not supported with --spatial_parts"]),
        (horovodrun(2), [*SURVEYS, "--spatial_parts=2"], ["--spatial_parts=2", "needs MPI"]),
        (mpirun(2), [*SURVEYS, "--spatial_parts=4"],
         ["--spatial_parts=4", "must divide the 2 processes"]),
    ]
    for launcher, flags, expected in cases:
        model_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        result = run([*launcher, *train_command(*flags, f"--model_dir={model_dir}")],
                     timeout=120, check=False)
        errors = error_lines(result)
        exited_2 = (result.returncode == 2 if launcher[0] == "mpirun"  # horovodrun exits 1
                    else result.returncode == 1 and "Exit code: 2" in result.stderr)
        assert exited_2 and len(errors) == 1, (flags, result.stderr[-3000:])
        for part in expected:
            assert part in errors[0], (part, errors)
        assert "Epoch" not in result.stdout and not (model_dir / "checkpoints").exists()


def test_bilinear_upsampling_and_a_sequential_models_first_layer_are_refused_by_name():
    """Bilinear upsampling mixes the planes either side of a seam; a Sequential model lists
    no InputLayer, and its first layer (a `valid` convolution over 3 planes) is checked like
    any other: one line naming the layer and why."""
    import models  # noqa: F401 (app.horovod first, through app.parallel.spatial)
    from app.parallel import spatial
    from app.horovod import hvd_tensorflow, keras
    layers = keras.layers
    inputs = keras.Input((8, 4, 1))
    bilinear = keras.Model(inputs, layers.UpSampling2D(interpolation="bilinear",
                                                       name="smooth")(inputs))
    first = keras.Sequential([keras.Input((8, 4, 1)), layers.Conv2D(2, 3, name="first"),
                              layers.ReLU()])
    for model, named in ((bilinear, "'smooth' (UpSampling2D) interpolates (bilinear)"),
                         (first, "'first' (Conv2D) has valid padding")):
        with pytest.raises(spatial.SpatialError) as refused:
            spatial.split_model(model, 0, 2, hvd_tensorflow.global_process_set)
        assert named in str(refused.value) and "\n" not in str(refused.value)


def test_halo_bytes_are_the_planes_beside_each_inner_slab_boundary():
    """Two convolutions over a 3D input of 8 planes of 4x4: kernel 3 (one plane each way)
    on 1 channel, kernel 5 (two) on 2 channels; a 1x1 convolution sends none. P=4 slabs
    have 3 inner boundaries, forward and backward."""
    import models  # noqa: F401 (app.horovod first, through app.parallel.spatial)
    from app.parallel import spatial
    from app.horovod import keras
    inputs = keras.Input((8, 4, 4, 1))
    x = keras.layers.Conv3D(2, 3, padding="same")(inputs)
    x = keras.layers.Conv3D(2, 5, padding="same")(x)
    model = keras.Model(inputs, keras.layers.Conv3D(1, 1)(x))
    per_boundary = 2 * 16 * 1 + 4 * 16 * 2
    assert spatial.halo_bytes(model, 4, batch=3, bytes_per_value=4) == (
        2 * 3 * per_boundary * 3 * 4)
    assert spatial.same_padding(16, 4, 2) == (1, 1) and spatial.same_padding(16, 3, 1, 2) == (2, 2)


@pytest.mark.distributed
def test_the_spatial_study_tables_what_its_runs_measured(tmp_path):
    """app.studies.spatial_parallelism at its smallest: 16^3, P=2, two steps, then under a
    budget each mode trains within (a run that does not fit: test_sharded_optimizer's budget
    test)."""
    stdout, rows = run_study(tmp_path, "app.studies.spatial_parallelism", "spatial_study.csv",
                             "--sizes=16", "--parts=2", "--steps=2", "--warmup_steps=1",
                             "--memory_budget_mb=4000", "--budget_sizes=16")
    modes = ["one process", "recompute", "data parallel", "spatial P=2",
             "spatial P=2 + recompute"]
    assert [row["mode"] for row in rows] == modes + modes
    one = json.loads((tmp_path / "16-one-process" / "results.json").read_text())
    slabs = json.loads((tmp_path / "16-spatial-P=2" / "results.json").read_text())
    assert slabs["spatial_parts"] == 2 and len(slabs["peak_memory_mb_by_rank"]) == 2
    assert float(rows[3]["peak_memory_mb"]) == max(slabs["peak_memory_mb_by_rank"])
    assert float(rows[3]["cpu_per_voxel_over_one_process"]) == pytest.approx(
        slabs["cpu_ms_per_image"] / one["cpu_ms_per_image"])
    assert float(rows[0]["halo_mb_per_step"]) == 0 < float(rows[3]["halo_mb_per_step"]) < float(
        rows[4]["halo_mb_per_step"])  # recomputing levels send their halos again
    assert all(row["largest_size_within_budget"] == "16" for row in rows[5:])
    assert "16^3, spatial P=2: " in stdout and "under 4000 MiB per process" in stdout
    assert (tmp_path / "spatial_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
