"""Optimizer state sharded over the data-parallel ranks: ZeRO's stages 1 and 2 (Rajbhandari et
al., SC 2020) for Keras 3 optimizers, on Horovod's reduce-scatter and allgather.

Every variable, flattened, is split into N pieces the way Horovod's reducescatter splits a
tensor (the first `elements % N` ranks one element more), and rank r owns piece r of each,
held in a variable of its own. The sharded optimizer, like Horovod's DistributedOptimizer a
subclass of the wrapped optimizer's class built from its config, builds its class's slots (a
momentum, Adam's two moments) on these pieces, so that they exist for 1/N of the elements. Its
`apply` reduce-scatters the local gradients (one fused grouped_reducescatter, which leaves
each rank the average of its pieces only), copies the pieces from the weights, has the
class's own `apply` update them, and allgathers them into the weights (one fused
grouped_allgather): the bytes of one allreduce, which is a reduce-scatter followed by an
allgather. Splitting every variable, rather than dealing out whole variables, keeps the
ranks' shares within one element per variable and needs no copies into a flat buffer; LARS,
LAMB and NovoGrad take their per-layer norms as allreduced sums of their pieces' squares
(app.large_batch_optimizers' `_summed_over_shards`), so they compute what they compute
unsharded.

Stage 1 (`gradients_too=False`) and stage 2 differ in the gradients kept between the steps of
--accumulation_steps: stage 1 adds up whole local gradients and reduce-scatters once per
update, stage 2 reduce-scatters every batch and keeps only its pieces' sum (1/N of the
memory, k times the traffic). Without accumulation they are the same step. As with Horovod's
optimizer on Keras 3, `iterations` counts the updates.

Float16's loss scaling goes inside: shard(LossScaleOptimizer(...)) checks the reduced
gradient pieces, and `agree_on_overflow` makes every rank's pieces non-finite when one
rank's are, so that all of them skip the step.

Checkpoints are the unsharded optimizer's, whatever N: for the moment of a save,
checkpoints.whole_state puts in the sharded optimizer's place (in the checkpoint, and in the
model that compiled it) its unsharded twin, an optimizer of the wrapped class built on the
model's variables, holding the state gathered from every rank's pieces on the saving rank;
around a restore, checkpoints.restored_whole_state has the checkpoint restore into such a
twin, then cuts its state into this rank's pieces.
"""
import numpy as np

from app.horovod import hvd_tensorflow, keras, tf


