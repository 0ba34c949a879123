"""How the ranks share a curvature preconditioner's work (K-FAC's in app.kfac, Shampoo's in
app.shampoo): the costly decompositions dealt over the ranks, the costliest first to the
least loaded (KAISA's balance, Pauloski et al. 2021), each computed on its rank alone and
summed from there to the ranks that keep it; for K-FAC's gradient workers, KAISA's grid of
process sets."""
import collections

from app.horovod import hvd, hvd_tensorflow, tf  # first: it sets TF_XLA_FLAGS

# `average(tensors)` averages tensors over the ranks (one grouped allreduce),
# `broadcast(tensors, roots, names)` sends each tensor from its root rank to the others,
# `add(tensors, group, name)` sums tensors over `group` (a list of ranks: a process set that
# process_sets made), one grouped allreduce; this process is `rank` of `size`.
Ranks = collections.namedtuple("Ranks", "average broadcast add rank size")
ONE_PROCESS = Ranks(lambda tensors: tensors, None, None, 0, 1)
# The process sets of gradient-worker grids, by their ranks (hvd.init registers them)
_PROCESS_SETS = {}
# One decomposition: `compute()` gives its tensors, shaped and typed as the variables `into`
# that take them, on rank `owner`, which counts it in `count` (a variable).
Job = collections.namedtuple("Job", "owner compute into count")


def horovod_ranks():
    """Horovod's ranks: one grouped allreduce for the averages and for the sums of a group (in
    its process set), a broadcast per tensor."""
    def add(tensors, group, name):
        process_set = (hvd_tensorflow.global_process_set if len(group) == hvd.size()
                       else _PROCESS_SETS[frozenset(group)])
        return hvd_tensorflow.grouped_allreduce(tensors, op=hvd_tensorflow.Sum, name=name,
                                                process_set=process_set)
    return Ranks(
        lambda tensors: hvd_tensorflow.grouped_allreduce(tensors, op=hvd_tensorflow.Average,
                                                         name="curvature_average"),
        lambda tensors, roots, names: [hvd_tensorflow.broadcast(tensor, root, name=name)
                                       for tensor, root, name in zip(tensors, roots, names)],
        add, hvd.rank(), hvd.size())


def grad_worker_grid(size, grad_workers):
    """KAISA's grid of `size` ranks in `grad_workers` rows: (columns, rows), lists of ranks.
    A layer's gradient workers are a column (they keep its decompositions, sent to them from
    the one that computed them); every rank takes its preconditioned gradient from the
    column's member in its own row."""
    across = size // grad_workers
    return ([list(range(column, size, across)) for column in range(across)],
            [list(range(row * across, (row + 1) * across)) for row in range(grad_workers)])


def process_sets(size, grad_workers):
    """Horovod's process sets for the grid of `grad_workers` in `size` ranks (hvd.init's
    process_sets; Ranks.add finds them by their ranks): its columns and rows of more than
    one rank and fewer than all."""
    columns, rows = grad_worker_grid(size, grad_workers)
    found = []
    for ranks in columns + rows:
        if 1 < len(ranks) < size:
            found.append(_PROCESS_SETS.setdefault(frozenset(ranks), hvd.ProcessSet(ranks)))
    return found


def placement(sizes, size):
    """The rank that decomposes each matrix of `sizes` (their orders, n for an n x n
    matrix): the costliest first (a decomposition costs about n^3), each to the rank with
    the least work so far (ties to the lowest rank)."""
    owners, loads = [None] * len(sizes), [0] * size
    for index in sorted(range(len(sizes)), key=lambda index: -sizes[index]):
        rank = loads.index(min(loads))
        owners[index] = rank
        loads[rank] += sizes[index] ** 3
    return owners


def grouped_placement(costs, columns, size):
    """The rank that takes each item of `costs` when an item's work must stay in one of
    `columns` (lists of ranks): the costliest first, to the column with the least work so
    far, and in it to the rank with the least (KAISA's constrained greedy assignment)."""
    owners, loads = [None] * len(costs), [0] * size
    for index in sorted(range(len(costs)), key=lambda index: -costs[index]):
        column = min(columns, key=lambda ranks: sum(loads[rank] for rank in ranks))
        rank = min(column, key=lambda rank: loads[rank])
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def eigh(matrix):
    """tf.linalg.eigh's (eigenvalues, eigenvectors) of a symmetric `matrix`; all NaN when
    it holds a NaN or an infinity, where eigh itself raises: a diverging run then ends
    with the loss, in one line (app.callbacks.StopOnNonFiniteLoss), not with a traceback."""
    finite = tf.reduce_all(tf.math.is_finite(matrix))
    values, vectors = tf.linalg.eigh(
        tf.where(finite, matrix, tf.eye(tf.shape(matrix)[0], dtype=matrix.dtype)))
    nan = tf.constant(float("nan"), matrix.dtype)
    return tf.where(finite, values, nan), tf.where(finite, vectors, nan)


def run_on_owners(jobs, ranks, group=None):
    """Each job computed on its owner and its tensors assigned on the ranks of `group` (a
    list of ranks; None: all), all of them in one grouped sum over the group, to which the
    owner gives its job's tensors and the others zeros shaped as their own variables
    (exact; empty where a rank keeps none). The graph is the same on every rank (a tf.cond
    on the rank picks the work; Horovod names its collectives by their place in the
    graph). One request, not a broadcast per tensor: Shampoo's many roots, each broadcast
    alone, deadlocked two ranks on the Fashion-MNIST CNN (each waiting in a different
    broadcast)."""
    group = list(range(ranks.size)) if group is None else group
    found = []
    for job in jobs:
        found += tf.cond(tf.equal(tf.constant(ranks.rank), job.owner),
                         lambda job=job: _counted(job),
                         lambda job=job: [tf.zeros_like(variable) for variable in job.into])
    if len(group) > 1 and jobs:
        found = ranks.add(found, group, "curvature_decompositions")
    tensors = iter(found)
    for job in jobs:
        for variable in job.into:
            variable.assign(next(tensors))


def _counted(job):
    job.count.assign_add(1)
    return list(job.compute())


class Configured:
    """A preconditioner's mix-in, before a Keras optimizer's class: its HYPERPARAMETERS taken
    from the constructor's keyword arguments and given back in the config (Horovod's
    DistributedOptimizer rebuilds the optimizer from it); its UNTRACKED attributes ({name:
    factory}) kept out of Keras' attribute tracking (add_variable tracks the variables in
    them)."""

    HYPERPARAMETERS = ()
    UNTRACKED = {}

    def __init__(self, *args, **kwargs):
        own = {name: kwargs.pop(name) for name in self.HYPERPARAMETERS}
        super().__init__(*args, **kwargs)
        for name, value in own.items():
            setattr(self, name, value)
        for name, make in self.UNTRACKED.items():
            object.__setattr__(self, name, make())

    def get_config(self):
        return {**super().get_config(),
                **{name: getattr(self, name) for name in self.HYPERPARAMETERS}}
