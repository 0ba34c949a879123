"""The arithmetic of a run: batch sizes, steps per epoch, the scaled learning rate and the
schedule's epochs, as pure functions of explicit arguments (app.flags passes the flags in).

A value that cannot run raises FlagError naming the flag it came from, so that app.flags
can end the run with one line."""
import dataclasses
import math

LR_SCALING_RULES = ("none", "linear", "sqrt")


class FlagError(ValueError):
    """A flag value that cannot run: `--flag=value: reason`."""

    def __init__(self, flag, value, reason):
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        super().__init__(f"--{flag}={shown}: {reason}")


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """What a run asks for: a batch per process or a global batch (exactly one), and the
    batches each process accumulates before one update."""
    batch_size: int = None
    global_batch_size: int = None
    accumulation_steps: int = 1

    def flag(self):
        """(name, value) of the batch flag given, to name in errors about the batch."""
        if self.global_batch_size:
            return "global_batch_size", self.global_batch_size
        return "batch_size", self.batch_size


def batch_sizes(request, world_size, resumed=None):
    """(per-process batch, global batch) on `world_size` processes: the global batch is the
    per-process batch x processes x accumulation steps. `resumed`, (model_dir, global batch)
    of the checkpoint a run resumes from, keeps that global batch whatever the number of
    processes, so that its learning rate and steps mean what they meant."""
    if (request.batch_size is None) == (request.global_batch_size is None):
        raise FlagError(*request.flag(),
                        "give exactly one of --batch_size and --global_batch_size")
    accumulation = request.accumulation_steps
    global_batch = (request.global_batch_size
                    or request.batch_size * world_size * accumulation)
    named = request.flag()
    if resumed:
        named = ("model_dir", resumed[0])
        global_batch = resumed[1]
    if global_batch % (world_size * accumulation):
        raise FlagError(*named, f"the global batch of {global_batch} is not divisible by "
                                f"{world_size} processes"
                                + (f" x {accumulation} accumulation steps"
                                   if accumulation > 1 else ""))
    return global_batch // (world_size * accumulation), global_batch


def steps_per_epoch(request, num_examples, global_batch, steps=None):
    """Training steps (batches per process) per epoch: `steps`, or by default one pass over
    `num_examples` at the global batch; with accumulation, a multiple of its steps, so that
    every epoch ends with an update."""
    accumulation = request.accumulation_steps
    if steps and steps % accumulation:
        raise FlagError("steps_per_epoch", steps,
                        f"must be a multiple of --accumulation_steps={accumulation}")
    steps = steps or num_examples // global_batch * accumulation
    if steps == 0:
        raise FlagError(*request.flag(), f"the global batch of {global_batch} is larger than "
                                         f"the {num_examples} training examples")
    return steps


def scaled_learning_rate(base_lr, global_batch, reference_batch, rule):
    """`base_lr`, right at `reference_batch`, scaled to `global_batch` by `rule`: none,
    linear (Goyal et al.) or sqrt."""
    ratio = global_batch / reference_batch
    return base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def decay_epochs(values, epochs):
    """The step schedule's decay epochs (strings, as absl lists them) as increasing whole
    numbers inside a training of `epochs` epochs."""
    try:
        decays = [int(value) for value in values]
    except ValueError:
        raise FlagError("lr_decay_epochs", values, "must be whole epoch numbers") from None
    increasing = decays == sorted(set(decays))
    if not decays or not increasing or not 0 < decays[0] <= decays[-1] < epochs:
        raise FlagError("lr_decay_epochs", values,
                        f"must be increasing epochs between 1 and {epochs - 1}")
    return decays


def profile_steps(values):
    """The profiler's (first, last) training step from START,END; () when not given."""
    if not values:
        return ()
    try:
        steps = tuple(int(value) for value in values)
    except ValueError:
        raise FlagError("profile_steps", values, "must be two step numbers: START,END") from None
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise FlagError("profile_steps", values,
                        "must be two step numbers: START,END with 1 <= START <= END")
    return steps
