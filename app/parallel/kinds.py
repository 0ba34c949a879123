"""How the model is spread over the ranks: one object, chosen once from the flags, owns
everything that differs between the kinds of parallelism, so that app.train asks it and
never branches on them.

A kind is one entry of KINDS, tried in order (data parallelism last, the default). Each
says which flags want it, what it refuses, how hvd.init() is called, where a rank sits, how
many data-parallel replicas the batch is divided by, which blocks of the model a rank
builds, what trains them (the optimizer wrapped by Horovod, or a stage's own step), which
callback broadcasts the initial state, and where a rank's checkpoints go. A new kind is a
new class here and an entry in KINDS.
"""
import models
from app import checkpoints, cli, devices, horovod, optimizers, tasks
from app.arithmetic import FlagError, batch_sizes
from app.horovod import hvd
from app.parallel import pipeline, pipeline_plan, sharded_optimizer, spatial

# Where a rank sits: its pipeline stage (of `stages`) and its data-parallel replica (of
# `replicas`); plain data parallelism has one stage.
Position = pipeline_plan.Position


def outputs_of_task(source):
    """models.build's check of a user's model: the outputs `source`'s task needs."""
    return dict(task=source.task, output_shape=tasks.output_shape(
        source.task, source.feature_shape, source.num_outputs))


class DataParallel:
    """Horovod's data parallelism: every rank holds the whole model, reads its shard of
    every global batch, and hvd.DistributedOptimizer averages the gradients (or Adasum
    combines them) before each update."""
    name = "data"

    def __init__(self, flags):
        self.flags = flags

    @staticmethod
    def wanted(flags):
        del flags
        return True

    def validate(self, world_size, batch_request):
        """Raises FlagError for what this kind cannot run on `world_size` processes with
        app.arithmetic's `batch_request`."""
        del batch_request
        if self.flags.adasum and world_size & (world_size - 1):
            raise FlagError("adasum", True, f"needs a power-of-2 number of processes "
                                            f"(Horovod's Adasum), not {world_size}")
        self.refuse_with_sharding(adasum=self.flags.adasum, elastic=self.flags.elastic)

    def sharding(self):
        """The ZeRO stage of the optimizer state: 0 (none), 1 (--shard_optimizer_state) or
        2 (--shard_gradients)."""
        return 2 if self.flags.shard_gradients else int(self.flags.shard_optimizer_state)

    def refuse_with_sharding(self, **refused):
        """Raises FlagError naming the first flag of `refused` (name -> whether set) that is
        set while the optimizer state is sharded."""
        stage = self.sharding()
        for name, value in refused.items():
            if stage and value:
                raise FlagError(name, self.flags[name].value, "is not supported with "
                                f"--{'shard_gradients' if stage == 2 else 'shard_optimizer_state'}")

    def init_arguments(self, world_size):
        """hvd.init()'s keyword arguments."""
        del world_size
        return {}

    def deprioritize_horovod_threads(self):
        """Whether the threads hvd.init() starts run at the lowest CPU priority
        (--deprioritize_horovod_threads: on CPUs only, where they poll beside the compute)."""
        return self.flags.deprioritize_horovod_threads and not devices.has_gpu()

    def place(self, rank, size):
        return Position(0, 1, rank, size)

    def replicas(self, world_size):
        """The data-parallel replicas among `world_size` processes, which share each global
        batch."""
        return world_size

    replica_noun = "processes"

    def build_model(self, source, normalization):
        """This rank's Keras model, from the same seed on every rank (--recompute: a model
        that recomputes parts of itself, such as a U-Net's levels)."""
        return models.build(self.flags.model, source.feature_shape, source.num_outputs,
                            normalization, seed=self.flags.seed,
                            input_scaling=source.input_scaling, recompute=self.flags.recompute,
                            **outputs_of_task(source))

    def trainer(self, model, optimizer, num_outputs):
        """(what fit() trains, its optimizer): here the model itself, with Horovod's
        distributed optimizer (and float16's loss scaling inside it, which then checks the
        reduced gradients, so that every rank sees the same overflows)."""
        del num_outputs
        flags = self.flags
        options = horovod.allreduce_options(flags.accumulation_steps, flags.fp16_allreduce,
                                            flags.adasum)
        optimizer = optimizers.loss_scaled(optimizer, flags.mixed_precision)
        stage = self.sharding()
        if stage:  # ZeRO: reduce-scatter, update this rank's pieces, allgather
            return model, sharded_optimizer.shard(
                optimizer, gradients_too=stage == 2,
                accumulation_steps=flags.accumulation_steps,
                compression=options["compression"],
                agree_on_overflow=flags.mixed_precision == "float16")
        return model, hvd.DistributedOptimizer(optimizer, **options)

    runs_eagerly = False

    @staticmethod
    def broadcast_callback():
        """Rank 0's initial variables to every rank, after the first step made the
        optimizer's slots."""
        return hvd.callbacks.BroadcastGlobalVariablesCallback(0)

    def checkpoint_folder(self, where):
        """The folder of `where`'s checkpoints under the model_dir."""
        del where
        return checkpoints.stage_folder()

    def check_checkpoints(self, model_dir):
        """Raises pipeline_plan.CutError when `model_dir`'s checkpoints were laid out by
        another cut of the model than this run's (none for data parallelism)."""

    def record_layout(self, model_dir):
        """Writes, beside the checkpoints of a new run, what check_checkpoints reads."""

    def images_per_rank(self, batch):
        """The images a rank counts per step of `batch` per replica."""
        return batch

    # A function summing a tensor over the ranks that share each example, for the losses that
    # sum over it (models.segmentation); None: each rank holds whole examples.
    example_sum = None

    @staticmethod
    def whole_examples(examples):
        """The whole examples of this rank's share `examples` (a collective where ranks hold
        parts of them)."""
        return examples

    def results(self):
        return {"parallelism": self.name, "pipeline_stages": 1, "microbatches": 1,
                "spatial_parts": 1, "optimizer_state_sharding": self.sharding()}


