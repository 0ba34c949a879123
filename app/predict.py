"""Applies a run of app.train to new data, as its task does (app.tasks: what app.predict writes
for it). Segmentation (app.survey_prediction): a whole survey, larger than the training
patches, by sliding windows whose seams are blended, the inlines dealt out across the ranks.
Topology (app.design_evaluation): a load case file's design, and with --simp SIMP's beside it.

    python -m app.predict --model_dir=runs/seismic_faults_cpu --input=survey.segy \\
        --output_dir=runs/survey_faults
    mpirun -np 4 python -m app.predict --model_dir=... --input=survey.npy --output_dir=...
    python -m app.predict --model_dir=runs/topology_cpu --simp \\
        --input=configs/load_cases/cantilever_32x16x16.json --output_dir=runs/cantilever

The model is the run's own record (MODEL_DIR/model.json: which model and task, its inputs
and outputs, how its inputs were scaled) and its latest checkpoint.
"""
import os

from app import horovod  # noqa: F401 (first: it sets TF_XLA_FLAGS)

from absl import app, flags

from app import checkpoints, cli, survey_prediction, tasks
from app import flags as app_flags

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "The run of app.train whose model predicts.",
                        required=True)
    flags.DEFINE_string("input", None, "What to predict for, as the run's task takes it: "
                        "segmentation's survey, a SEG-Y file or a NumPy .npy of [inlines, "
                        "crosslines, samples]; topology's load case file (JSON: "
                        "docs/topology.md).", required=True)
    flags.DEFINE_string("output_dir", None, "Where the prediction goes.", required=True)
    # segmentation's (app.survey_prediction)
    flags.DEFINE_integer("window", None, "The windows' side (default: the run's patches); "
                         "the model's down-sampling must divide it.", lower_bound=4)
    flags.DEFINE_float("overlap", 0.25, "The share of a window its neighbour overlaps.",
                       lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_enum("blend", "gaussian", list(survey_prediction.BLENDS),
                      "How overlapping windows are weighted: a Gaussian importance map "
                      "(centres count most, seams fade) or alike.")
    flags.DEFINE_integer("windows_per_batch", 4, "Windows each forward pass takes.",
                         lower_bound=1)
    # topology's (app.design_evaluation)
    flags.DEFINE_bool("simp", False, "Also run SIMP on the load case: its design beside the "
                      "prediction, its compliance and the ratio of the prediction's to it.")


# The flags of one task's predictions: refused for the others' runs, where they would do
# nothing
TASK_FLAGS = {"segmentation": ("window", "overlap", "blend", "windows_per_batch"),
              "topology": ("simp",)}


class RunRecordError(ValueError):
    """A model_dir that app.predict cannot use, and why."""


# What app.predict reads of a run's record (checkpoints.write_model_record writes them)
RECORD_KEYS = {"model", "task", "input_shape", "num_outputs", "standardization", "precision"}


def run_model(model_dir):
    """(the run's record, its latest checkpoint's path) of app.train's run in `model_dir`."""
    record = checkpoints.read_model_record(model_dir)
    if record is None:
        raise RunRecordError(f"no {checkpoints.MODEL_RECORD} (not a model_dir of app.train)")
    missing = sorted(RECORD_KEYS - set(record))
    if missing:
        raise RunRecordError(f"{checkpoints.MODEL_RECORD} lacks {', '.join(missing)}")
    task = tasks.TASKS.get(record["task"])
    if task is None or task.predict is None:
        raise RunRecordError(f"trained --model={record['model']}, a {record['task']} model; "
                             f"app.predict applies {tasks.with_predict()}")
    epochs, steps, _ = checkpoints.latest(model_dir)
    if not epochs and not steps:
        raise RunRecordError("no checkpoint to predict with")
    return record, os.path.join(model_dir, "checkpoints",
                                checkpoints.checkpoint_name(epochs, steps))


def main(_):
    try:
        record, checkpoint = run_model(FLAGS.model_dir)
    except (RunRecordError, checkpoints.NoIntactCheckpointError) as error:
        cli.fail(f"--model_dir={FLAGS.model_dir}: {error}")
    for task, names in TASK_FLAGS.items():
        given = [name for name in names if FLAGS[name].present]
        if given and task != record["task"]:
            cli.fail(f"--{given[0]}: applies to {task} runs; --model_dir={FLAGS.model_dir} "
                     f"is a {record['task']} run")
    tasks.TASKS[record["task"]].predict(record, checkpoint, FLAGS)


def run():
    define_flags()
    app.run(main, flags_parser=app_flags.parser(lambda argv: None))


if __name__ == "__main__":
    run()
