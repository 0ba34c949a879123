"""Trains an experiment on one process or many, with Horovod.

    python -m app.train --flagfile=configs/digits_cnn.cfg                # one process
    mpirun -np 4 python -m app.train --flagfile=configs/digits_cnn.cfg   # or horovodrun, srun
    python -m app.launch -np 4 --flagfile=configs/digits_cnn.cfg         # the tuned launcher

Horovod's Keras recipe, one `# Horovod:` line per step: main() hands off to named steps,
fit() shards the data, scales the learning rate and adds the callbacks in Horovod's order.
How the model is spread over the ranks (data parallelism, pipeline stages) is the business
of app.parallel.kinds's object, which the recipe asks and never branches on.
"""
import collections
import contextlib
import functools
import os
import sys
import time
import traceback

from app.horovod import hvd, keras, tf  # first: it sets TF_XLA_FLAGS before TensorFlow loads

from absl import app

import input_pipeline
import models
from app import (arithmetic, callbacks, checkpoints, cli, devices, horovod, optimizers,
                 precision, preemption, results, summaries, tasks, watchdog)
from app.parallel import kinds, pipeline_plan, sync_batch_norm
from app import flags as app_flags

FLAGS = app_flags.FLAGS
SKIP_CORRUPT_HINT = "(--skip_corrupt reads up to the damage)"
# Where a run starts: epochs done, the steps of the checkpoint to restore, the step to start
# at (elastic runs restart at their epoch's start), the global batch it was trained with.
Resume = collections.namedtuple("Resume", "epoch saved_step step global_batch")
# What fit() trains: this rank's model (checkpointed) and what fit() runs (the model, or its
# pipeline stage), with its data, threads and precision (app.precision.Choice).
Run = collections.namedtuple("Run", "parallel model trainer checkpoint_manager train_source "
                                    "validation_source threads precision")
# The steps fit() runs: from step `first_step` of `first_epoch`, at the global batch.
Span = collections.namedtuple("Span", "first_epoch first_step steps_per_epoch global_batch")


def main(_):
    started = time.perf_counter()
    parallel = kinds.choose(FLAGS)
    threads = init_horovod_and_devices(parallel)
    computes_in = choose_precision()
    resume = resume_point(parallel)
    if resume.epoch >= FLAGS.epochs:
        if hvd.rank() == 0:
            print(f"{FLAGS.model_dir} already holds {resume.epoch} epochs; nothing to train")
        return
    train_source, validation_source = data_sources()
    model, trainer, checkpoint_manager = build_and_restore(parallel, train_source, resume)
    run = Run(parallel, model, trainer, checkpoint_manager, train_source, validation_source,
              threads, computes_in)
    if FLAGS.elastic:
        # Horovod: elastic training restarts fit() from the last commit of this state.
        run_results = fit_elastically(
            hvd.elastic.KerasState(trainer, trainer.optimizer, epoch=resume.epoch), run)
    else:
        run_results = fit(run, resume.epoch, resume.step, resume.global_batch)
    if hvd.rank() == 0:
        write_results(run_results, started)


def init_horovod_and_devices(parallel):
    """Horovod, then this process's devices; returns its CPU threads."""
    if FLAGS.timeline:  # Horovod's rank 0 opens it in hvd.init(), so it is named before
        os.makedirs(FLAGS.model_dir, exist_ok=True)
        os.environ["HOROVOD_TIMELINE"] = os.path.join(FLAGS.model_dir, "timeline.json")
    if FLAGS.jit_compile:  # XLA compiles the step's ops around Horovod's (app.horovod)
        tf.config.optimizer.set_jit("autoclustering")
    world_size = cli.world_size_from_environment()
    try:
        arguments = parallel.init_arguments(world_size)
    except arithmetic.FlagError as error:
        cli.fail(error)
    # K-FAC's gradient workers meet in process sets of their own (the kinds of parallelism
    # with process sets of theirs refuse preconditioners)
    curvature_sets = optimizers.process_sets(FLAGS.optimizer, world_size,
                                             app_flags.preconditioner_settings())
    if curvature_sets:
        arguments["process_sets"] = curvature_sets
    # Horovod: initialize Horovod.
    with devices.threads_started_at_lowest_priority(parallel.deprioritize_horovod_threads()):
        hvd.init(**arguments)
    # Horovod: pin one GPU per local rank; on CPUs, the rank's share of the cores.
    devices.pin_gpu(hvd.local_rank())
    threads = devices.cpu_threads(hvd.local_size(), FLAGS.threads_per_process)
    devices.set_cpu_threads(threads)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    if FLAGS.adasum and not hvd.mpi_enabled():
        cli.fail("--adasum: needs Horovod's MPI controller (mpirun, srun, or horovodrun "
                 "--mpi); this run uses Gloo")
    return threads


