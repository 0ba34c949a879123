"""The task table (app.tasks): a task registered as docs/extending.md shows is found by the
flags' check and help, by app.train (its loss, metrics, headline and what it shows each
epoch), by the run's record and by app.predict; app.predict refuses, in one line, a run of a
task it has no prediction for."""
import json
import re
import textwrap

from conftest import PYTHON, error_lines, run

# A throwaway task "parity" (two classes; its own metric "hits", its headline; a callback
# each epoch; a predict that writes a file) and a data set of it, then app.train or
# app.predict on the arguments after the first, which names the command.
REGISTER_AND_RUN = textwrap.dedent("""
    import dataclasses
    import os
    import sys
    import app.horovod
    import keras
    import input_pipeline
    from input_pipeline import sources
    from app import predict, tasks, train

    class ShowExample(keras.callbacks.Callback):
        def __init__(self, model_dir, example, whole_examples):
            super().__init__()
            self.model_dir, self.example = model_dir, example

        def on_epoch_end(self, epoch, logs=None):
            if self.model_dir:
                with open(os.path.join(self.model_dir, "shown.txt"), "a") as shown:
                    shown.write(f"{epoch} {tuple(self.example[0].shape)}\\n")

    def predict_parity(record, checkpoint, flag_values):
        os.makedirs(flag_values.output_dir)
        with open(os.path.join(flag_values.output_dir, "predicted.txt"), "w") as written:
            written.write(f"{record['task']} {os.path.basename(checkpoint)} {flag_values.input}")

    tasks.TASKS["parity"] = tasks.Task(
        "THROWAWAY-TASK", False, lambda options: "sparse_categorical_crossentropy",
        lambda num_outputs: [keras.metrics.SparseCategoricalAccuracy(name="hits")],
        lambda num_outputs: "hits", lambda *shown: [ShowExample(*shown)], predict_parity)
    input_pipeline.DATASETS["parity_noise"] = input_pipeline.Dataset(
        lambda split, options: dataclasses.replace(
            sources.synthetic(split, (4, 4, 1), 2, 16, options.seed), task="parity"),
        "THROWAWAY-DATASET random 4x4 images of two classes", task="parity")
    command = sys.argv.pop(1)
    (train if command == "train" else predict).run()
""")


def test_a_registered_task_is_found_by_the_flags_training_its_record_and_predict(tmp_path):
    helpfull = run([PYTHON, "-c", REGISTER_AND_RUN, "train", "--helpfull"], check=False)
    assert "parity: val_hits" in re.sub(r"\s+", " ", helpfull.stdout)  # --target_accuracy's

    model_dir = tmp_path / "run"
    run([PYTHON, "-c", REGISTER_AND_RUN, "train", "--dataset=parity_noise", "--model=mlp",
         "--batch_size=4", "--epochs=3", "--warmup_epochs=0", "--learning_rate=0.1",
         "--target_accuracy=0", f"--model_dir={model_dir}"])
    results = json.loads((model_dir / "results.json").read_text())
    # the task's metric is its headline, reached (0) after the first epoch, which ends it
    assert results["headline_metric"] == "val_hits" and results["epochs_completed"] == 1
    assert "val_hits" in (model_dir / "training_log.csv").read_text().splitlines()[0]
    assert (model_dir / "shown.txt").read_text() == "0 (4, 4, 1)\n"
    assert json.loads((model_dir / "model.json").read_text())["task"] == "parity"

    predicted = tmp_path / "predicted"
    run([PYTHON, "-c", REGISTER_AND_RUN, "predict", f"--model_dir={model_dir}",
         "--input=cases.npy", f"--output_dir={predicted}"])
    assert (predicted / "predicted.txt").read_text() == "parity epoch-1 cases.npy"

    refused = run([PYTHON, "-m", "app.predict", f"--model_dir={model_dir}", "--input=cases.npy",
                   f"--output_dir={tmp_path / 'refused'}"], check=False)
    assert refused.returncode == 2 and error_lines(refused, "app.predict") == [
        f"app.predict: error: --model_dir={model_dir}: trained --model=mlp, a parity model; "
        f"app.predict applies segmentation, topology models"], refused.stderr[-2000:]
    assert not (tmp_path / "refused").exists()


def test_compiled_state_built_before_fit_leaves_one_trace_of_the_step():
    """Keras 3 builds the compiled metrics inside the step's first trace where no
    tf.distribute strategy is set (under Horovod), and their new variables have TensorFlow
    trace the step again; app.tasks.build_compiled_state before fit() leaves one trace (the
    Python train_step runs once per trace)."""
    import numpy as np
    from app.horovod import keras, tf
    from app import tasks

    data = tf.data.Dataset.from_tensor_slices(
        (np.random.default_rng(0).normal(size=(16, 4)).astype("float32"),
         np.arange(16) % 2)).batch(4)
    traces = {}
    for built in (False, True):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=False)
        model.optimizer.build(model.trainable_variables)  # as app.train does before fit()
        if built:
            tasks.build_compiled_state(model, data.element_spec)
        traces[built] = 0
        keras_step = model.train_step

        def counted(batch, keras_step=keras_step, built=built):
            traces[built] += 1
            return keras_step(batch)
        model.train_step = counted  # on the instance: Keras' own step, counted
        model.fit(data, epochs=1, steps_per_epoch=2, verbose=0)
    assert traces == {False: 2, True: 1}
