"""Trains an experiment on one process or many, with Horovod.

    python -m app.train --flagfile=configs/digits_cnn.cfg                # one process
    mpirun -np 4 python -m app.train --flagfile=configs/digits_cnn.cfg   # or horovodrun, srun
    python -m app.launch -np 4 --flagfile=configs/digits_cnn.cfg         # the tuned launcher
    python -m app.launch -np 4 --min_np=2 --max_np=8 \\
        --host_discovery_script=discover.sh --flagfile=...             # elastic (--elastic)

The Horovod recipe reads top to bottom: main() inits Horovod, pins a GPU per local rank,
resumes, builds the model and wraps its optimizer in hvd.DistributedOptimizer; train() then
shards the data by rank, scales the learning rate with the global batch, adds the callbacks
in Horovod's order and fits, with the outputs on rank 0 only. Under --elastic, train() runs
again, with the new number of processes, each time workers leave or join.
"""
import functools
import os
import sys
import time

# first: app.compat sets TF_USE_LEGACY_KERAS before TensorFlow loads
from app.compat import hvd, hvd_tensorflow, tf

from absl import app

import input_pipeline
import models
from app import arithmetic, callbacks, checkpoints, devices, optimizers, results, summaries
from app import pipeline, preemption, sync_batch_norm, watchdog
from app import flags as app_flags

FLAGS = app_flags.FLAGS
SKIP_CORRUPT_HINT = "(--skip_corrupt reads up to the damage)"