def choose_precision():
    """The type this run computes in (app.precision: by default bfloat16 where every rank's
    processor computes it), made Keras' policy and printed once. Elastic workers make no
    collective call before hvd.elastic.run: each looks at its own processor."""
    here = precision.this_process()
    ranks = [here] if FLAGS.elastic else horovod.hvd_tensorflow.allgather_object(here)
    choice = precision.choose(FLAGS.mixed_precision, FLAGS.float64, ranks,
                              saved_model=FLAGS.model.endswith(".keras"))
    precision.apply(choice)
    if hvd.rank() == 0:
        print(f"{cli.program()}: computing in {choice.policy or 'the saved types'}: "
              f"{choice.reason}")
    return choice


def resume_point(parallel):
    """Where this run starts (checkpoints.broadcast_latest: rank 0's newest intact
    checkpoint, on every rank); a benchmark starts afresh. Elastic workers make no
    collective call before hvd.elastic.run, where a worker that joins later would wait for
    ever: each reads the checkpoints itself, and the elastic state's sync hands out rank 0's."""
    warn = cli.warn if hvd.rank() == 0 else None
    folder = parallel.checkpoint_folder(parallel.place(hvd.rank(), hvd.size()))
    try:
        if FLAGS.elastic:
            epoch, saved_step, _ = checkpoints.latest(FLAGS.model_dir, cli.warn, folder)
            return Resume(epoch, saved_step, 0, 0)
        if FLAGS.benchmark:
            return Resume(0, 0, 0, 0)
        epoch, step, global_batch = checkpoints.broadcast_latest(FLAGS.model_dir, hvd, warn,
                                                                 folder)
        return Resume(epoch, step, step, global_batch)
    except checkpoints.NoIntactCheckpointError as error:
        cli.fail(error, cli.RUN_ERROR)


def data_sources():
    """The training and validation sources, named and counted (each rank reads its shard
    of them in fit())."""
    try:
        found = [input_pipeline.load(FLAGS.dataset, split, **app_flags.load_options())
                 for split in input_pipeline.SPLITS]
    except input_pipeline.sources.DamagedFileError as error:
        cli.fail(f"--dataset={FLAGS.dataset}: {error} {SKIP_CORRUPT_HINT}")
    except (FileNotFoundError, ValueError) as error:
        cli.fail(f"--dataset={FLAGS.dataset}: {error}")
    try:
        app_flags.check_extents(found[0])
    except arithmetic.FlagError as error:
        cli.fail(error)
    if hvd.rank() == 0:
        for damaged in (*found[0].damaged, *found[1].damaged):
            cli.warn(f"--skip_corrupt: {damaged}")
    return found


