"""Converts a run's latest checkpoint between pipeline stages and one whole model, so that a
run trained in stages resumes on one process (or as data-parallel replicas) and the other way
round, or on another number of stages; and a checkpoint of the project's tf_keras version
(before it moved to Keras 3) to the Keras 3 one, which app.train refuses to resume from.

    python -m app.convert_checkpoint --from_dir=runs/piped --to_dir=runs/whole --to_stages=1
    python -m app.convert_checkpoint --from_dir=runs/old --to_dir=runs/new  # tf_keras's
    mpirun -np 4 python -m app.train --flagfile=runs/whole/flags.cfg   # resumes there

The model and optimizer are those of FROM_DIR/flags.cfg (the run's resolved flags); each
stage's checkpoint (checkpoints/stage-K/) holds its blocks' weights and optimizer slots,
which in stage order are the whole model's. TO_DIR gets the checkpoint (weights, optimizer
slots and step count, the global batch it was trained at) and flags.cfg with
--pipeline_stages=TO_STAGES and --model_dir=TO_DIR (--to_stages defaults to FROM_DIR's).
A tf_keras checkpoint keyed each layer's weights and slots by the layer's place among those
with weights and the slot's name (checkpoints.restore_tf_keras); Keras 3's computes what it
did (app.optimizers tells where they differ).
"""
import shutil
import os

import app.horovod  # noqa: F401 (first: it sets TF_XLA_FLAGS before TensorFlow loads)

from absl import app, flags

import input_pipeline
import models
from app import checkpoints, cli, optimizers
from app.parallel import pipeline_plan
from app import flags as app_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("from_dir", None, "The model_dir of the run whose latest checkpoint to "
                                      "convert (it holds flags.cfg).")
flags.DEFINE_string("to_dir", None, "The new model_dir: it must hold no checkpoint.")
flags.DEFINE_integer("to_stages", None, "Pipeline stages of the converted checkpoint (1: one "
                                        "whole model; default: FROM_DIR's).", lower_bound=1)


