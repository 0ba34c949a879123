"""Users' surveys: SEG-Y and NumPy volumes read, cut into blocks app.train reads
(input_pipeline.volumes), and a trained model applied to a whole survey by sliding windows
(app.predict), on one rank and two."""
import json
import os

import numpy as np
import pytest
import segyio
from conftest import PYTHON, error_lines, mpirun, run, train_command

import input_pipeline
from app import predict
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
    expected = sorted(seismic_volume[i:i + 8, j:j + 8, k:k + 8].tolist() for i, j, k in corners)
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


@pytest.mark.parametrize("overlap, blend", [(0.25, "gaussian"), (0.5, "constant"),
                                            (0.0, "gaussian")])
def test_sliding_windows_blend_to_the_voxelwise_prediction_on_any_number_of_ranks(
        overlap, blend):
    volume = np.random.default_rng(1).normal(size=(20, 17, 12))
    total, weight = predict.sliding_window(voxelwise, volume, 8, overlap=overlap, blend=blend)
    whole = voxelwise(volume[..., None])
    np.testing.assert_allclose(predict.blended(total, weight, volume.shape), whole, rtol=1e-12)
    parts = [predict.sliding_window(voxelwise, volume, 8, overlap=overlap, blend=blend,
                                    rank=rank, size=3, windows_per_batch=2) for rank in range(3)]
    summed = predict.blended(sum(part[0] for part in parts), sum(part[1] for part in parts),
                             volume.shape)
    np.testing.assert_allclose(summed, whole, rtol=1e-12)
    assert all(part[1].any() for part in parts)  # every rank had windows


def test_windows_cover_every_axis_and_a_short_one_is_padded():
    assert predict.window_starts(20, 8, 0.25) == [0, 6, 12]
    assert predict.window_starts(16, 8, 0.0) == [0, 8]
    assert predict.window_starts(5, 8, 0.25) == [0]
    total, weight = predict.sliding_window(voxelwise, np.ones((5, 9, 8)), 8)
    assert total.shape == (8, 9, 8, 2) and weight[:5].min() > 0


TINY_RUN = ["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=16", "--patch_size=16",
            "--num_volumes=4", "--epochs=1", "--warmup_epochs=0", "--steps_per_epoch=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("faults")
    run(train_command(*TINY_RUN, f"--model_dir={model_dir}"))
    return model_dir


def predict_command(*flags):
    return [PYTHON, "-m", "app.predict", *flags]


@pytest.mark.distributed
def test_a_segy_survey_is_predicted_alike_on_1_and_2_ranks_with_its_geometry(trained,
                                                                            tmp_path):
    made = survey()
    write_segy(tmp_path / "survey.segy", made.seismic[:SHAPE[0], :SHAPE[1], :SHAPE[2]])
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"np{processes}"
        command = predict_command(f"--model_dir={trained}", f"--input={tmp_path / 'survey.segy'}",
                                  f"--output_dir={out}", "--window=8", "--windows_per_batch=3")
        run([*mpirun(processes), *command] if processes > 1 else command)
        outputs[processes] = np.load(out / "probability.npy")
        assert (out / "slices.png").stat().st_size > 1000
    assert outputs[1].shape == SHAPE and 0 <= outputs[1].min() and outputs[1].max() <= 1
    np.testing.assert_allclose(outputs[2], outputs[1], rtol=1e-6, atol=1e-7)
    with segyio.open(str(tmp_path / "survey.segy")) as source, \
            segyio.open(str(tmp_path / "np1" / "probability.segy")) as written:
        assert list(written.ilines) == list(source.ilines) == list(range(101, 125))
        assert list(written.xlines) == list(source.xlines)
        np.testing.assert_array_equal(written.samples, source.samples)
        assert [dict(header) for header in written.header] == [
            dict(header) for header in source.header]
        np.testing.assert_allclose(segyio.tools.cube(written), outputs[1], rtol=1e-6)


@pytest.mark.distributed
def test_one_window_of_the_whole_volume_is_the_model_on_it(trained, tmp_path):
    from app.compat import tf  # noqa: F401 (first)
    import models
    volume = survey().seismic[:16, :16, :16]
    np.save(tmp_path / "cube.npy", volume)
    run(predict_command(f"--model_dir={trained}", f"--input={tmp_path / 'cube.npy'}",
                        f"--output_dir={tmp_path / 'out'}", "--window=16"))
    model = models.build("unet3d_small", (16, 16, 16, 1), 1)
    from app import checkpoints
    checkpoints.initialize_from(model, str(trained / "checkpoints" / "epoch-1"))
    direct = model(volume[None, ..., None], training=False).numpy()[0, ..., 0]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probability.npy"), direct,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.distributed
def test_bad_prediction_inputs_end_with_one_line_and_write_nothing(trained, tmp_path):
    write_segy(tmp_path / "survey.segy", survey().seismic[:SHAPE[0], :SHAPE[1], :SHAPE[2]])
    data = (tmp_path / "survey.segy").read_bytes()
    (tmp_path / "cut.segy").write_bytes(data[:len(data) // 3])
    for flags, reason in (
            ([f"--input={tmp_path / 'cut.segy'}"], "not a readable 3D SEG-Y volume"),
            ([f"--input={tmp_path / 'survey.segy'}", "--window=10"],
             "--window=10: --model=unet3d_small divides its input's extents by 4"),
            ([f"--input={tmp_path / 'survey.segy'}", f"--model_dir={tmp_path}"],
             "no flags.cfg")):
        model_dir = [] if any(flag.startswith("--model_dir") for flag in flags) else [
            f"--model_dir={trained}"]
        result = run(predict_command(*model_dir, *flags, f"--output_dir={tmp_path / 'out'}"),
                     check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = error_lines(result, "app.predict")
        assert len(lines) == 1 and reason in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
