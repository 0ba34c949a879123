"""A user's own Keras 3 model (examples/own_model.py: a layer of its own written with
keras.ops) trained with the project's flags and nothing added to the project: as
--model=package.module:function under mpirun, predicted with app.predict, the same weights
on 1 and 2 processes in float64; as --model=path.keras; and refused in one line where it
does not fit."""
import numpy as np
import pytest

from conftest import (INTEGRITY_FLAGS, PYTHON, REPO, error_lines, mpirun, run,
                      run_concurrently, train_command)
from test_predict import TINY_RUN, field_survey, predict_command
from test_train import checkpoint_values

FAULT_NET = "examples.own_model:fault_net"
DIGITS_NET = "examples.own_model:digits_net"


@pytest.mark.distributed
def test_a_users_segmentation_model_trains_under_mpirun_and_predicts_a_survey(tmp_path):
    """fault_net on 2 processes (mixed bfloat16, sharded optimizer state), then app.predict
    on one window of a survey with field amplitudes: the model itself on the scaled survey."""
    from app.horovod import tf  # noqa: F401 (first)
    import models
    from app import checkpoints
    from input_pipeline import seismic
    model_dir = tmp_path / "run"
    run([*mpirun(2), *train_command(*TINY_RUN, f"--model={FAULT_NET}", "--num_volumes=4",
                                    "--volume_size=32", "--mixed_precision=bfloat16",
                                    "--shard_optimizer_state", f"--model_dir={model_dir}")])
    amplitudes, _ = field_survey((16, 16, 16))
    np.save(tmp_path / "cube.npy", amplitudes)
    run(predict_command(f"--model_dir={model_dir}", f"--input={tmp_path / 'cube.npy'}",
                        f"--output_dir={tmp_path / 'out'}"))
    model = models.build(FAULT_NET, (16, 16, 16, 1), 1)
    checkpoints.initialize_from(model, str(model_dir / "checkpoints" / "epoch-1"))
    scaled = seismic.survey_scaling(amplitudes).apply(amplitudes)
    direct = model(scaled[None, ..., None], training=False).numpy()[0, ..., 0]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probability.npy"), direct,
                               rtol=1e-6, atol=1e-7)
    assert any("beta" in name for name in checkpoint_values(model_dir, 1, "model/"))


@pytest.mark.distributed
def test_a_users_model_ends_with_the_same_weights_on_1_and_2_processes_and_in_2_stages(
        tmp_path):
    """digits_net, 4 steps of the integrity run (float64, a global batch of 128): the
    weights of 2 processes are one process's to 1e-12, ScaledSwish's beta included; cut
    into 2 pipeline stages where one tensor passes between its layers (2 microbatches), each
    stage holds only its part, and put together by app.convert_checkpoint they are one
    process's to 1e-10 (the microbatches' sums in another order)."""
    runs = {"one": (1, []), "two": (2, []),
            "staged": (2, ["--pipeline_stages=2", "--microbatches=2"])}

    def train(name):
        processes, flags = runs[name]
        model_dir = tmp_path / name
        command = train_command(*INTEGRITY_FLAGS, f"--model={DIGITS_NET}", "--epochs=4",
                                "--warmup_epochs=1", *flags, f"--model_dir={model_dir}")
        run([*mpirun(processes), *command] if processes > 1 else command)
        return model_dir
    one, two, staged = run_concurrently(train, list(runs))
    reference, data_parallel = (checkpoint_values(model_dir, 4, "model/")
                                for model_dir in (one, two))
    assert data_parallel.keys() == reference.keys()
    assert any("beta" in name for name in reference)
    for name, value in data_parallel.items():
        np.testing.assert_allclose(value, reference[name], rtol=0, atol=1e-12, err_msg=name)
    stages = [checkpoint_values(staged, 4, "model/", f"checkpoints/stage-{stage}")
              for stage in (0, 1)]
    assert min(map(len, stages)) > 0 and sum(map(len, stages)) == len(reference)
    run([PYTHON, "-m", "app.convert_checkpoint", f"--from_dir={staged}",
         f"--to_dir={tmp_path / 'converted'}", "--to_stages=1"])
    converted = checkpoint_values(tmp_path / "converted", 4, "model/")
    assert converted.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(converted[name], reference[name], rtol=0, atol=1e-10,
                                   err_msg=name)