def main(_):
    from_dir, to_dir, to_stages = FLAGS.from_dir, FLAGS.to_dir, FLAGS.to_stages
    run_flags = os.path.join(from_dir, "flags.cfg")
    if not os.path.isfile(run_flags):
        cli.fail(f"--from_dir={from_dir}: no flags.cfg (not a model_dir of app.train)")
    FLAGS(["convert_checkpoint", f"--flagfile={run_flags}"], known_only=True)
    if not FLAGS["mixed_precision"].present:  # a run from before --mixed_precision=auto, when
        FLAGS.mixed_precision = "float32"     # float32 was the default: it resumes in float32
    if optimizers.preconditions(FLAGS.optimizer):
        cli.fail(f"--from_dir={from_dir}: trained with --optimizer={FLAGS.optimizer}, which "
                 f"pipeline stages cannot take")
    from_stages = FLAGS.pipeline_stages
    to_stages = from_stages if to_stages is None else to_stages
    epochs, steps, global_batch = checkpoints.latest(
        from_dir, folder=checkpoints.stage_folder(0, from_stages))
    if not epochs and not steps:
        cli.fail(f"--from_dir={from_dir}: no checkpoint to convert")
    if os.path.isdir(os.path.join(to_dir, "checkpoints")):
        cli.fail(f"--to_dir={to_dir}: holds checkpoints already")
    if FLAGS.float64:  # the variables' type (mixed precision keeps them in float32)
        models.use_float64()
    source = input_pipeline.load(FLAGS.dataset, "train", **app_flags.load_options())
    try:
        model_blocks = models.blocks_of(FLAGS.model, source.feature_shape, source.num_outputs)
    except models.user.UserModelError as error:
        cli.fail(f"--model={FLAGS.model}: {error}")
    if to_stages > len(model_blocks):
        cli.fail(f"--to_stages={to_stages}: --model={FLAGS.model} has {len(model_blocks)} "
                 f"blocks")
    from_cut, to_cut = (pipeline_plan.cut(model_blocks, stages, FLAGS.pipeline_balance)
                        for stages in (from_stages, to_stages))

    def parts(stage_blocks):
        """Each stage's model and optimizer (with its slots), as app.train builds them."""
        built = []
        for stage, (first, last) in enumerate(stage_blocks):
            model = models.build(FLAGS.model, source.feature_shape, source.num_outputs,
                                 seed=FLAGS.seed, first_block=first, last_block=last,
                                 input_scaling=source.input_scaling)
            optimizer = optimizers.loss_scaled(optimizers.build(
                FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum, FLAGS.weight_decay),
                FLAGS.mixed_precision)
            optimizers.create_slots(optimizer, model.trainable_variables)
            built.append((stage, model, optimizer))
        return built

    if from_stages > 1:
        try:
            pipeline_plan.check_cut(from_dir, FLAGS.model, from_cut)
        except pipeline_plan.CutError as error:
            cli.fail(f"--from_dir={from_dir}: {error}")
    sources, targets = parts(from_cut), parts(to_cut)
    for stage, model, optimizer in sources:
        folder = os.path.join(from_dir, checkpoints.stage_folder(stage, from_stages))
        path = os.path.join(folder, checkpoints.checkpoint_name(epochs, steps))
        try:
            if checkpoints.written_by_tf_keras(path):
                checkpoints.restore_tf_keras(
                    path, model, optimizer, optimizers.OPTIMIZERS[FLAGS.optimizer].tf_keras_slots,
                    optimizers.slots_by_variable(optimizer, model.trainable_variables))
            else:
                checkpoints.restore(checkpoints.manager(model, optimizer, from_dir,
                                                        checkpoints.stage_folder(stage,
                                                                                 from_stages)),
                                    epochs, steps)
        except checkpoints.MismatchError as error:
            cli.fail(f"--from_dir={from_dir}: {error}")
    for source_values, target_variables in zip(_state(sources), _state(targets), strict=True):
        target_variables.assign(source_values)
    for _, _, optimizer in targets:
        optimizer.iterations.assign(sources[0][2].iterations)
        for name in optimizers.LOSS_SCALE_VARIABLES:  # float16's, if any
            if hasattr(optimizer, name):
                getattr(optimizer, name).assign(getattr(sources[0][2], name))

    FLAGS.pipeline_stages, FLAGS.model_dir = to_stages, to_dir
    for stage, model, optimizer in targets:
        manager = checkpoints.manager(model, optimizer, to_dir,
                                      checkpoints.stage_folder(stage, to_stages))
        checkpoints.set_global_batch(manager, global_batch)
        if steps:
            checkpoints.save_mid_epoch(manager, epochs, steps)
        else:
            manager.save(checkpoint_number=epochs)
    if to_stages > 1:
        pipeline_plan.record_cut(to_dir, FLAGS.model, to_cut)
    with open(os.path.join(to_dir, "flags.cfg"), "w") as flagfile:
        flagfile.write(app_flags.resolved_flagfile())
    if os.path.isfile(os.path.join(from_dir, checkpoints.MODEL_RECORD)):  # for app.predict
        shutil.copy(os.path.join(from_dir, checkpoints.MODEL_RECORD), to_dir)
    print(f"{to_dir}: {checkpoints.checkpoint_name(epochs, steps)} of {from_dir} in "
          f"{to_stages} stage(s)")


def _state(parts):
    """Every weight and optimizer slot of the stages, in the whole model's order."""
    variables = [weight for _, model, _ in parts for weight in model.weights]
    for _, model, optimizer in parts:
        variables += [slot for slots in optimizers.slots_by_variable(
            optimizer, model.trainable_variables) for slot in slots]
    return variables


def run():
    app_flags.define_training_flags()
    flags.mark_flags_as_required(["from_dir", "to_dir"])
    app.run(main, flags_parser=app_flags.parser(lambda argv: None))


if __name__ == "__main__":
    run()
