"""Users' surveys: SEG-Y and NumPy volumes read, cut into blocks app.train reads
(input_pipeline.volumes), and a trained model applied to a whole survey by sliding windows
(app.predict), on one rank and two."""
import json
import os
import shutil

import numpy as np
import pytest
import segyio
from conftest import PYTHON, error_lines, mpirun, run, train_command

import input_pipeline
from app import survey_prediction
from input_pipeline import seismic, volumes

SHAPE = (24, 20, 16)


def write_segy(path, volume):
    """A post-stack SEG-Y of `volume` [inlines, crosslines, samples], inlines from 101,
    crosslines from 201, 4 ms samples."""
    segyio.tools.from_array3D(str(path), volume.astype(np.float32), iline=189, xline=193,
                              format=5, dt=4000)
    with segyio.open(str(path), "r+") as segy:  # the numbering a survey's headers carry
        for index, header in enumerate(segy.header):
            header.update({segyio.TraceField.INLINE_3D: 101 + index // volume.shape[1],
                           segyio.TraceField.CROSSLINE_3D: 201 + index % volume.shape[1]})


def survey(seed=5):
    return seismic.synthetic_survey(max(SHAPE), [seed, 2, 0])


def test_segy_and_numpy_volumes_read_back_and_damaged_ones_are_named(tmp_path):
    volume = survey().seismic[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    write_segy(tmp_path / "survey.segy", volume)
    np.save(tmp_path / "survey.npy", volume)
    for name in ("survey.segy", "survey.npy"):
        np.testing.assert_array_equal(volumes.read_volume(str(tmp_path / name)), volume)
    data = (tmp_path / "survey.segy").read_bytes()
    (tmp_path / "cut.segy").write_bytes(data[:len(data) // 2])
    (tmp_path / "noise.segy").write_bytes(os.urandom(4000))
    np.save(tmp_path / "flat.npy", volume[0])
    for name, reason in (("cut.segy", "not a readable 3D SEG-Y volume"),
                         ("noise.segy", "not a readable 3D SEG-Y volume"),
                         ("flat.npy", "an array of 2 dimensions"),
                         ("missing.segy", "no such file")):
        with pytest.raises(volumes.VolumeError, match=reason) as raised:
            volumes.read_volume(str(tmp_path / name))
        assert str(tmp_path / name) in str(raised.value)


def test_a_survey_and_its_labels_become_blocks_of_both_splits(tmp_path):
    made = survey()
    seismic_volume, faults = (getattr(made, field)[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
                              for field in ("seismic", "faults"))
    write_segy(tmp_path / "survey.segy", seismic_volume)
    np.save(tmp_path / "faults.npy", faults)
    counts = volumes.write_survey(str(tmp_path / "survey.segy"), str(tmp_path / "faults.npy"),
                                  str(tmp_path / "shards"), "faults", block_size=8,
                                  validation_fraction=0.34)
    # inline blocks start at 0, 8, 16 (the last one of 3 held out); crosslines at 0, 8, 12;
    # samples at 0, 8
    assert counts == {"train": 2 * 3 * 2, "validation": 1 * 3 * 2}
    described = json.loads((tmp_path / "shards" / volumes.SURVEY_FILE).read_text())
    assert (described["num_classes"], described["block_size"]) == (1, 8)
    train = input_pipeline.load("seismic_shards", "train", data_dir=str(tmp_path / "shards"),
                                patch_size=4)
    validation = input_pipeline.load("seismic_shards", "validation",
                                     data_dir=str(tmp_path / "shards"))
    assert (train.num_examples, train.feature_shape) == (12, (4, 4, 4, 1))
    blocks = list(input_pipeline.evaluation_dataset(validation, rank=0, size=1, batch_size=6))
    corners = [(16, j, k) for j in (0, 8, 12) for k in (0, 8)]
    found = sorted(blocks[0][0].numpy()[..., 0].tolist())
    scaled = seismic.survey_scaling(seismic_volume).apply(seismic_volume)  # as predict's
    expected = sorted(scaled[i:i + 8, j:j + 8, k:k + 8].tolist() for i, j, k in corners)
    assert found == expected
    batch = next(iter(input_pipeline.training_dataset(train, rank=0, size=1, batch_size=3,
                                                      steps_per_epoch=1, seed=1)))
    assert batch[0].shape == batch[1].shape == (3, 4, 4, 4, 1)

    np.save(tmp_path / "short.npy", faults[:-1])
    with pytest.raises(volumes.VolumeError, match="a label volume of shape"):
        volumes.write_survey(str(tmp_path / "survey.segy"), str(tmp_path / "short.npy"),
                             str(tmp_path / "other"), "faults", block_size=8)
    with pytest.raises(volumes.VolumeError, match="--block_size=32: larger than"):
        volumes.write_survey(str(tmp_path / "survey.segy"), str(tmp_path / "faults.npy"),
                             str(tmp_path / "other"), "faults", block_size=32)
    with pytest.raises(ValueError, match="--patch_size=16: larger than the blocks"):
        input_pipeline.load("seismic_shards", "train", data_dir=str(tmp_path / "shards"),
                            patch_size=16)
    assert not (tmp_path / "other").exists()


def voxelwise(windows):
    return np.concatenate([np.tanh(windows), windows ** 2], axis=-1)


def predicted_rows(predict_windows, volume, window, size=1, **options):
    """The blended prediction of `volume`, its rows predicted by `size` ranks' shares."""
    found = np.full(volume.shape + (predict_windows(volume[None, :1, :1, :1, None]).shape[-1],),
                    np.nan)

    def write_rows(start, rows):
        found[start:start + len(rows)] = rows
    for rank in range(size):
        survey_prediction.sliding_window(
            predict_windows, lambda start, stop: volume[start:stop], volume.shape, window,
            survey_prediction.rows_of_rank(len(volume), rank, size), write_rows, **options)
    return found


@pytest.mark.parametrize("overlap, blend", [(0.25, "gaussian"), (0.5, "constant"),
                                            (0.0, "gaussian")])
def test_sliding_windows_blend_to_the_voxelwise_prediction_on_any_number_of_ranks(
        overlap, blend):
    volume = np.random.default_rng(1).normal(size=(20, 17, 12))
    whole = voxelwise(volume[..., None])
    for size in (1, 3, 25):  # 25 ranks: five of them have no row
        np.testing.assert_allclose(
            predicted_rows(voxelwise, volume, 8, size, overlap=overlap, blend=blend,
                           windows_per_batch=2), whole, rtol=1e-12)


def window_means(windows):
    """A model that is not voxel-wise: every voxel of a window gets the window's mean."""
    return np.broadcast_to(windows.mean(axis=(1, 2, 3), keepdims=True), windows.shape)


def test_blending_weighs_overlapping_windows_by_the_importance_map():
    # Two windows along the inlines (starts 0 and 4), one along the short axes; the volume
    # is its inline number, so the windows' means are 3.5 and 7.5 whatever the reflection.
    volume = np.broadcast_to(np.arange(12.0)[:, None, None], (12, 4, 4)).copy()
    # at crossline and sample 3 the map's floor (1e-3) does not enter: its factors along
    # them are alike for both windows, and cancel
    gaussian = predicted_rows(window_means, volume, 8, overlap=0.5)[:, 3, 3, 0]
    constant = predicted_rows(window_means, volume, 8, overlap=0.5, blend="constant")[:, 3, 3, 0]
    np.testing.assert_allclose(constant, [3.5] * 4 + [5.5] * 4 + [7.5] * 4, rtol=1e-12)
    line = np.exp(-((np.arange(8) - 3.5) ** 2) / (2 * 1.0 ** 2))  # sigma = 8 / 8
    rows = np.arange(4, 8)
    first, second = line[rows], line[rows - 4]
    np.testing.assert_allclose(gaussian, [3.5] * 4 + list(
        (first * 3.5 + second * 7.5) / (first + second)) + [7.5] * 4, rtol=1e-12)
    assert np.abs(gaussian - constant).max() > 1


def plane_jumps(windows):
    """A model that is not voxel-wise: how much each voxel differs from the next one along
    each spatial axis, as an edge or a fault plane shows."""
    return sum(np.abs(np.diff(windows, axis=axis, append=np.take(windows, [-1], axis=axis)))
               for axis in (1, 2, 3))


def test_a_survey_shorter_than_a_window_is_filled_by_reflection_not_zeros():
    # a zero padding's jump from the survey to the zeros is an edge the model would see
    volume = 3000 + np.random.default_rng(2).normal(size=(5, 9, 3))
    found = predicted_rows(plane_jumps, volume, 8)
    assert np.abs(found).max() < 10  # the survey's own jumps; zeros would give ~3000
    assert survey_prediction.reflected(np.arange(8), 3).tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    assert survey_prediction.reflected(np.arange(3), 1).tolist() == [0, 0, 0]


def test_a_rank_reads_a_window_of_rows_at_a_time_and_only_near_its_own():
    volume = np.random.default_rng(3).normal(size=(40, 9, 9))
    reads, writes = [], []

    def read_rows(start, stop):
        reads.append((start, stop))
        return volume[start:stop]
    survey_prediction.sliding_window(voxelwise, read_rows, volume.shape, 8, (10, 30),
                                     lambda start, rows: writes.append((start, len(rows))))
    assert max(stop - start for start, stop in reads) <= 8
    assert min(start for start, _ in reads) >= 10 - 8 and max(stop for _, stop in reads) <= 30 + 8
    # its rows are written as they are final, in order, each once
    assert len(writes) > 2 and [start for start, _ in writes] == sorted(
        start for start, _ in writes)
    assert sum(count for _, count in writes) == 20 and writes[0][0] == 10


def test_windows_cover_every_axis():
    assert survey_prediction.window_starts(20, 8, 0.25) == [0, 6, 12]
    assert survey_prediction.window_starts(16, 8, 0.0) == [0, 8]
    assert survey_prediction.window_starts(5, 8, 0.25) == [0]
    assert survey_prediction.rows_of_rank(5, 0, 1) == (0, 5)
    assert [survey_prediction.rows_of_rank(2, rank, 3) for rank in range(3)] == [
        (0, 1), (1, 1), (1, 2)]


TINY_RUN = ["--flagfile=configs/seismic_faults_cpu.cfg", "--patch_size=16", "--epochs=1",
            "--warmup_epochs=0", "--steps_per_epoch=2", "--validation_steps=1"]


def field_survey(shape, seed=5):
    """A survey as a field recording's amplitudes are: a synthetic survey's reflectors in
    the thousands (standard deviation about 2,000) with a few spikes above 10,000."""
    made = seismic.synthetic_survey(max(shape), [seed, 2, 0])
    cut = tuple(slice(0, extent) for extent in shape)
    amplitudes = 2000.0 * made.seismic[cut]
    spikes = np.random.default_rng(seed).integers(0, amplitudes.size, 5)
    amplitudes.flat[spikes] = [15000.0, -12000.0, 11000.0, -20000.0, 13000.0]
    return amplitudes, made.faults[cut]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on a user's survey (field amplitudes, SEG-Y, 4 ms) cut into blocks,
    whose blocks are then removed: app.predict must not need a run's training data."""
    folder = tmp_path_factory.mktemp("faults")
    amplitudes, faults = field_survey((48, 32, 32), seed=7)
    write_segy(folder / "train.segy", amplitudes)
    np.save(folder / "faults.npy", faults)
    shards = folder / "shards"
    run([PYTHON, "-m", "input_pipeline.to_tfrecord", f"--seismic={folder / 'train.segy'}",
         f"--labels={folder / 'faults.npy'}", "--block_size=16", "--validation_fraction=0.34",
         f"--output_dir={shards}"])
    run(train_command(*TINY_RUN, "--dataset=seismic_shards", f"--data_dir={shards}",
                      f"--model_dir={folder / 'run'}"))
    for path in shards.iterdir():
        path.unlink()
    shards.rmdir()
    return folder / "run"


def predict_command(*flags):
    return [PYTHON, "-m", "app.predict", *flags]


@pytest.mark.distributed
def test_a_field_survey_is_predicted_alike_on_1_2_and_3_ranks_at_any_amplitude_scale(
        trained, tmp_path):
    # 23 inlines (two windows of 16), 12 crosslines and 10 samples (shorter than a window)
    amplitudes, _ = field_survey((23, 12, 10))
    write_segy(tmp_path / "survey.segy", amplitudes)
    write_segy(tmp_path / "louder.segy", amplitudes * 1000)
    outputs = {}
    for name, processes in (("survey", 1), ("survey", 2), ("survey", 3), ("louder", 2)):
        out = tmp_path / f"{name}-np{processes}"
        command = predict_command(f"--model_dir={trained}", f"--input={tmp_path / name}.segy",
                                  f"--output_dir={out}", "--windows_per_batch=3")
        result = run([*mpirun(processes), *command] if processes > 1 else command)
        outputs[name, processes] = np.load(out / "probability.npy")
        assert (out / "slices.png").stat().st_size > 1000
    survey_run = tmp_path / "survey-np1"
    assert outputs["survey", 1].shape == (23, 12, 10)
    assert 0 <= outputs["survey", 1].min() and outputs["survey", 1].max() <= 1
    for other in (("survey", 2), ("survey", 3), ("louder", 2)):
        np.testing.assert_allclose(outputs[other], outputs["survey", 1], rtol=1e-6, atol=1e-6)
    described = json.loads((survey_run / "prediction.json").read_text())
    assert described["padding"] == {"mode": "reflect", "axes_shorter_than_a_window": [1, 2]}
    scaling = seismic.survey_scaling(amplitudes)
    assert described["scaling"]["scale"] == pytest.approx(scaling.scale)
    assert described["scaling"]["high"] < 15000  # the spikes are clipped, not the scale
    assert "filled by reflection" in result.stdout and "scaled" in result.stdout
    with segyio.open(str(tmp_path / "survey.segy")) as source, \
            segyio.open(str(survey_run / "probability.segy")) as written:
        assert list(written.ilines) == list(source.ilines) == list(range(101, 124))
        assert list(written.xlines) == list(source.xlines)
        np.testing.assert_array_equal(written.samples, source.samples)
        assert written.bin[segyio.BinField.Interval] == 4000
        assert [dict(header) for header in written.header] == [
            dict(header) for header in source.header]
        np.testing.assert_allclose(segyio.tools.cube(written), outputs["survey", 1], rtol=1e-6)


@pytest.mark.distributed
def test_a_survey_of_fewer_windows_than_ranks_is_predicted_by_every_rank(trained, tmp_path):
    amplitudes, _ = field_survey((20, 20, 20))
    np.save(tmp_path / "cube.npy", amplitudes)
    outputs = []
    for processes in (1, 3):  # at --window=32 one window: ranks 1 and 2 have none of their own
        out = tmp_path / f"np{processes}"
        command = predict_command(f"--model_dir={trained}", f"--input={tmp_path / 'cube.npy'}",
                                  f"--output_dir={out}", "--window=32")
        run([*mpirun(processes), *command] if processes > 1 else command)
        outputs.append(np.load(out / "probability.npy"))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_a_model_of_sections_predicts_every_inline_alike_on_1_and_2_ranks(tmp_path):
    run(train_command("--flagfile=configs/seismic_facies_sections.cfg", "--volume_size=16",
                      "--num_volumes=4", "--epochs=1", "--warmup_epochs=0",
                      "--steps_per_epoch=1", "--validation_steps=1",
                      f"--model_dir={tmp_path / 'run'}"))
    amplitudes, _ = field_survey((5, 20, 18))  # sections longer and shorter than a window
    np.save(tmp_path / "survey.npy", amplitudes)
    outputs = []
    for processes in (1, 2):
        command = predict_command(f"--model_dir={tmp_path / 'run'}",
                                  f"--input={tmp_path / 'survey.npy'}",
                                  f"--output_dir={tmp_path / str(processes)}")
        run([*mpirun(processes), *command] if processes > 1 else command)
        outputs.append(np.load(tmp_path / str(processes) / "probability.npy"))
    assert outputs[0].shape == (5, 20, 18, 8)  # the facies' probabilities
    np.testing.assert_allclose(outputs[0].sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_one_window_of_the_whole_volume_is_the_model_on_the_scaled_volume(trained, tmp_path):
    from app.horovod import tf  # noqa: F401 (first)
    import models
    from app import checkpoints
    amplitudes, _ = field_survey((16, 16, 16))
    np.save(tmp_path / "cube.npy", amplitudes)
    run(predict_command(f"--model_dir={trained}", f"--input={tmp_path / 'cube.npy'}",
                        f"--output_dir={tmp_path / 'out'}", "--window=16"))
    model = models.build("unet3d_small", (16, 16, 16, 1), 1)
    checkpoints.initialize_from(model, str(trained / "checkpoints" / "epoch-1"))
    scaled = seismic.survey_scaling(amplitudes).apply(amplitudes)
    direct = model(scaled[None, ..., None], training=False).numpy()[0, ..., 0]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probability.npy"), direct,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.distributed
def test_bad_prediction_inputs_end_with_one_line_and_write_nothing(trained, tmp_path):
    write_segy(tmp_path / "survey.segy", survey().seismic[:SHAPE[0], :SHAPE[1], :SHAPE[2]])
    data = (tmp_path / "survey.segy").read_bytes()
    (tmp_path / "cut.segy").write_bytes(data[:len(data) // 3])
    trace = 240 + SHAPE[2] * 4  # a file that ends at a trace's end, half an inline short
    (tmp_path / "short.segy").write_bytes(data[:len(data) - SHAPE[1] // 2 * trace])
    record = json.loads((trained / "model.json").read_text())  # a run scaled another way
    shutil.copytree(trained, tmp_path / "rescaled")
    (tmp_path / "rescaled" / "model.json").write_text(json.dumps(
        {**record, "standardization": "min-max to [0, 1]"}))
    for flags, reason in (
            ([f"--input={tmp_path / 'cut.segy'}"], "not a readable 3D SEG-Y volume"),
            ([f"--input={tmp_path / 'short.segy'}"], "not a readable 3D SEG-Y volume"),
            ([f"--input={tmp_path / 'survey.segy'}", "--window=10"],
             "--window=10: --model=unet3d_small divides its input's extents by 4"),
            ([f"--input={tmp_path / 'survey.segy'}", f"--model_dir={tmp_path}"],
             "no model.json"),
            ([f"--input={tmp_path / 'survey.segy'}", f"--model_dir={tmp_path / 'rescaled'}"],
             "its inputs were scaled 'min-max to [0, 1]', which this version cannot repeat")):
        model_dir = [] if any(flag.startswith("--model_dir") for flag in flags) else [
            f"--model_dir={trained}"]
        result = run(predict_command(*model_dir, *flags, f"--output_dir={tmp_path / 'out'}"),
                     check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = error_lines(result, "app.predict")
        assert len(lines) == 1 and reason in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