def build_and_restore(parallel, source, resume):
    """(this rank's model, what fit() trains, its checkpoint manager), from the same seed on
    every rank, restored from `resume`'s checkpoint or --init_checkpoint's weights."""
    normalization = (sync_batch_norm.SyncBatchNormalization if FLAGS.sync_batch_norm
                     else models.FusedBatchNormalization)
    try:
        model = parallel.build_model(source, normalization)
        # known once built: whether any block made a batch normalization layer
        if FLAGS.sync_batch_norm and not any(isinstance(layer, keras.layers.BatchNormalization)
                                             for layer in models.all_layers(model)):
            raise arithmetic.FlagError("sync_batch_norm", True, f"--model={FLAGS.model} has no "
                                       f"batch normalization to synchronize")
    except arithmetic.FlagError as error:
        cli.fail(error)
    except models.user.UserModelError as error:
        cli.fail(f"--model={FLAGS.model}: {error}")
    resumed = bool(resume.epoch or resume.saved_step)
    if FLAGS.init_checkpoint and not resumed:  # before compile(): Keras 3 would compile the
        # twin the weights are read into as well, from the losses' configs
        with checkpoint_refused(f"--init_checkpoint={FLAGS.init_checkpoint}"):
            checkpoints.initialize_from(model, FLAGS.init_checkpoint)
    models.add_weight_decay(model, optimizers.l2_loss_weight_decay(
        FLAGS.optimizer, FLAGS.weight_decay, FLAGS.base_optimizer))
    try:  # K-FAC: its factors come from the model's layers
        optimizers.watch(FLAGS.optimizer, model)
    except ValueError as error:
        cli.fail(f"--optimizer={FLAGS.optimizer}: {error}")
    optimizer = optimizers.build(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum,
                                 FLAGS.weight_decay, FLAGS.base_optimizer,
                                 app_flags.preconditioner_settings())
    # Horovod: wrap the optimizer in hvd.DistributedOptimizer (fit() scales its LR).
    trainer, optimizer = parallel.trainer(model, optimizer, source.num_outputs)
    tasks.compile_for(trainer, optimizer, source.task, source.num_outputs,
                      tasks.LossOptions(FLAGS.segmentation_loss, parallel.example_sum),
                      FLAGS.steps_per_execution)
    trainer.run_eagerly = parallel.runs_eagerly
    manager = checkpoints.manager(model, optimizer, FLAGS.model_dir,
                                  parallel.checkpoint_folder(parallel.place(hvd.rank(),
                                                                            hvd.size())))
    # The slots exist before fit(): Horovod's momentum correction scales them at the first
    # LR change (a pipeline stage's optimizer would build them only at its first step), and
    # the elastic sync finds the same ones on every worker.
    optimizers.create_slots(optimizer, trainer.trainable_variables)
    if resumed:
        with checkpoint_refused(f"--model_dir={FLAGS.model_dir}"):
            parallel.check_checkpoints(FLAGS.model_dir)
            # a sharded optimizer keeps its rank's pieces of the restored whole state, K-FAC
            # the decompositions its rank keeps
            with checkpoints.restored_whole_state(manager.checkpoint,
                                                  model.trainable_variables):
                checkpoints.restore(manager, resume.epoch, resume.saved_step)
    elif hvd.rank() == 0:
        parallel.record_layout(FLAGS.model_dir)
    return model, trainer, manager


@contextlib.contextmanager
def checkpoint_refused(source):
    """Stops the run with one line where the checkpoint from `source` (its flag and value)
    is not this model's: of another model, another cut into stages, or of the tf_keras
    version of the project."""
    try:
        yield
    except checkpoints.MismatchError as error:
        cli.fail(f"--model={FLAGS.model}: {error}", cli.RUN_ERROR)
    except pipeline_plan.CutError as error:
        cli.fail(error, cli.RUN_ERROR)
    except checkpoints.WrittenByTfKerasError as error:
        cli.fail(f"{source}: {error}", cli.RUN_ERROR)


@hvd.elastic.run
def fit_elastically(state, run):
    """fit() on the workers there are, from the state's last commit, again after each
    change of workers."""
    return fit(run, state.epoch, 0, 0, state)