def piece_bounds(elements, rank, size):
    """(start, stop) of `rank`'s piece of a flattened variable of `elements` elements, as
    Horovod's reducescatter deals out a tensor's first axis."""
    base, extra = divmod(elements, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(optimizer, gradients_too=False, accumulation_steps=1,
          compression=hvd_tensorflow.Compression.none, agree_on_overflow=False,
          process_set=hvd_tensorflow.global_process_set):
    """`optimizer` (a Keras 3 optimizer, float16's LossScaleOptimizer included) with its state
    sharded over `process_set`'s ranks, the gradients averaged over them; `accumulation_steps`
    batches' gradients averaged per update, as Horovod's backward_passes_per_step with
    average_aggregated_gradients; `compression` for the gradients' reduce-scatter
    (--fp16_allreduce); `agree_on_overflow`: a non-finite gradient piece on any rank makes
    every rank's pieces non-finite, so that float16's loss scaling skips the step on all of
    them. Like Horovod's DistributedOptimizer, a subclass of the optimizer's own class,
    built from its config."""
    unsharded = optimizer.__class__
    # The wrapped class's name and module, by which Keras finds the class of a serialized
    # optimizer (cloning a compiled model compiles the clone with the optimizer's config).
    cls = type(unsharded.__name__, (ShardedState, unsharded),
               {"unsharded_class": unsharded, "__module__": unsharded.__module__,
                "__qualname__": unsharded.__qualname__})
    sharded = cls.from_config(optimizer.get_config())
    sharded.shard_over(process_set, gradients_too, accumulation_steps, compression,
                       agree_on_overflow)
    return sharded


class Pieces:
    """This rank's piece of each variable a sharded optimizer updates, each a variable of its
    own. Kept apart from the optimizer because Keras takes every variable an optimizer's
    attributes hold (in lists and dicts too) for its state, which Horovod's broadcast sends
    and checkpoints save; the gradient accumulators live here for the same reason."""

    def __init__(self, process_set):
        self.process_set = process_set
        self.whole = []  # the variables, in the order the optimizer was built on them
        self._piece_of = {}  # id(variable) -> its piece
        self.accumulated = {}  # id(variable) -> the sum of its gradients (or piece's)
        self.accumulated_batches = None

    def bounds(self, elements):
        return piece_bounds(elements, self.process_set.rank(), self.process_set.size())

    def cut(self, value):
        """This rank's piece of `value` flattened."""
        start, stop = self.bounds(int(np.prod(value.shape)))
        return tf.reshape(value, [-1])[start:stop]

    def make(self, variables, accumulated_whole=None):
        """The pieces of `variables`, made; with `accumulated_whole` (True: stage 1, False:
        stage 2), the accumulators of their gradients too."""
        self.whole = list(variables)
        with tf.init_scope():  # also when the first step, traced, builds the optimizer
            for variable in self.whole:
                start, stop = self.bounds(int(np.prod(variable.shape)))
                # the variable's name, which LARS's and LAMB's exclusion of biases and
                # normalization parameters reads
                self._piece_of[id(variable)] = keras.Variable(
                    tf.zeros([stop - start], variable.dtype), trainable=False,
                    name=variable.name)
                if accumulated_whole is not None:
                    size = int(np.prod(variable.shape)) if accumulated_whole else stop - start
                    self.accumulated[id(variable)] = tf.Variable(
                        tf.zeros([size], variable.dtype), trainable=False)
            if accumulated_whole is not None:
                self.accumulated_batches = tf.Variable(0, trainable=False)
        return self.of(self.whole)

    def of(self, variables):
        return [self._piece_of[id(variable)] for variable in variables]


class ShardedState:
    """The mix-in `shard` puts before an optimizer's class (`unsharded_class`). Its class
    builds its slots on this rank's pieces of the variables; `variables` are those every
    rank holds alike (the iteration count, the learning rate, a loss scale), which Horovod's
    broadcast sends, and `all_variables` add this rank's own slots. The pieces are copied
    from the weights at each update, so that whatever set the weights (a restore,
    --init_checkpoint, Horovod's broadcast) holds for them too. Its checkpoints are the
    unsharded optimizer's: it `stands_aside` for a twin (checkpoints.whole_state)."""

    stands_aside = True

    def shard_over(self, process_set, gradients_too, accumulation_steps, compression,
                   agree_on_overflow):
        self.process_set, self.gradients_too = process_set, gradients_too
        self.accumulation_steps, self.compression = accumulation_steps, compression
        self.agree_on_overflow = agree_on_overflow
        self.pieces = Pieces(process_set)
        self._own_ids = set()

    def build(self, variables):
        """Builds the class's state on the pieces of `variables` (the model's trainable
        ones, whose pieces are made here)."""
        if self.built:
            return
        accumulated_whole = None if self.accumulation_steps == 1 else not self.gradients_too
        pieces = self.pieces.make(variables, accumulated_whole)
        alike = {id(variable) for variable in super().variables}
        super().build(pieces)
        # The slots built on the pieces are pieces too; the scalars built with them (a loss
        # scale, NovoGrad's second moment per variable) are alike on every rank.
        self._own_ids = {id(variable) for variable in super().variables
                         if id(variable) not in alike and len(variable.shape) == 1}

    @property
    def variables(self):
        return [variable for variable in super().variables
                if id(variable) not in self._own_ids]

    @property
    def all_variables(self):
        return super().variables

    # -- the step -------------------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        """Reduce-scatters `grads`, the local gradients of `trainable_variables` (by default
        the variables the optimizer was built on), updates this rank's pieces of those that
        have one and allgathers the pieces into them. With accumulation, on every
        accumulation_steps-th call. Which variables have a gradient is the graph's, alike
        on every rank, so that every rank takes part in the same collectives; the others
        keep their value, as with Horovod's optimizer."""
        variables = (self.pieces.whole if trainable_variables is None
                     else list(trainable_variables))
        self.build(variables)
        reached = [(tf.reshape(grad, [-1]), variable)
                   for grad, variable in zip(grads, variables) if grad is not None]
        flat_grads = [grad for grad, _ in reached]
        updated = [variable for _, variable in reached]
        if self.accumulation_steps == 1:
            self._update(self._reduce_scatter(flat_grads), updated)
            return
        added = self._reduce_scatter(flat_grads) if self.gradients_too else flat_grads
        sums = [self.pieces.accumulated[id(variable)] for variable in updated]
        batches = self.pieces.accumulated_batches
        # an update's first batch replaces the sums (no zeros to write), the others add
        tf.cond(tf.equal(batches, 0),
                lambda: [total.assign(value) for total, value in zip(sums, added)],
                lambda: [total.assign_add(value) for total, value in zip(sums, added)])

        def update():
            reduced = sums if self.gradients_too else self._reduce_scatter(sums)
            batches.assign(0)
            self._update([piece / self.accumulation_steps for piece in reduced], updated)

        tf.cond(batches.assign_add(1) >= self.accumulation_steps, update, lambda: None)

    def _reduce_scatter(self, flat_grads):
        pieces = hvd_tensorflow.grouped_reducescatter(
            flat_grads, compression=self.compression, op=hvd_tensorflow.Average,
            process_set=self.process_set)
        if not self.agree_on_overflow:
            return pieces
        finite_here = tf.reduce_all([tf.reduce_all(tf.math.is_finite(piece))
                                     for piece in pieces])
        finite_everywhere = hvd_tensorflow.allreduce(
            tf.cast(finite_here, tf.int32), op=hvd_tensorflow.Min, process_set=self.process_set)
        return [tf.where(finite_everywhere > 0, piece, tf.fill(tf.shape(piece), float("nan")))
                for piece in pieces]

    def _update(self, piece_grads, variables):
        """The class's update of the pieces of `variables` with `piece_grads`, allgathered
        into `variables`."""
        pieces = self.pieces.of(variables)
        for piece, variable in zip(pieces, variables):
            piece.assign(self.pieces.cut(variable))
        super().apply(piece_grads, pieces)
        whole = hvd_tensorflow.grouped_allgather(
            [tf.convert_to_tensor(piece) for piece in pieces], process_set=self.process_set)
        for variable, flat in zip(variables, whole):
            variable.assign(tf.reshape(flat, variable.shape))

    def _summed_over_shards(self, partial):
        """A sum over the whole of a variable from its pieces' partial sums (the layer-wise
        optimizers' norms)."""
        return hvd_tensorflow.allreduce(partial, op=hvd_tensorflow.Sum,
                                        process_set=self.process_set)

    # -- checkpoints ------------------------------------------------------------------------

    def whole_twin(self):
        """This optimizer unsharded: its wrapped class, from its config, built on the whole
        variables (its state zeros)."""
        twin = self.unsharded_class.from_config(self.get_config())
        twin.build(self.pieces.whole)
        return twin

    def gathered_twin(self, keep):
        """On the rank that `keep`s it, the unsharded twin holding this optimizer's state:
        each slot allgathered from every rank's pieces, one at a time; None on the others.
        Every rank calls it."""
        twin = self.whole_twin() if keep else None
        wholes = twin.variables if keep else [None] * len(self.all_variables)
        # Both classes built the same variables in the same order, the twin's whole.
        for variable, whole in zip(self.all_variables, wholes, strict=True):
            value = (hvd_tensorflow.allgather(tf.convert_to_tensor(variable),
                                              process_set=self.process_set)
                     if id(variable) in self._own_ids else variable)
            if keep:
                whole.assign(tf.reshape(value, whole.shape))
        return twin

    def take_state(self, twin):
        """Takes the state of `twin`, an unsharded twin: this rank's pieces of its slots."""
        for variable, whole in zip(self.all_variables, twin.variables, strict=True):
            variable.assign(self.pieces.cut(whole) if id(variable) in self._own_ids else whole)
