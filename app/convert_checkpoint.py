"""Converts a run's latest checkpoint between pipeline stages and one whole model, so that a
run trained in stages resumes on one process (or as data-parallel replicas) and the other way
round, or on another number of stages.

    python -m app.convert_checkpoint --from_dir=runs/piped --to_dir=runs/whole --to_stages=1
    mpirun -np 4 python -m app.train --flagfile=runs/whole/flags.cfg   # resumes there

The model and optimizer are those of FROM_DIR/flags.cfg (the run's resolved flags); each
stage's checkpoint (checkpoints/stage-K/) holds its blocks' weights and optimizer slots,
which in stage order are the whole model's. TO_DIR gets the checkpoint (weights, optimizer
slots and step count, the global batch it was trained at) and flags.cfg with
--pipeline_stages=TO_STAGES and --model_dir=TO_DIR.
"""
import os

from app.horovod import tf  # first: it sets TF_XLA_FLAGS before TensorFlow loads

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
flags.DEFINE_integer("to_stages", 1, "Pipeline stages of the converted checkpoint (1: one "
                                     "whole model).", lower_bound=1)


def main(_):
    from_dir, to_dir, to_stages = FLAGS.from_dir, FLAGS.to_dir, FLAGS.to_stages
    run_flags = os.path.join(from_dir, "flags.cfg")
    if not os.path.isfile(run_flags):
        cli.fail(f"--from_dir={from_dir}: no flags.cfg (not a model_dir of app.train)")
    FLAGS(["convert_checkpoint", f"--flagfile={run_flags}"], known_only=True)
    from_stages = FLAGS.pipeline_stages
    epochs, steps, global_batch = checkpoints.latest(
        from_dir, folder=checkpoints.stage_folder(0, from_stages))
    if not epochs and not steps:
        cli.fail(f"--from_dir={from_dir}: no checkpoint to convert")
    if os.path.isdir(os.path.join(to_dir, "checkpoints")):
        cli.fail(f"--to_dir={to_dir}: holds checkpoints already")
    blocks = models.count_blocks(FLAGS.model)
    if to_stages > blocks:
        cli.fail(f"--to_stages={to_stages}: --model={FLAGS.model} has {blocks} blocks")

    if FLAGS.float64:  # the variables' type (mixed precision keeps them in float32)
        tf.keras.mixed_precision.set_global_policy("float64")
    source = input_pipeline.load(FLAGS.dataset, "train", **app_flags.load_options())
    model_blocks = models.blocks_of(FLAGS.model, source.feature_shape, source.num_outputs)
    from_cut, to_cut = (pipeline_plan.cut(model_blocks, stages, FLAGS.pipeline_balance)
                        for stages in (from_stages, to_stages))

    def parts(stage_blocks):
        """Each stage's model and optimizer (with its slots), as app.train builds them."""
        built = []
        for stage, (first, last) in enumerate(stage_blocks):
            model = models.build(FLAGS.model, source.feature_shape, source.num_outputs,
                                 seed=FLAGS.seed, first_block=first, last_block=last,
                                 input_scaling=source.input_scaling)
            optimizer = optimizers.build(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum,
                                         FLAGS.weight_decay)
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
        checkpoints.restore(checkpoints.manager(
            model, optimizer, from_dir, checkpoints.stage_folder(stage, from_stages)),
            epochs, steps)
    for source_values, target_variables in zip(_state(sources), _state(targets), strict=True):
        target_variables.assign(source_values)
    for _, _, optimizer in targets:
        optimizer.iterations.assign(sources[0][2].iterations)

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
    print(f"{to_dir}: {checkpoints.checkpoint_name(epochs, steps)} of {from_dir} in "
          f"{to_stages} stage(s)")


def _state(parts):
    """Every weight and optimizer slot of the stages, in the whole model's order."""
    variables = [weight for _, model, _ in parts for weight in model.weights]
    for _, model, optimizer in parts:
        variables += [optimizer.get_slot(weight, name) for weight in model.trainable_weights
                      for name in optimizer.get_slot_names()]
    return variables


def run():
    app_flags.define_training_flags()
    flags.mark_flags_as_required(["from_dir", "to_dir"])
    app.run(main, flags_parser=app_flags.parser(lambda argv: None))


if __name__ == "__main__":
    run()