def fit(run, initial_epoch, initial_step, trained_global_batch, elastic_state=None):
    """Trains from step `initial_step` of `initial_epoch` to --epochs on hvd.size()
    processes; returns the results (on every rank; rank 0 writes them)."""
    where = run.parallel.place(hvd.rank(), hvd.size())
    batch, global_batch, steps_per_epoch = batch_sizes(run.parallel, where,
                                                       run.train_source, trained_global_batch)
    span = Span(initial_epoch, initial_step, steps_per_epoch, global_batch)
    if hvd.rank() == 0:
        write_run_record(run.train_source)
    # Horovod: shard the data by rank (a pipeline's stages read their pipeline's shard).
    train_data, validation_data = datasets(run, where, batch, span)
    # Horovod: scale the learning rate by the global batch, with a warmup.
    scaled_lr, schedule = learning_rate(run, span)
    if hvd.rank() == 0 and elastic_state is not None:
        print(f"{cli.program()}: elastic: world size {hvd.size()} from epoch "
              f"{initial_epoch + 1}, global batch {global_batch}, learning rate {scaled_lr:g}",
              flush=True)
    throughput = callbacks.Throughput(run.parallel.images_per_rank(batch), hvd.size(),
                                      FLAGS.warmup_steps)
    task = run.train_source.task
    headline = tasks.headline(task, run.train_source.num_outputs)
    time_to_accuracy = callbacks.TimeToAccuracy(
        FLAGS.target_accuracy, headline, FLAGS.time_budget, lambda value: hvd.broadcast(value, 0),
        lambda value, target: tasks.reached(task, value, target))
    training_callbacks = callbacks_in_horovods_order(
        run, where, span, schedule, (throughput, time_to_accuracy), elastic_state,
        validation_data)

    # Horovod: only rank 0 prints (one line per epoch, or Keras' bar for one process on a
    # terminal, whose per-step work the other ranks would wait for).
    progress_bar = hvd.size() == 1 and sys.stdout.isatty() and not FLAGS.benchmark
    with failures_end_the_run(run):
        tasks.build_compiled_state(run.trainer, train_data[0].element_spec)
        history = preemption.fit_from_step(
            run.trainer, initial_epoch, initial_step, train_data,
            steps_per_epoch=steps_per_epoch, epochs=FLAGS.epochs,
            validation_data=None if FLAGS.benchmark else validation_data, shuffle=False,
            validation_steps=FLAGS.validation_steps, callbacks=training_callbacks,
            verbose=(1 if progress_bar else 2) if hvd.rank() == 0 else 0)
    return results.summary(
        history, initial_epoch, time_to_accuracy.reached,
        results.gathered(throughput,
                         tasks.voxels_per_example(task, run.train_source.feature_shape),
                         optimizers.state_elements(run.trainer.optimizer)),
        experiment=FLAGS.experiment, world_size=hvd.size(), batch_size=batch,
        headline_metric=f"val_{headline}" if headline else None,
        headline_lower_is_better=tasks.TASKS[task].lower_is_better,
        **run.parallel.results(), global_batch_size=global_batch, learning_rate=scaled_lr,
        steps_per_epoch=steps_per_epoch,
        trainable_parameters=sum(v.shape.num_elements() for v in run.model.trainable_variables),
        precision=run.precision.policy or run.model.dtype_policy.name,
        precision_reason=run.precision.reason)


def batch_sizes(parallel, where, source, trained_global_batch):
    """(batch per replica, global batch, steps per epoch): a resumed run keeps the global
    batch it was trained with, at any number of processes."""
    request = app_flags.batch_request()
    try:
        requested_batch, _ = arithmetic.batch_sizes(request, where.replicas)
        batch, global_batch = arithmetic.batch_sizes(
            request, where.replicas,
            resumed=(FLAGS.model_dir, trained_global_batch) if trained_global_batch else None)
        steps_per_epoch = arithmetic.steps_per_epoch(
            request, source.num_examples, global_batch, FLAGS.steps_per_epoch)
    except arithmetic.FlagError as error:
        cli.fail(error)
    if hvd.rank() == 0 and batch != requested_batch:
        cli.warn(f"{FLAGS.model_dir} was trained at a global batch of {global_batch}; "
                 f"resuming on {where.replicas} {parallel.replica_noun} at {batch} each keeps "
                 f"it (start a new --model_dir to change it)")
    return batch, global_batch, steps_per_epoch


def datasets(run, where, batch, span):
    """(training, validation) batches of this rank's shard: its replica's (the stages of a
    pipeline read alike); the training batches from the span's first step, and for a run
    resumed mid-epoch, from the next epoch's start too (preemption.fit_from_step). The same
    seed on every rank: the files are dealt out, and with --deterministic shuffled, alike."""
    tf.random.set_seed(FLAGS.seed)
    starts = [(span.first_epoch, span.first_step)]
    if span.first_step:
        starts.append((span.first_epoch + 1, 0))
    train_data = [input_pipeline.training_dataset(
        run.train_source, rank=where.replica, size=where.replicas, batch_size=batch,
        steps_per_epoch=span.steps_per_epoch, first_epoch=epoch, first_step=step,
        seed=FLAGS.seed, shuffle_buffer=FLAGS.shuffle_buffer, cache=FLAGS.cache,
        deterministic=FLAGS.deterministic, threads=run.threads, slab=(where.part, where.parts))
        for epoch, step in starts]
    validation_data = input_pipeline.evaluation_dataset(
        run.validation_source, rank=where.replica, size=where.replicas, batch_size=batch,
        cache=FLAGS.cache, repeat=FLAGS.validation_steps is not None, threads=run.threads,
        slab=(where.part, where.parts))
    tf.random.set_seed(FLAGS.seed + hvd.rank())  # per-rank randomness from here on
    return train_data, validation_data