def main(_):
    started = time.perf_counter()

    # 1. Horovod, then this process's devices: one GPU per local rank, its share of the cores.
    if FLAGS.timeline:  # Horovod's rank 0 opens it in hvd.init(), so it is named before
        os.makedirs(FLAGS.model_dir, exist_ok=True)
        os.environ["HOROVOD_TIMELINE"] = os.path.join(FLAGS.model_dir, "timeline.json")
    if FLAGS.jit_compile:  # XLA compiles the step's ops around Horovod's (app.compat)
        tf.config.optimizer.set_jit("autoclustering")
    # Horovod's background thread polls while it waits for the other ranks: where the rank
    # computes on its CPU cores, it runs on what the compute threads leave (BENCHMARKS.md).
    # Pipeline stages: Horovod on mpi4py's MPI, with a process set per stage, its threads at
    # normal priority, as the stages' messages wait for them (app.pipeline).
    stages = FLAGS.pipeline_stages
    with devices.threads_started_at_lowest_priority(
            FLAGS.deprioritize_horovod_threads and not devices.has_gpu() and stages == 1):
        try:
            parallel = pipeline.init_arguments(stages, app_flags.world_size_from_environment())
        except RuntimeError as error:
            app_flags.fail(f"--pipeline_stages={stages}: {error}")
        hvd.init(**parallel)
    where = pipeline.position(hvd.rank(), hvd.size(), stages)
    devices.pin_gpu(hvd.local_rank())
    threads = devices.cpu_threads(hvd.local_size(), FLAGS.threads_per_process)
    devices.set_cpu_threads(threads)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    if FLAGS.adasum and not hvd.mpi_enabled():
        app_flags.fail("--adasum: needs Horovod's MPI controller (mpirun, srun, or horovodrun "
                       "--mpi); this run uses Gloo")

    # 2. Resume: rank 0 finds the latest checkpoint and tells every rank its epoch and the
    #    global batch it was trained with, which a resumed run keeps at any number of ranks.
    #    Elastic workers make no collective call before hvd.elastic.run (one that joins later
    #    would wait in it for ever): each reads the checkpoint, and the elastic state's sync
    #    hands out rank 0's; the global batch then follows the number of workers.
    #    A benchmark starts afresh.
    #    A damaged newest checkpoint is passed over for the newest intact one. A run stopped
    #    by a signal resumes at the step it stopped at (elastic: at the start of its epoch).
    warn = functools.partial(print, "app.train: warning:", file=sys.stderr, flush=True)
    try:
        if FLAGS.elastic:
            initial_epoch, saved_step, _ = checkpoints.latest(FLAGS.model_dir, warn)
            initial_step, trained_global_batch = 0, 0
        elif FLAGS.benchmark:
            initial_epoch, saved_step, initial_step, trained_global_batch = 0, 0, 0, 0
        else:
            initial_epoch, saved_step, trained_global_batch = checkpoints.broadcast_latest(
                FLAGS.model_dir, hvd, warn if hvd.rank() == 0 else None,
                checkpoints.subfolder(0, stages))
            initial_step = saved_step
    except checkpoints.NoIntactCheckpointError as error:
        app_flags.fail(error, app_flags.RUN_ERROR)
    if initial_epoch >= FLAGS.epochs:
        if hvd.rank() == 0:
            print(f"{FLAGS.model_dir} already holds {initial_epoch} epochs; nothing to train")
        return

    # 3. Data sources, named and counted (each rank reads its shard of them in train()).
    try:
        train_source, validation_source = (
            input_pipeline.load(FLAGS.dataset, split, data_dir=FLAGS.data_dir,
                                image_size=FLAGS.image_size, seed=FLAGS.seed,
                                skip_corrupt=FLAGS.skip_corrupt)
            for split in input_pipeline.SPLITS)
    except input_pipeline.sources.DamagedFileError as error:
        app_flags.fail(f"--dataset={FLAGS.dataset}: {error} {SKIP_CORRUPT_HINT}")
    except (FileNotFoundError, ValueError) as error:
        app_flags.fail(f"--dataset={FLAGS.dataset}: {error}")
    if hvd.rank() == 0:
        for damaged in (*train_source.damaged, *validation_source.damaged):
            print(f"app.train: warning: --skip_corrupt: {damaged}", file=sys.stderr, flush=True)

    # 4. Model and Horovod's distributed optimizer (train() sets its LR for the global batch),
    #    from the same seed on every rank: identical initial weights. Mixed precision
    #    computes in float16 or bfloat16 and keeps float32 variables; float16's loss scaling
    #    wraps the distributed optimizer, so that every rank sees the same overflows.
    #    --float64 computes and keeps everything in float64. Pipelined: this rank's stage of
    #    the model, whose step averages the gradients over the stage's replicas itself
    #    (app.pipeline).
    if FLAGS.mixed_precision:
        tf.keras.mixed_precision.set_global_policy(f"mixed_{FLAGS.mixed_precision}")
    elif FLAGS.float64:
        tf.keras.mixed_precision.set_global_policy("float64")
    normalization = (sync_batch_norm.SyncBatchNormalization if FLAGS.sync_batch_norm
                     else tf.keras.layers.BatchNormalization)
    stage_blocks = pipeline.cut(
        models.blocks_of(FLAGS.model, train_source.feature_shape, train_source.num_outputs)
        if stages > 1 else [], stages, FLAGS.pipeline_balance)
    first_block, last_block = stage_blocks[where.stage]
    model = models.build(FLAGS.model, train_source.feature_shape, train_source.num_outputs,
                         normalization, seed=FLAGS.seed, first_block=first_block,
                         last_block=last_block, input_scaling=train_source.input_scaling)
    models.add_weight_decay(
        model, 0.0 if FLAGS.optimizer in optimizers.DECAY_INSIDE else FLAGS.weight_decay)
    optimizer = optimizers.build(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum,
                                 FLAGS.weight_decay)
    checkpointed = model
    if app_flags.pipelined():
        model = pipeline.stage(model, where, parallel, FLAGS.microbatches,
                               train_source.num_outputs, FLAGS.recompute,
                               FLAGS.pipeline_schedule)
    else:
        horovod_options = optimizers.horovod_options(FLAGS.accumulation_steps,
                                                     FLAGS.fp16_allreduce)
        optimizer = (optimizers.adasum_distributed_optimizer(optimizer, **horovod_options)
                     if FLAGS.adasum else hvd.DistributedOptimizer(optimizer, **horovod_options))
        optimizer = optimizers.loss_scaled(optimizer, FLAGS.mixed_precision)
    models.compile_for_task(model, optimizer, train_source.task, FLAGS.steps_per_execution)
    model.run_eagerly = app_flags.pipelined()  # its steps pass tensors through MPI

    # Every rank restores the checkpoint of its epoch (weights and optimizer state), or a new
    # run starts from --init_checkpoint's weights. A stage's checkpoint is its blocks'.
    checkpoint_manager = checkpoints.manager(checkpointed, optimizer, FLAGS.model_dir,
                                             checkpoints.subfolder(where.stage, stages))
    if FLAGS.elastic:  # the slots exist on every worker, so that the elastic sync matches
        optimizers.create_slots(optimizer, model.trainable_variables)
    try:
        if initial_epoch or saved_step:
            if stages > 1:
                pipeline.check_cut(FLAGS.model_dir, FLAGS.model, stage_blocks)
            checkpoints.restore(checkpoint_manager, initial_epoch, saved_step)
        elif FLAGS.init_checkpoint:
            checkpoints.initialize_from(checkpointed, FLAGS.init_checkpoint)
    except checkpoints.MismatchError as error:
        app_flags.fail(f"--model={FLAGS.model}: {error}", app_flags.RUN_ERROR)
    except pipeline.CutError as error:
        app_flags.fail(error, app_flags.RUN_ERROR)
    if stages > 1 and not (initial_epoch or saved_step) and hvd.rank() == 0:
        pipeline.record_cut(FLAGS.model_dir, FLAGS.model, stage_blocks)

    # 5. Train: on the processes there are, or elastically, from the last commit, on the
    #    workers there are after each change (Horovod's KerasState holds model and optimizer).
    train_from = functools.partial(train, model, checkpoint_manager, train_source,
                                   validation_source, threads)
    if FLAGS.elastic:
        state = hvd.elastic.KerasState(model, optimizer, epoch=initial_epoch)
        run_results = hvd.elastic.run(lambda state: train_from(state.epoch, 0, 0, state))(state)
    else:
        run_results = train_from(initial_epoch, initial_step, trained_global_batch)

    if hvd.rank() == 0:
        try:
            results.write(FLAGS.model_dir,
                          {**run_results, "wall_seconds": time.perf_counter() - started})
        except OSError as error:
            app_flags.fail(f"--model_dir={FLAGS.model_dir}: {error}", app_flags.RUN_ERROR)