def test_a_saved_keras_file_trains_from_its_own_weights(tmp_path):
    """--model=path.keras: a model of Keras' own layers saved by the user trains from the
    weights it was saved with: after one step at a negligible LR, they are the saved ones."""
    from app.horovod import keras
    keras.utils.set_random_seed(3)
    saved = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    saved.save(tmp_path / "mine.keras")
    model_dir = tmp_path / "run"
    run(train_command("--flagfile=configs/digits_cnn.cfg", f"--model={tmp_path}/mine.keras",
                      "--epochs=1", "--steps_per_epoch=1", "--warmup_epochs=0",
                      "--learning_rate=1e-9", f"--model_dir={model_dir}"))
    trained = checkpoint_values(model_dir, 1, "model/")
    kernel = next(value for name, value in trained.items() if "kernel" in name)
    np.testing.assert_allclose(kernel, saved.layers[-1].kernel.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("flags, error", [
    ([f"--model={DIGITS_NET}", "--flagfile=configs/seismic_faults_cpu.cfg",
      "--volume_size=16", "--patch_size=16", "--num_volumes=4"],
     f"--model={DIGITS_NET}: gives outputs per example of shape 1; a segmentation data set "
     f"of these inputs needs 16x16x16x1"),
    ([f"--model={FAULT_NET}", "--flagfile=configs/digits_cnn.cfg"],
     f"--model={FAULT_NET}: gives one output per voxel of shape 8x8x10; a classification "
     f"data set of these inputs needs 10"),
    (["--model=no_such_package.model:build", "--flagfile=configs/digits_cnn.cfg"],
     "--model=no_such_package.model:build: no module no_such_package (it is imported from "
     "the PYTHONPATH or the current folder)"),
    ([f"--model={DIGITS_NET}", "--flagfile=configs/digits_cnn.cfg", "--sync_batch_norm"],
     f"--sync_batch_norm=True: --model={DIGITS_NET} makes its own normalization layers; "
     f"build them as Horovod's SyncBatchNormalization in it instead"),
    pytest.param(  # on two processes (mpirun)
        [f"--model={FAULT_NET}", "--flagfile=configs/seismic_faults_cpu.cfg",
         "--volume_size=16", "--patch_size=16", "--num_volumes=4", "--spatial_parts=2"],
        f"--spatial_parts=2: cannot split --model={FAULT_NET}: layer 'scaled_swish' "
        f"(ScaledSwish) mixes the slabs (it is not a convolution, pooling, upsampling, "
        f"normalization or voxel-wise layer)", marks=pytest.mark.distributed),
    pytest.param(
        ["--model={tmp}/two_branches.keras", "--flagfile=configs/digits_cnn.cfg",
         "--pipeline_stages=2"],
        "--pipeline_stages=2: --model={tmp}/two_branches.keras has 1 block (a pipeline cuts "
        "it only where one tensor passes), so at most 1 stage", marks=pytest.mark.distributed),
])
def test_a_users_model_that_does_not_fit_is_refused_in_one_line(flags, error, tmp_path):
    from app.horovod import keras
    inputs = keras.Input((8, 8, 1))  # two branches from input to output: one block
    keras.Model(inputs, keras.layers.Add()([keras.layers.Dense(10)(keras.layers.Flatten()(
        inputs)) for _ in range(2)])).save(tmp_path / "two_branches.keras")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    launch = [*mpirun(2)] if {"--spatial_parts=2", "--pipeline_stages=2"} & set(flags) else []
    refused = run([*launch, *train_command(*flags, "--epochs=1", "--warmup_epochs=0",
                                           f"--model_dir={tmp_path / 'run'}")], check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert set(error_lines(refused)) == {
        f"app.train: error: {error.format(REPO=REPO, tmp=tmp_path)}"}, refused.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_saved_model_with_layers_of_its_own_is_refused_naming_the_function_form(tmp_path):
    from app.horovod import keras  # noqa: F401 (first)
    from examples import own_model
    own_model.digits_net((8, 8, 1), 10).save(tmp_path / "custom.keras")
    refused = run(train_command("--flagfile=configs/digits_cnn.cfg",
                                f"--model={tmp_path}/custom.keras", "--epochs=1",
                                "--warmup_epochs=0",
                                f"--model_dir={tmp_path / 'run'}"), check=False)
    assert refused.returncode == 2
    [line] = error_lines(refused)
    assert line.startswith(f"app.train: error: --model={tmp_path}/custom.keras: cannot be "
                           f"loaded: ") and line.endswith(
        "(a model with layers of its own: give --model=package.module:function)")


def test_a_users_model_that_cannot_be_had_says_why_in_one_line(tmp_path, monkeypatch):
    """What goes wrong in the user's own code or file is named with where it happened (the
    flag's one line, as above, carries it); a subclassed or unbuilt model is taken."""
    from app.horovod import keras  # noqa: F401 (first)
    from models import user
    (tmp_path / "user_models_a.py").write_text(
        "import keras\n"
        "class Classifier(keras.Model):\n"
        "    def __init__(self, n):\n"
        "        super().__init__()\n"
        "        self.flat, self.out = keras.layers.Flatten(), keras.layers.Dense(n)\n"
        "    def call(self, x):\n"
        "        return self.out(self.flat(x))\n"
        "def subclassed(shape, n):\n"
        "    return Classifier(n)\n"
        "def unbuilt(shape, n):\n"
        "    return keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(n)])\n"
        "def fails(shape, n):\n"
        "    return shape[5]\n"
        "def for_other_images(shape, n):\n"
        "    x = keras.Input((28, 28, 1))\n"
        "    return keras.Model(x, keras.layers.Dense(n)(keras.layers.Flatten()(x)))\n"
        "def two_inputs(shape, n):\n"
        "    a, b = keras.Input(shape), keras.Input(shape)\n"
        "    return keras.Model([a, b], keras.layers.Dense(n)(keras.layers.Add()([a, b])))\n")
    (tmp_path / "user_models_b.py").write_text("import no_such_dependency\n")
    (tmp_path / "user_models_c.py").write_text("x = (\n")
    (tmp_path / "damaged.keras").write_text("not a zip archive")
    monkeypatch.syspath_prepend(str(tmp_path))
    for taken in ("user_models_a:subclassed", "user_models_a:unbuilt"):
        assert user.load(taken, (8, 8, 1), 10).output_shape == (None, 10)
    refused = {
        "user_models_a:fails": f"fails((8, 8, 1), 10): IndexError: tuple index out of range "
                               f"({tmp_path}/user_models_a.py:13)",
        "user_models_a:for_other_images": "takes inputs of 28x28x1, the data 8x8x1",
        "user_models_a:two_inputs": "takes several inputs; the data is one of 8x8x1",
        "user_models_a:missing": f"user_models_a ({tmp_path}/user_models_a.py) has no "
                                 f"function 'missing'",
        "user_models_b:build": f"importing user_models_b: ModuleNotFoundError: No module named "
                               f"'no_such_dependency' ({tmp_path}/user_models_b.py:1)",
        "user_models_c:build": f"importing user_models_c: SyntaxError: '(' was never closed "
                               f"({tmp_path}/user_models_c.py:1)",
        str(tmp_path / "missing.keras"): "no such file",
        str(tmp_path / "damaged.keras"): "is not a saved Keras model (a .keras file is a zip "
                                         "archive)"}
    for name, reason in refused.items():
        with pytest.raises(user.UserModelError) as error:
            user.load(name, (8, 8, 1), 10)
        assert str(error.value) == reason
    assert not any(map(user.is_user_model, (":build", ".module:build", "a:b:c")))


def test_a_users_model_is_cut_only_where_one_tensor_passes():
    """models.user.crossings: in a residual chain, after the stem and after each block's sum
    (not between its branches); a layer called twice leaves the model uncut; the stages'
    weights, one after the other, are the whole model's in its order (what
    app.convert_checkpoint assigns by)."""
    from app.horovod import keras
    from models import user
    inputs = keras.Input((8, 8, 3))
    x = stem = keras.layers.Conv2D(4, 3)(inputs)
    sums = []
    for _ in range(2):
        branch = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(x))
        x = keras.layers.Add()([keras.layers.Conv2D(4, 1)(x), branch])
        sums.append(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    crossings = user.crossings(model)
    assert crossings[:4] == [inputs, stem, *sums] and crossings[-1] is outputs
    assert len(crossings) == 6  # and the pooled features
    stages = [keras.Model(start, end) for start, end in zip(crossings, crossings[1:])]
    assert [weight.path for stage in stages for weight in stage.weights] == [
        weight.path for weight in model.weights]

    # its second call reads the stem again, which its attributes (the first call's) hide
    shared, inputs = keras.layers.Dense(8), keras.Input((8,))
    stem = keras.layers.Dense(8)(inputs)
    twice = keras.Model(inputs, keras.layers.Add()([keras.layers.Dense(8)(shared(stem)),
                                                    shared(stem)]))
    assert user.crossings(twice) == [inputs, twice.outputs[0]]
