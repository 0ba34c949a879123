"""How the processes share the work: Horovod's reduction of the gradients, elastic training,
and the kinds of parallelism (app.parallel); their checks against the number of processes."""
import os

from absl import flags

from app import arithmetic
from app.flags.common import FLAGS
from app.flags.recipe import batch_request
from app.parallel import kinds, pipeline_plan


def define_horovod_flags():
    """How Horovod combines the processes' gradients and statistics; elastic training."""
    flags.DEFINE_bool("fp16_allreduce", False,
                      "Allreduce the gradients in float16 (Horovod's fp16 compression): half the "
                      "bytes on the wire, float16 rounding of the averaged gradients.")
    flags.DEFINE_bool("adasum", False,
                      "Combine the ranks' gradients with Horovod's Adasum instead of averaging: "
                      "what they share is averaged, what they do not is added up, so the LR "
                      "scales with one process's batch (one node's on GPUs with NCCL). Needs "
                      "Horovod's MPI controller and a power-of-2 number of processes.")
    flags.DEFINE_bool("shard_optimizer_state", False,
                      "ZeRO stage 1: each data-parallel rank keeps the optimizer's state "
                      "(momentum, Adam's, LAMB's or NovoGrad's moments) for 1/N of every "
                      "variable; the gradients are reduce-scattered and the updated weights "
                      "allgathered (the bytes of one allreduce). Checkpoints keep the "
                      "unsharded format, so a run resumes on any number of processes.")
    flags.DEFINE_bool("shard_gradients", False,
                      "ZeRO stage 2: --shard_optimizer_state, and under --accumulation_steps "
                      "the gradients kept between batches are this rank's 1/N of them, "
                      "reduce-scattered at every batch (stage 1 keeps whole gradients and "
                      "reduce-scatters once per update).")
    flags.DEFINE_bool("sync_batch_norm", False,
                      "Batch normalization over the global batch: the models' BatchNormalization "
                      "layers become SyncBatchNormalization (Horovod's, guarded against a "
                      "negative variance), which allreduces their statistics at every step. "
                      "Refused for a model that has no batch normalization.")
    flags.DEFINE_bool("elastic", False,
                      "Elastic training: workers may leave and join while it runs (Horovod's "
                      "elastic mode; start it with python -m app.launch --host_discovery_script). "
                      "With --batch_size the per-process batch stays, so the global batch and the "
                      "LR follow the number of workers.")
    flags.DEFINE_integer("commit_steps", 100,
                         "Elastic: steps between commits of the training state (and at every "
                         "epoch end); a failed worker costs at most these steps, and a change of "
                         "workers takes effect at the next commit.", lower_bound=1)
    flags.register_validator(
        "elastic", lambda elastic: not elastic or os.environ.get("HOROVOD_ELASTIC") == "1",
        "needs horovodrun's elastic mode (python -m app.launch --host_discovery_script=SCRIPT "
        "...)")


def define_parallelism_flags():
    """Pipeline parallelism (app.parallel.pipeline) and spatial parallelism
    (app.parallel.spatial) across ranks, alone or with Horovod's data parallelism, and
    recomputation."""
    flags.DEFINE_integer("spatial_parts", 1,
                         "Split every example along its first spatial axis into this many "
                         "slabs, one per rank of a spatial group, the convolutions exchanging "
                         "halos with Horovod's alltoall; the processes / spatial_parts groups "
                         "are data-parallel replicas. For fully convolutional models (U-Nets) "
                         "whose activations of one example do not fit one device. Needs MPI "
                         "(mpirun, srun, horovodrun --mpi).", lower_bound=1)
    flags.DEFINE_integer("pipeline_stages", 1,
                         "Cut the model into this many stages of consecutive blocks, one per "
                         "rank, balanced by --pipeline_balance; the processes / stages replicas "
                         "of each stage average their gradients with Horovod. Needs MPI "
                         "(mpirun, srun, horovodrun --mpi).", lower_bound=1)
    flags.DEFINE_integer("microbatches", 1,
                         "Microbatches each step's per-replica batch is split into, run through "
                         "the stages one after the other, their gradients added up for one "
                         "update.", lower_bound=1)
    flags.DEFINE_enum("pipeline_schedule", "1f1b", pipeline_plan.SCHEDULES,
                      "The order of the microbatches' passes: gpipe (every forward, then every "
                      "backward: every microbatch's activations kept at once) or 1f1b (a "
                      "microbatch's backward as soon as the last stage has it: at most "
                      "stages - stage microbatches kept on a stage; the same bubble).")
    flags.DEFINE_enum("pipeline_balance", "flops", pipeline_plan.BALANCES,
                      "What the stages share alike: the blocks' forward FLOPs (each stage's "
                      "compute, for throughput) or their parameters (each stage's weights "
                      "and optimizer state, for memory).")
    flags.DEFINE_bool("recompute", False,
                      "A U-Net: keep only each level's input and recompute its convolutions in "
                      "the backward pass. Other models: keep only each stage's input per "
                      "microbatch and recompute its activations "
                      "in the backward pass (gradient checkpointing): less memory, one more "
                      "forward pass.")


DEFINES = (define_horovod_flags, define_parallelism_flags)


def check(world_size):
    """The kind of parallelism the flags choose runs on `world_size` processes, and divides
    the batch the flags ask for among its replicas."""
    kind = kinds.choose(FLAGS)
    kind.validate(world_size, batch_request())
    arithmetic.batch_sizes(batch_request(), kind.replicas(world_size))
