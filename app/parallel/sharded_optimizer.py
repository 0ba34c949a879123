"""Optimizer state sharded over the data-parallel ranks: ZeRO's stages 1 and 2 (Rajbhandari et
al., SC 2020) for tf.keras legacy optimizers, on Horovod's reduce-scatter and allgather.

Every variable, flattened, is split into N pieces the way Horovod's reducescatter splits a
tensor (the first `elements % N` ranks one element more), and rank r owns piece r of each.
A step then reduce-scatters the gradients (one fused grouped_reducescatter, which leaves each
rank the average of its pieces only), applies the wrapped optimizer to its pieces (so its
slots, a momentum or Adam's two moments, exist for 1/N of the elements), and allgathers the
updated pieces into the weights (one fused grouped_allgather): the bytes of one allreduce,
which is a reduce-scatter followed by an allgather. Splitting every variable, rather than
dealing out whole variables, keeps the ranks' shares within one element per variable and
needs no copies into a flat buffer; LARS, LAMB and NovoGrad take their per-layer norms as
allreduced sums of their pieces' squares (app.large_batch_optimizers' `_summed_over_shards`),
so they compute what they compute unsharded.

Stage 1 (`gradients_too=False`) and stage 2 differ in the gradients kept between the steps of
--accumulation_steps: stage 1 adds up whole local gradients and reduce-scatters once per
update, stage 2 reduce-scatters every batch and keeps only its pieces' sum (1/N of the
memory, k times the traffic). Without accumulation they are the same step.

Checkpoints are the unsharded optimizer's, whatever N: `whole_state` gathers the pieces'
slots into whole slots of the model's variables on the saving rank for the moment of a save,
and `take_restored_slots` cuts a restored checkpoint's whole slots into this rank's pieces.
"""
import contextlib

import numpy as np

from app.horovod import hvd_tensorflow, tf

from tf_keras.src.optimizers.legacy.optimizer_v2 import _var_key  # noqa: E402 (slots' key)