class PipelineParallel(DataParallel):
    """app.parallel.pipeline: the model cut into --pipeline_stages stages, one per rank, each step's
    batch run through them as --microbatches (with --recompute, activations recomputed in
    the backward pass); the replicas of each stage average their gradients in the stage's
    process set."""
    name = "pipeline"
    replica_noun = "pipelines"
    runs_eagerly = True  # its steps pass tensors through MPI between their operations

    def __init__(self, flags):
        super().__init__(flags)
        self.stages = flags.pipeline_stages
        self._cut, self._arguments = None, None

    @staticmethod
    def wanted(flags):
        recompute_stage = flags.recompute and not models.builder(flags.model).recomputes
        return flags.pipeline_stages > 1 or flags.microbatches > 1 or recompute_stage

    def validate(self, world_size, batch_request):
        flags, stages = self.flags, self.stages
        if not models.user.is_user_model(flags.model):  # a user's: once built (cut())
            _check_stages(flags.model, stages, models.count_blocks(flags.model))
        if world_size % stages:
            raise FlagError("pipeline_stages", stages, f"must divide the {world_size} processes")
        if stages > 1 and cli.gloo_from_environment():
            raise FlagError("pipeline_stages", stages,
                            "needs MPI (mpirun, srun, horovodrun --mpi); this run uses Gloo")
        unsupported = {"elastic": flags.elastic, "adasum": flags.adasum,
                       "sync_batch_norm": flags.sync_batch_norm,
                       "accumulation_steps": flags.accumulation_steps > 1,
                       "steps_per_execution": flags.steps_per_execution > 1,
                       "mixed_precision": flags.mixed_precision == "float16"}
        for name, refused in unsupported.items():
            if refused:
                raise FlagError(name, flags[name].value, "is not supported with "
                                "--pipeline_stages, --microbatches or --recompute")
        batch, _ = batch_sizes(batch_request, self.replicas(world_size))
        if batch % flags.microbatches:
            raise FlagError("microbatches", flags.microbatches,
                            f"must divide the batch of {batch} per replica")

    def init_arguments(self, world_size):
        """MPI's world communicator and a process set per stage (app.parallel.pipeline), kept for
        the stage's step; FlagError if this MPI cannot give what the stages' messages need."""
        try:
            self._arguments = pipeline.init_arguments(self.stages, world_size)
        except RuntimeError as error:
            raise FlagError("pipeline_stages", self.stages, str(error)) from None
        return self._arguments

    def deprioritize_horovod_threads(self):
        # with stages, the stages' messages wait for Horovod's threads (app.parallel.pipeline)
        return super().deprioritize_horovod_threads() and self.stages == 1

    def place(self, rank, size):
        return pipeline_plan.position(rank, size, self.stages)

    def replicas(self, world_size):
        return world_size // self.stages

    def cut(self, source):
        """Each stage's (first, last) block, balanced by --pipeline_balance."""
        if self._cut is None:
            blocks = (models.blocks_of(self.flags.model, source.feature_shape,
                                       source.num_outputs) if self.stages > 1 else [])
            if self.stages > 1:
                _check_stages(self.flags.model, self.stages, len(blocks))
            self._cut = pipeline_plan.cut(blocks, self.stages, self.flags.pipeline_balance)
        return self._cut

    def build_model(self, source, normalization):
        """This rank's stage: its blocks, with the weights the whole model would give them."""
        first_block, last_block = self.cut(source)[self._where().stage]
        return models.build(self.flags.model, source.feature_shape, source.num_outputs,
                            normalization, seed=self.flags.seed, first_block=first_block,
                            last_block=last_block, input_scaling=source.input_scaling,
                            **outputs_of_task(source))

    def trainer(self, model, optimizer, num_outputs):
        """(this rank's PipelinedStage around `model`, the optimizer, its state sharded
        over the stage's replicas under --shard_optimizer_state): the stage's step averages
        its gradients over the stage's replicas itself."""
        flags = self.flags
        stage = pipeline.stage(model, self._where(), self._arguments, flags.microbatches,
                               num_outputs, flags.recompute, flags.pipeline_schedule)
        if self.sharding():  # each stage's replicas shard that stage's state
            optimizer = sharded_optimizer.shard(optimizer, gradients_too=self.sharding() == 2,
                                                process_set=stage.process_set)
        return stage, optimizer

    @staticmethod
    def broadcast_callback():
        return pipeline.BroadcastStageVariables()

    def checkpoint_folder(self, where):
        """Each stage's first replica saves its own blocks."""
        return checkpoints.stage_folder(where.stage, self.stages)

    def check_checkpoints(self, model_dir):
        if self.stages > 1:
            pipeline_plan.check_cut(model_dir, self.flags.model, self._cut)

    def record_layout(self, model_dir):
        if self.stages > 1:
            pipeline_plan.record_cut(model_dir, self.flags.model, self._cut)

    def images_per_rank(self, batch):
        return batch / self.stages  # each stage counts its share of the pipeline's images

    def results(self):
        return {**super().results(), "pipeline_stages": self.stages,
                "microbatches": self.flags.microbatches}

    def _where(self):
        return self.place(hvd.rank(), hvd.size())