def learning_rate(run, span):
    """(the LR scaled to the batch one update averages, Horovod's schedule callbacks): the
    global batch's (under --adasum, that of the processes Horovod averages before Adasum
    combines the rest); a resumed run starts where the schedule left the optimizer."""
    scaled_lr = app_flags.scaled_learning_rate(
        span.global_batch // hvd.size() * horovod.adasum_averaged_processes()
        if FLAGS.adasum else span.global_batch)
    schedule = callbacks.learning_rate_schedule(
        hvd, scaled_lr, reference_lr=FLAGS.learning_rate, warmup_epochs=FLAGS.warmup_epochs,
        schedule=FLAGS.lr_schedule, epochs=FLAGS.epochs, steps_per_epoch=span.steps_per_epoch,
        decay_epochs=app_flags.decay_epochs(), decay_factor=FLAGS.lr_decay_factor)
    run.trainer.optimizer.learning_rate.assign(callbacks.learning_rate_before(
        schedule, span.first_epoch, span.steps_per_epoch, scaled_lr, span.first_step))
    checkpoints.set_global_batch(run.checkpoint_manager, span.global_batch)
    return scaled_lr, schedule


def callbacks_in_horovods_order(run, where, span, schedule, meters, elastic_state,
                                validation_data):
    """The callbacks of fit(), in Horovod's order, each for the reason beside it; `meters`:
    the throughput and the time to accuracy."""
    throughput = meters[0]
    found, progressed = [], lambda: None
    if FLAGS.stall_timeout:  # ends the job, naming the silent ranks, when one stalls
        found.append(watchdog.StallWatchdog(
            FLAGS.stall_timeout, os.path.join(FLAGS.model_dir, "heartbeats"), hvd.rank(),
            hvd.size(), watchdog.exit_process(cli.RUN_ERROR)))
        progressed = found[-1].progressed
    if elastic_state is None:  # elastic: the state's sync broadcasts
        # Horovod: broadcast rank 0's initial variables to every rank.
        found.append(run.parallel.broadcast_callback())
    # Horovod: average the metrics over the ranks.
    found.append(hvd.callbacks.MetricAverageCallback())
    # validation over all the examples evaluated, however unequal the ranks' shards
    found.append(callbacks.ExactValidationMetrics(
        lambda sums: hvd.allreduce(sums, op=hvd.Sum, name="validation_sums")))
    scores = tasks.TASKS[run.train_source.task].validation_callbacks
    if scores and not FLAGS.benchmark:  # the task's own scores of the whole split
        found += scores(run.validation_source, validation_data, where,
                        run.parallel.whole_examples,
                        lambda rows: hvd.allgather(rows, name="validation_scores"), progressed)
    found.append(callbacks.StopOnNonFiniteLoss(hvd.allgather, span.steps_per_epoch))
    # Horovod: warm up the learning rate, then schedule it.
    found += schedule
    # the optimizer's whole state for a save (a sharded one's, or K-FAC's decompositions,
    # gathered from every rank)
    whole_state = functools.partial(checkpoints.whole_state,
                                    run.checkpoint_manager.checkpoint, where.saves)
    if not (FLAGS.benchmark or elastic_state):  # after the schedule: its checkpoint holds the
        found.append(preemption.StopOnSignal(  # optimizer's own momentum
            lambda value: int(max(hvd.allgather(tf.constant([value]), name="signal"))),
            lambda epochs, steps: checkpoints.save_mid_epoch(
                run.checkpoint_manager, epochs, steps, where.saves, whole_state),
            span.steps_per_epoch, FLAGS.preemption_check_steps, FLAGS.accumulation_steps))
    found += meters
    if not FLAGS.benchmark:
        # Horovod: checkpoints on rank 0 only (each stage's on its first replica).
        found.append(checkpoints.SaveEveryEpoch(run.checkpoint_manager, where.saves,
                                                whole_state))
    if hvd.rank() == 0 and not FLAGS.benchmark:
        found += summaries.callbacks(
            FLAGS.model_dir, flag_values=app_flags.values(), every_steps=FLAGS.summary_steps,
            steps_per_epoch=span.steps_per_epoch, global_batch=span.global_batch,
            throughput=throughput,
            profile_steps=arithmetic.profile_steps(FLAGS.profile_steps))
        found.append(keras.callbacks.CSVLogger(
            os.path.join(FLAGS.model_dir, "training_log.csv"), append=span.first_epoch > 0))
    if hvd.rank() == 0 and FLAGS.benchmark and FLAGS.profile_steps:  # its trace alone
        found.append(summaries.profiler(FLAGS.model_dir,
                                        arithmetic.profile_steps(FLAGS.profile_steps)))
    shows = tasks.TASKS[run.train_source.task].epoch_callbacks
    if shows and where.replica == 0 and not FLAGS.benchmark:
        # a validation example, put together by its replica's ranks, drawn by rank 0
        found += shows(FLAGS.model_dir if hvd.rank() == 0 else None,
                       next(iter(validation_data.unbatch())), run.parallel.whole_examples)
    if elastic_state is not None:  # last: a commit that meets a change of workers ends fit()
        found += [callbacks.UpdateEpochState(elastic_state),
                  hvd.elastic.CommitStateCallback(elastic_state, FLAGS.commit_steps)]
    return found