def piece_bounds(elements, rank, size):
    """(start, stop) of `rank`'s piece of a flattened variable of `elements` elements, as
    Horovod's reducescatter deals out a tensor's first axis."""
    base, extra = divmod(elements, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(optimizer, gradients_too=False, accumulation_steps=1,
          compression=hvd_tensorflow.Compression.none, agree_on_overflow=False,
          process_set=hvd_tensorflow.global_process_set):
    """`optimizer` (a tf.keras legacy optimizer) with its state sharded over `process_set`'s
    ranks, the gradients averaged over them; `accumulation_steps` batches' gradients averaged
    per update, as Horovod's backward_passes_per_step with average_aggregated_gradients;
    `compression` for the gradients' reduce-scatter (--fp16_allreduce); `agree_on_overflow`:
    a non-finite gradient piece on any rank makes every rank's pieces non-finite, so that
    float16's loss scaling skips the step on all of them. Like Horovod's
    DistributedOptimizer, a subclass of the optimizer's own class, built from its config."""
    cls = type(optimizer.__class__.__name__, (ShardedState, optimizer.__class__), {})
    sharded = cls.from_config(optimizer.get_config())
    sharded.shard_over(process_set, gradients_too, accumulation_steps, compression,
                       agree_on_overflow)
    return sharded


def sharded_inside(optimizer):
    """The ShardedState optimizer `optimizer` is or wraps (float16's loss scaling), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, ShardedState) else None


@contextlib.contextmanager
def whole_state(optimizer, keep):
    """For the block's duration, on the rank that `keep`s them, the whole slots of the model's
    variables (what an unsharded optimizer holds, and a checkpoint saves), gathered from every
    rank's pieces; every rank calls it, as the gathering is collective. Nothing for an
    optimizer that is not sharded."""
    sharded = sharded_inside(optimizer)
    if sharded is None:
        yield
        return
    whole = sharded.gather_slots(keep)
    try:
        yield
    finally:
        sharded.drop_slots(whole)


def take_restored_slots(optimizer, variables):
    """After a checkpoint restored the whole slots of `variables` into a sharded optimizer:
    keeps this rank's pieces of them and lets the whole ones go. Nothing otherwise."""
    sharded = sharded_inside(optimizer)
    if sharded is not None:
        sharded.cut_restored_slots(variables)


def slot_elements(optimizer):
    """The elements of the optimizer's slot variables on this rank (its state, without the
    iteration count and hyperparameters)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return sum(int(np.prod(variable.shape)) for variable in inner.variables
               if variable.path.split("/")[-1] not in ("iteration", "learning_rate"))


def _over_reached(function, gradients, variables):
    """function(the gradients as vectors, their variables) for the variables the loss
    reaches, its results in their places and None in the others': as with Horovod's
    optimizer, whose allreduce leaves them None, apply_gradients leaves those variables
    alone and gives them no state. Which they are is the graph's, alike on every rank, so
    that every rank takes part in the same collectives."""
    reached = [index for index, gradient in enumerate(gradients) if gradient is not None]
    results = iter(function([tf.reshape(gradients[index], [-1]) for index in reached],
                            [variables[index] for index in reached]))
    return [None if gradient is None else next(results) for gradient in gradients]


class ShardedState:
    """The mix-in `shard` puts before an optimizer's class. Its slots are made for this
    rank's pieces (one variable per model variable, `piece_of[variable]`), taken from the
    weights on first use (after a restore or --init_checkpoint) and the source of the
    weights from then on: each update allgathers them into the weights, so that Horovod's
    broadcast of rank 0's weights after the first step sends what every rank already
    holds."""

    def shard_over(self, process_set, gradients_too, accumulation_steps, compression,
                   agree_on_overflow):
        self.process_set, self.gradients_too = process_set, gradients_too
        self.accumulation_steps, self.compression = accumulation_steps, compression
        self.agree_on_overflow = agree_on_overflow
        self.piece_of = {}  # variable.ref() -> this rank's piece of it
        self._accumulated, self._accumulated_batches = [], None

    # -- the step -------------------------------------------------------------------------

    def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
        """This rank's pieces of the gradients averaged over the ranks (and, with
        accumulation, over the batches), paired with the whole variables."""
        grads_and_vars = super()._compute_gradients(loss, var_list, grad_loss, tape)
        gradients, variables = zip(*grads_and_vars)
        if self.accumulation_steps == 1:
            return self.reduce_scattered(gradients, variables)
        return list(zip(_over_reached(self._accumulated_pieces, gradients, variables),
                        variables))

    def reduce_scattered(self, gradients, variables):
        """(this rank's piece of each gradient averaged over the ranks, its variable), which
        apply_gradients takes; also for steps that compute their gradients themselves
        (app.parallel.pipeline's stages)."""
        return list(zip(_over_reached(lambda flat, _: self._reduce_scatter(flat), gradients,
                                      variables), variables))

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

    def _accumulated_pieces(self, flat_grads, variables):
        """Adds this batch's gradients up (stage 1: whole and local; stage 2: reduce-scattered
        pieces) and returns the average pieces on every accumulation_steps-th batch (zeros
        on the others, which apply_gradients does not apply)."""
        sizes = [self._piece_size(variable) for variable in variables]
        added = flat_grads if not self.gradients_too else self._reduce_scatter(flat_grads)
        if not self._accumulated:
            kept = sizes if self.gradients_too else [variable.shape.num_elements()
                                                     for variable in variables]
            with tf.init_scope():
                self._accumulated_batches = tf.Variable(0, trainable=False,
                                                        name="accumulated_batches")
                self._accumulated = [tf.Variable(tf.zeros([size], value.dtype),
                                                 trainable=False)
                                     for size, value in zip(kept, added)]
        # an update's first batch replaces the sums (no zeros to allocate), the others add
        sums = tf.cond(tf.equal(self._accumulated_batches, 0),
                       lambda: [total.assign(value) for total, value in
                                zip(self._accumulated, added)],
                       lambda: [total.assign_add(value) for total, value in
                                zip(self._accumulated, added)])
        batches = self._accumulated_batches.assign_add(1)

        def averaged():
            reduced = (sums if self.gradients_too else self._reduce_scatter(sums))
            with tf.control_dependencies(reduced):
                restart = self._accumulated_batches.assign(0)
            with tf.control_dependencies([restart]):
                return [piece / self.accumulation_steps for piece in reduced]

        def not_yet():
            return [tf.zeros([size], total.dtype) for size, total in zip(sizes,
                                                                          self._accumulated)]
        return tf.cond(batches >= self.accumulation_steps, averaged, not_yet)

    def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
        """Applies the optimizer to this rank's pieces with their gradient pieces, then
        allgathers the updated pieces into the whole variables. With accumulation, only on
        the batch that completed an update (on the others the iteration count goes on, as
        with Horovod's local aggregation)."""
        del experimental_aggregate_gradients  # the pieces are averaged already
        grads_and_vars = list(grads_and_vars)
        if self.accumulation_steps == 1:
            return self._apply_to_pieces(grads_and_vars, name)
        return tf.cond(tf.equal(self._accumulated_batches, 0),
                       lambda: self._apply_to_pieces(grads_and_vars, name),
                       lambda: self.iterations.assign_add(1).op)

    def _apply_to_pieces(self, grads_and_vars, name):
        grads_and_vars = [(grad, variable) for grad, variable in grads_and_vars
                          if grad is not None]  # the others keep their value (no piece)
        variables = [variable for _, variable in grads_and_vars]
        pieces = self._pieces(variables)
        applied = super().apply_gradients(
            [(grad, piece) for (grad, _), piece in zip(grads_and_vars, pieces)],
            name=name, experimental_aggregate_gradients=False)
        with tf.control_dependencies([applied]):
            whole = hvd_tensorflow.grouped_allgather([piece.read_value() for piece in pieces],
                                                     process_set=self.process_set)
        return tf.group([variable.assign(tf.reshape(flat, variable.shape))
                         for variable, flat in zip(variables, whole)])

    def _summed_over_shards(self, partial):
        """A sum over the whole of a variable from its pieces' partial sums (the layer-wise
        optimizers' norms)."""
        return hvd_tensorflow.allreduce(partial, op=hvd_tensorflow.Sum,
                                        process_set=self.process_set)

    def variables(self):
        """The optimizer's variables that every rank holds alike (iteration count,
        hyperparameters), which Horovod's broadcast callback sends; the slots of a rank's
        pieces are its own."""
        own = {slot.ref() for slots in self._slots.values() for slot in slots.values()}
        return [weight for weight in self._weights if weight.ref() not in own]

    # -- the pieces --------------------------------------------------------------------------

    def _bounds(self, value):
        """(start, stop) of this rank's piece of `value` flattened."""
        return piece_bounds(value.shape.num_elements(), self.process_set.rank(),
                            self.process_set.size())

    def _piece_size(self, variable):
        start, stop = self._bounds(variable)
        return stop - start

    def _my_piece(self, value):
        start, stop = self._bounds(value)
        return tf.reshape(value, [-1])[start:stop]

    def _pieces(self, variables):
        """This rank's piece variable of each of `variables`, made on first use."""
        missing = [variable for variable in variables if variable.ref() not in self.piece_of]
        if missing:
            with tf.init_scope():
                for variable in missing:
                    # the piece keeps the variable's name, which the layer-wise optimizers'
                    # exclusion of biases and normalization parameters reads
                    self.piece_of[variable.ref()] = tf.Variable(
                        self._my_piece(tf.convert_to_tensor(variable)), trainable=False,
                        name=f"{variable.name.split(':')[0]}_piece")
        return [self.piece_of[variable.ref()] for variable in variables]

    # -- checkpoints ------------------------------------------------------------------------

    def gather_slots(self, keep):
        """Allgathers each slot of each piece into the whole slot of its variable; on the
        rank that `keep`s them, made the slots of the model's variables (as an unsharded
        optimizer's are). Returns the variables given whole slots."""
        given = []
        for variable_ref, piece in self.piece_of.items():
            variable = variable_ref.deref()
            for slot_name in self.get_slot_names():
                piece_slot = self.get_slot(piece, slot_name)
                if piece_slot.shape == piece.shape:
                    value = tf.reshape(hvd_tensorflow.allgather(
                        piece_slot, process_set=self.process_set), variable.shape)
                else:  # a slot per variable (NovoGrad's second moment): alike on every rank
                    value = piece_slot.read_value()
                if keep:
                    self.add_slot(variable, slot_name, shape=value.shape).assign(value)
            if keep:
                given.append(variable)
        return given

    def drop_slots(self, variables):
        """Lets the whole slots of `variables` go (their memory with them)."""
        for variable in variables:
            dropped = {slot.ref() for slot in self._slots.pop(_var_key(variable), {}).values()}
            self._weights = [weight for weight in self._weights if weight.ref() not in dropped]

    def cut_restored_slots(self, variables):
        """Keeps this rank's pieces of the whole slots a restore made for `variables`."""
        restored = [variable for variable in variables if _var_key(variable) in self._slots]
        if not restored:
            return
        pieces = self._pieces(restored)  # none for a variable without state (no gradient)
        self._create_all_weights(pieces)
        for variable, piece in zip(restored, pieces):
            for slot_name, whole in self._slots.get(_var_key(variable), {}).items():
                kept = self._my_piece(whole) if whole.shape == variable.shape else whole
                self.get_slot(piece, slot_name).assign(kept)
        self.drop_slots(restored)