def _check_stages(model, stages, blocks):
    """FlagError unless `model`'s `blocks` give `stages` stages (a U-Net is one block: its
    skip connections pass several tensors between its levels)."""
    if stages > blocks:
        raise FlagError("pipeline_stages", stages,
                        f"--model={model} has {blocks} block{'s' * (blocks > 1)} (a pipeline "
                        f"cuts it only where one tensor passes), so at most {blocks} "
                        f"stage{'s' * (blocks > 1)}")


class SpatialParallel(DataParallel):
    """app.parallel.spatial: every example split along its first spatial axis into --spatial_parts
    slabs, one per rank of a spatial group (a process set), the convolutions exchanging
    halos; the groups are data-parallel replicas, and Horovod's optimizer averages the
    gradients over all ranks (each rank's loss is scaled so that this is the replicas'
    average). Ranks are laid out group by group: rank = replica * parts + part, so that the
    ranks exchanging halos are neighbours."""
    name = "spatial"
    replica_noun = "spatial groups"

    def __init__(self, flags):
        super().__init__(flags)
        self.parts = flags.spatial_parts
        self._process_sets = None

    @staticmethod
    def wanted(flags):
        return flags.spatial_parts > 1

    def validate(self, world_size, batch_request):
        flags = self.flags
        if world_size % self.parts:
            raise FlagError("spatial_parts", self.parts,
                            f"must divide the {world_size} processes")
        if cli.gloo_from_environment():
            raise FlagError("spatial_parts", self.parts,
                            "needs MPI (mpirun, srun, horovodrun --mpi); this run uses Gloo")
        unsupported = {"pipeline_stages": flags.pipeline_stages > 1,
                       "microbatches": flags.microbatches > 1, "elastic": flags.elastic,
                       "adasum": flags.adasum}
        for name, refused in unsupported.items():
            if refused:
                raise FlagError(name, flags[name].value,
                                "is not supported with --spatial_parts")

    def init_arguments(self, world_size):
        """A process set per spatial group (none when one group is all the ranks)."""
        groups = world_size // self.parts
        if groups == 1:
            return {}
        self._process_sets = [hvd.ProcessSet(list(range(group * self.parts,
                                                        (group + 1) * self.parts)))
                              for group in range(groups)]
        return {"process_sets": self._process_sets}

    def place(self, rank, size):
        return Position(0, 1, rank // self.parts, size // self.parts, rank % self.parts,
                        self.parts)

    def replicas(self, world_size):
        return world_size // self.parts

    def process_set(self):
        """This rank's spatial group."""
        if self._process_sets is None:
            return hvd.global_process_set
        return self._process_sets[hvd.rank() // self.parts]

    def build_model(self, source, normalization):
        """The whole model rewritten for this rank's slab (app.parallel.spatial.split_model); raises
        FlagError naming a layer that cannot be split."""
        whole = super().build_model(source, normalization)
        try:
            return spatial.split_model(whole, hvd.rank() % self.parts, self.parts,
                                       self.process_set())
        except spatial.SpatialError as error:
            raise FlagError("spatial_parts", self.parts,
                            f"cannot split --model={self.flags.model}: {error}") from None

    @property
    def example_sum(self):
        return spatial.group_sum(self.process_set())

    def whole_examples(self, examples):
        return spatial.gather_slabs(examples, self.process_set())

    def images_per_rank(self, batch):
        return batch / self.parts  # each rank counts its share of its group's examples

    def results(self):
        return {**super().results(), "spatial_parts": self.parts}


KINDS = {kind.name: kind for kind in (SpatialParallel, PipelineParallel, DataParallel)}


def choose(flags):
    """The first kind in KINDS whose flags are set (data parallelism by default)."""
    return next(kind for kind in KINDS.values() if kind.wanted(flags))(flags)