@contextlib.contextmanager
def failures_end_the_run(run):
    """A failure in fit() ends the process with one line and its exit code."""
    try:
        yield
    except callbacks.NonFiniteLoss as error:
        cli.fail(error, cli.RUN_ERROR)
    except preemption.Preempted as error:
        cli.fail(error, cli.PREEMPTED)
    except checkpoints.SaveError as error:  # rank 0's; mpirun then ends the other ranks
        cli.fail(error, cli.RUN_ERROR, this_rank_only=True)
    except OSError as error:  # rank 0's logs, on a full or lost filesystem
        cli.fail(f"--model_dir={FLAGS.model_dir}: {error}", cli.RUN_ERROR, this_rank_only=True)
    except tf.errors.DataLossError as error:
        damaged = input_pipeline.name_damaged_file((run.train_source, run.validation_source),
                                                   error)
        cli.fail(f"--data_dir={FLAGS.data_dir}: {damaged} {SKIP_CORRUPT_HINT}", cli.RUN_ERROR,
                 this_rank_only=True)
    except Exception as error:  # noqa: BLE001 (Horovod's shutdown surfaces as several types)
        if "Horovod has been shut down" not in str(error):
            raise
        # Another rank failed first and said why; this one stops without a traceback.
        print(f"{cli.program()}: rank {hvd.rank()}: stopped, as Horovod was shut down by "
              f"another rank's failure", file=sys.stderr, flush=True)
        sys.exit(cli.RUN_ERROR)


def write_run_record(source):
    """MODEL_DIR/flags.cfg, every flag's value, which reproduces the run; and the record of
    its model (checkpoints.write_model_record), which app.predict rebuilds it from."""
    os.makedirs(FLAGS.model_dir, exist_ok=True)
    with open(os.path.join(FLAGS.model_dir, "flags.cfg"), "w") as flagfile:
        flagfile.write(app_flags.resolved_flagfile())
    checkpoints.write_model_record(FLAGS.model_dir, FLAGS.model, source,
                                   keras.mixed_precision.global_policy().name)


def write_results(run_results, started):
    try:
        results.write(FLAGS.model_dir,
                      {**run_results, "wall_seconds": time.perf_counter() - started})
    except OSError as error:
        cli.fail(f"--model_dir={FLAGS.model_dir}: {error}", cli.RUN_ERROR)


def run():
    app_flags.define_training_flags()
    try:
        app.run(main, flags_parser=app_flags.parse)
    except Exception:  # noqa: BLE001 (a bug's traceback, then out without MPI's finalize,
        traceback.print_exc()  # which would wait for ranks waiting for this one: mpirun
        sys.stderr.flush()  # ends the job instead of hanging)
        os._exit(cli.RUN_ERROR)


if __name__ == "__main__":
    run()
