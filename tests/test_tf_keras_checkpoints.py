"""Checkpoints of the project's tf_keras version (tests/data/tf_keras_checkpoints, one small
run of each kind of model, optimizer, loss scaling and pipeline stages; its README says how
they were made): app.train refuses them in one line, app.convert_checkpoint converts them,
and a converted run resumes where the tf_keras version resumed it."""
import json
import shutil

import numpy as np
import pytest

from conftest import PYTHON, REPO, error_lines, run, run_concurrently, train_command

DATA = f"{REPO}/tests/data/tf_keras_checkpoints"
# Each optimizer's slots, float16's loss scale: the converted run trains one more epoch.
RESUMED = ["mlp_momentum", "mlp_adam", "mlp_lars", "mlp_lamb", "mlp_novograd", "mlp_float16"]
# Each kind of model (batch norm's statistics; a U-Net's levels, layers within a layer).
CONVERTED = ["linear", "resnet20", "unet2d_small", "unet3d_small"]


def model_outputs(model_dir, epoch, inputs):
    """The outputs on `inputs` of MODEL_DIR's model (as model.json records it) at epoch-EPOCH."""
    from app.horovod import tf
    import models
    with open(f"{model_dir}/model.json") as record_file:
        record = json.load(record_file)
    model = models.build(record["model"], record["input_shape"], record["num_outputs"])
    tf.train.Checkpoint(model=model).restore(
        f"{model_dir}/checkpoints/epoch-{epoch}").expect_partial().assert_existing_objects_matched()
    return model(inputs, training=False).numpy()


def convert(name, to_dir, *flags):
    return run([PYTHON, "-m", "app.convert_checkpoint", f"--from_dir={DATA}/{name}",
                f"--to_dir={to_dir}", *flags])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{name: model_dir}: each kept run converted; RESUMED's trained one more epoch."""
    def convert_and_resume(name):
        to_dir = tmp_path_factory.mktemp(name)
        shutil.rmtree(to_dir)
        convert(name, to_dir)
        if name in RESUMED:
            run(train_command(f"--flagfile={to_dir}/flags.cfg", "--epochs=2"))
        return to_dir
    return dict(zip(RESUMED + CONVERTED,
                    run_concurrently(convert_and_resume, RESUMED + CONVERTED)))


@pytest.mark.parametrize("name", RESUMED + CONVERTED)
def test_a_converted_tf_keras_checkpoint_computes_what_tf_keras_did(converted, name):
    """The converted model's outputs are the tf_keras model's (its weights, batch norm's
    statistics included, in their places); one more epoch from the converted checkpoint
    ends where tf_keras's ended (the optimizer's slots, step count and loss scale carried
    over: momentum left behind moves these outputs by 1e-3 to 3e-2), as close as Keras 3's
    arithmetic comes to tf_keras's (app.optimizers: Adam's 1 - beta, 1.8e-6 relative)."""
    reference = np.load(f"{DATA}/{name}/reference.npz")
    np.testing.assert_allclose(model_outputs(converted[name], 1, reference["input"]),
                               reference["outputs"], rtol=1e-5, atol=1e-6)
    # it resumes in the type it was trained in: float32, the default then, unless asked
    trained_in = "float16" if name == "mlp_float16" else "float32"
    assert f"--mixed_precision={trained_in}\n" in (converted[name] / "flags.cfg").read_text()
    if name in RESUMED:
        np.testing.assert_allclose(model_outputs(converted[name], 2, reference["input"]),
                                   reference["resumed_outputs"], rtol=1e-4, atol=1e-5)


def test_tf_keras_stages_convert_to_one_keras_3_model(tmp_path):
    """The 2 stages of a tf_keras pipelined run become one Keras 3 model whose outputs are
    those of the whole model tf_keras's own conversion made of them."""
    convert("mlp_stages", tmp_path / "whole", "--to_stages=1")
    reference = np.load(f"{DATA}/mlp_stages/reference.npz")
    np.testing.assert_allclose(model_outputs(tmp_path / "whole", 1, reference["input"]),
                               reference["outputs"], rtol=1e-5, atol=1e-6)


def test_app_train_refuses_a_tf_keras_checkpoint_in_one_line_naming_the_conversion(tmp_path):
    model_dir = tmp_path / "old"
    shutil.copytree(f"{DATA}/linear", model_dir)
    refused = run(train_command(f"--flagfile={model_dir}/flags.cfg", f"--model_dir={model_dir}",
                                "--epochs=2"), check=False)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert error_lines(refused) == [
        f"app.train: error: --model_dir={model_dir}: {model_dir}/checkpoints/epoch-1 was "
        f"written by the project's tf_keras version: convert it with python -m "
        f"app.convert_checkpoint --from_dir={model_dir} --to_dir=NEW_MODEL_DIR"],\
        refused.stderr[-2000:]
    assert sorted(path.name for path in (model_dir / "checkpoints").iterdir()) == [
        "checkpoint", "epoch-1.data-00000-of-00001", "epoch-1.index"]