def train(model, checkpoint_manager, train_source, validation_source, threads, initial_epoch,
          initial_step, trained_global_batch, elastic_state=None):
    """Trains from step `initial_step` of `initial_epoch` to --epochs on hvd.size()
    processes; returns the results (on every rank; rank 0 writes them)."""
    is_chief = hvd.rank() == 0
    where = pipeline.position(hvd.rank(), hvd.size(), FLAGS.pipeline_stages)
    saves_checkpoints = where.replica == 0  # rank 0, or each stage's first replica

    # Batch sizes: per-process (per-pipeline) batch x processes (pipelines) x accumulation
    # steps is the global batch.
    request = app_flags.batch_request()
    try:
        requested_batch, _ = arithmetic.batch_sizes(request, where.replicas)
        batch, global_batch = arithmetic.batch_sizes(
            request, where.replicas,
            resumed=(FLAGS.model_dir, trained_global_batch) if trained_global_batch else None)
        steps_per_epoch = arithmetic.steps_per_epoch(
            request, train_source.num_examples, global_batch, FLAGS.steps_per_epoch)
    except app_flags.FlagError as error:
        app_flags.fail(error)
    if is_chief and batch != requested_batch:
        print(f"app.train: warning: {FLAGS.model_dir} was trained at a global batch of "
              f"{global_batch}; resuming on {where.replicas} "
              f"{'pipelines' if where.stages > 1 else 'processes'} at {batch} each keeps it "
              f"(start a new --model_dir to change it)", file=sys.stderr, flush=True)

    # Data: each rank reads its own disjoint shard (the stages of a pipeline, their
    # pipeline's); every rank runs the same steps. The same seed on every rank: the files are
    # dealt out alike each epoch and, with --deterministic, shuffled alike, each rank taking
    # its slice of every global batch.
    tf.random.set_seed(FLAGS.seed)
    train_data = input_pipeline.training_dataset(
        train_source, rank=where.replica, size=where.replicas, batch_size=batch,
        steps_per_epoch=steps_per_epoch, first_epoch=initial_epoch, first_step=initial_step,
        seed=FLAGS.seed,
        shuffle_buffer=FLAGS.shuffle_buffer, cache=FLAGS.cache,
        deterministic=FLAGS.deterministic, threads=threads)
    validation_data = input_pipeline.evaluation_dataset(
        validation_source, rank=where.replica, size=where.replicas, batch_size=batch,
        cache=FLAGS.cache, repeat=FLAGS.validation_steps is not None, threads=threads)
    tf.random.set_seed(FLAGS.seed + hvd.rank())  # per-rank randomness from here on

    # The learning rate, scaled to the batch whose gradients one update averages: the global
    # batch; under --adasum, that of the processes whose gradients Horovod averages before
    # Adasum combines the rest (one process on CPUs, a node on GPUs). Its schedule: a warmup
    # from the reference batch's LR, then constant, step or cosine (Horovod's callbacks, which
    # set it every step); a resumed run starts where the schedule left the optimizer.
    scaled_lr = app_flags.scaled_learning_rate(
        global_batch // hvd.size() * optimizers.adasum_averaged_processes() if FLAGS.adasum
        else global_batch)
    schedule = callbacks.learning_rate_schedule(
        hvd, scaled_lr, reference_lr=FLAGS.learning_rate, warmup_epochs=FLAGS.warmup_epochs,
        schedule=FLAGS.lr_schedule, epochs=FLAGS.epochs, steps_per_epoch=steps_per_epoch,
        decay_epochs=app_flags.decay_epochs(), decay_factor=FLAGS.lr_decay_factor)
    tf.keras.backend.set_value(model.optimizer.lr, callbacks.learning_rate_before(
        schedule, initial_epoch, steps_per_epoch, scaled_lr, initial_step))
    checkpoints.set_global_batch(checkpoint_manager, global_batch)
    if is_chief and elastic_state is not None:
        print(f"app.train: elastic: world size {hvd.size()} from epoch {initial_epoch + 1}, "
              f"global batch {global_batch}, learning rate {scaled_lr:g}", flush=True)

    # Callbacks: a watchdog that ends the job when a rank stalls; then, in Horovod's order:
    # broadcast rank 0's state (elastic: the state's sync does it), average the metrics over
    # the ranks (validation: over all the examples evaluated, however unequal the ranks'
    # shards), stop on a non-finite loss, warm up and schedule the LR, stop at a signal
    # (with a checkpoint of that step), time the steps and the epochs (and stop at a target
    # accuracy or time budget); the outputs, on rank 0; elastic: record the finished epoch
    # and commit.
    # (each stage of a pipeline counts its share of the pipeline's images)
    throughput = callbacks.Throughput(batch / where.stages, hvd.size(), FLAGS.warmup_steps)
    time_to_accuracy = callbacks.TimeToAccuracy(
        FLAGS.target_accuracy, FLAGS.time_budget, lambda value: hvd.broadcast(value, 0))
    training_callbacks = [
        *([watchdog.StallWatchdog(FLAGS.stall_timeout,
                                  os.path.join(FLAGS.model_dir, "heartbeats"), hvd.rank(),
                                  hvd.size(), watchdog.exit_process(app_flags.RUN_ERROR))]
          if FLAGS.stall_timeout else []),
        *([] if elastic_state else [pipeline.BroadcastStageVariables()
                                    if where.stages > 1
                                    else hvd.callbacks.BroadcastGlobalVariablesCallback(0)]),
        hvd.callbacks.MetricAverageCallback(),
        callbacks.ExactValidationMetrics(
            lambda sums: hvd.allreduce(sums, op=hvd.Sum, name="validation_sums")),
        callbacks.StopOnNonFiniteLoss(hvd.allgather, steps_per_epoch),
        *schedule,
        # after the schedule, which restores the momentum it corrected for the step: the
        # checkpoint of the step holds the optimizer's own
        *([] if FLAGS.benchmark or elastic_state else [preemption.StopOnSignal(
            lambda value: int(max(hvd.allgather(tf.constant([value]), name="signal"))),
            lambda epochs, steps: (checkpoints.save_mid_epoch(checkpoint_manager, epochs, steps)
                                   if saves_checkpoints else None),
            steps_per_epoch, FLAGS.preemption_check_steps)]),
        throughput,
        time_to_accuracy,
    ]
    if is_chief:
        os.makedirs(FLAGS.model_dir, exist_ok=True)
        with open(os.path.join(FLAGS.model_dir, "flags.cfg"), "w") as flagfile:
            flagfile.write(app_flags.resolved_flagfile())
    if saves_checkpoints and not FLAGS.benchmark:
        training_callbacks.append(checkpoints.SaveEveryEpoch(checkpoint_manager))
    if is_chief and not FLAGS.benchmark:
        training_callbacks += [
            *summaries.callbacks(
                FLAGS.model_dir, flag_values=app_flags.values(),
                every_steps=FLAGS.summary_steps, steps_per_epoch=steps_per_epoch,
                global_batch=global_batch, throughput=throughput,
                profile_steps=arithmetic.profile_steps(FLAGS.profile_steps)),
            tf.keras.callbacks.CSVLogger(os.path.join(FLAGS.model_dir, "training_log.csv"),
                                         append=initial_epoch > 0),
        ]
    if elastic_state is not None:  # last: a commit that meets a change of workers ends fit()
        training_callbacks += [
            callbacks.UpdateEpochState(elastic_state),
            hvd.elastic.CommitStateCallback(elastic_state, FLAGS.commit_steps),
        ]

    # Rank 0 prints: Keras' progress bar for one process on a terminal, else one line per
    # epoch (verbose=2, which skips the bar's per-step work: the other ranks waited for it at
    # every allreduce, and mpirun gives every rank a terminal).
    progress_bar = hvd.size() == 1 and sys.stdout.isatty() and not FLAGS.benchmark
    model._training_state = (  # noqa: SLF001 (what Keras' BackupAndRestore sets)
        preemption.ResumeAt(initial_epoch, initial_step) if initial_step else None)
    try:
        history = model.fit(
            train_data, steps_per_epoch=steps_per_epoch, epochs=FLAGS.epochs,
            initial_epoch=initial_epoch,
            validation_data=None if FLAGS.benchmark else validation_data,
            validation_steps=FLAGS.validation_steps, callbacks=training_callbacks,
            verbose=(1 if progress_bar else 2) if is_chief else 0)
    except callbacks.NonFiniteLoss as error:
        app_flags.fail(error, app_flags.RUN_ERROR)
    except preemption.Preempted as error:
        app_flags.fail(error, app_flags.PREEMPTED)
    except checkpoints.SaveError as error:  # rank 0's; mpirun then ends the other ranks
        app_flags.fail(error, app_flags.RUN_ERROR, this_rank_only=True)
    except OSError as error:  # rank 0's logs, on a full or lost filesystem
        app_flags.fail(f"--model_dir={FLAGS.model_dir}: {error}", app_flags.RUN_ERROR,
                       this_rank_only=True)
    except tf.errors.DataLossError as error:
        damaged = input_pipeline.name_damaged_file((train_source, validation_source), error)
        app_flags.fail(f"--data_dir={FLAGS.data_dir}: {damaged} {SKIP_CORRUPT_HINT}",
                       app_flags.RUN_ERROR, this_rank_only=True)
    except Exception as error:  # noqa: BLE001 (Horovod's shutdown surfaces as several types)
        if "Horovod has been shut down" not in str(error):
            raise
        # Another rank failed first and said why; this one stops without a traceback.
        print(f"app.train: rank {hvd.rank()}: stopped, as Horovod was shut down by another "
              f"rank's failure", file=sys.stderr, flush=True)
        sys.exit(app_flags.RUN_ERROR)

    return results.summary(
        history, initial_epoch, time_to_accuracy.reached,
        {**results.gathered_throughput(throughput, hvd.allgather),
         **results.gathered_peak_memory(hvd.allgather), **results.gathered_layout(hvd_tensorflow)},
        experiment=FLAGS.experiment, world_size=hvd.size(), batch_size=batch,
        pipeline_stages=where.stages, microbatches=FLAGS.microbatches,
        global_batch_size=global_batch, learning_rate=scaled_lr,
        steps_per_epoch=steps_per_epoch,
        trainable_parameters=sum(v.shape.num_elements() for v in model.trainable_variables),
        precision=tf.keras.mixed_precision.global_policy().name)


def run():
    app_flags.define_training_flags()
    app.run(main, flags_parser=app_flags.parse)


if __name__ == "__main__":
    run()
