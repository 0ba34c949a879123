"""Pipeline parallelism: the model cut into --pipeline_stages stages of consecutive blocks,
one per rank, with --microbatches microbatches per step, and data parallelism across the
replicas of each stage (hybrid: N = stages x replicas processes).

Where each rank sits, the schedules and the cut are app.parallel.pipeline_plan's. Each step
runs every microbatch forward through the stages (activations sent to the next stage's rank
with MPI point-to-point, mpi4py) and backward (activation gradients sent to the previous
stage) in one of two orders (`schedule`): GPipe's, all forward then all backward, or 1F1B
(PipeDream-flush), which starts a microbatch's backward pass as soon as the last stage has
it and so keeps at most S - s microbatches' activations on stage s instead of all M, with
the same bubble. Then the microbatches' gradients are added up, averaged over the stage's
replicas with Horovod (a process set per stage), and one update. The last stage computes
the loss and the metrics and hands their state to the other stages of its pipeline, so that
every rank logs the same numbers and Horovod's callbacks, which run on every rank, average
them as in data-parallel training.

Horovod has no point-to-point operations, hence mpi4py; Horovod runs on mpi4py's
communicator (hvd.init(comm=...)), which needs MPI_THREAD_MULTIPLE, as both use MPI from
their own threads. Horovod's background thread then takes MPI's lock at every cycle, and the
stages' messages wait for it: a pipelined run cycles no faster than every
PIPELINE_CYCLE_TIME_MS, and keeps Horovod's threads at normal priority (BENCHMARKS.md).
"""
import functools
import os

from app.parallel import sharded_optimizer
from app.horovod import hvd, hvd_tensorflow, keras, tf
from app.parallel.pipeline_plan import schedule, stage_ranks

PIPELINE_CYCLE_TIME_MS = 5.0


def init_arguments(stages, size):
    """hvd.init()'s arguments for a pipelined run of `stages` stages on `size` processes:
    MPI's world communicator (mpi4py's, initialized with MPI_THREAD_MULTIPLE) and a process
    set per stage. Raises RuntimeError if this MPI cannot give MPI_THREAD_MULTIPLE."""
    if stages == 1:
        return {}
    from mpi4py import MPI  # only here: runs without stages need no mpi4py
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise RuntimeError(f"this MPI ({MPI.Get_library_version().splitlines()[0]}) does not "
                           f"provide MPI_THREAD_MULTIPLE, which Horovod and the stages' "
                           f"point-to-point messages on one communicator need")
    cycle = float(os.environ.get("HOROVOD_CYCLE_TIME", PIPELINE_CYCLE_TIME_MS))
    os.environ["HOROVOD_CYCLE_TIME"] = str(max(cycle, PIPELINE_CYCLE_TIME_MS))
    return {"comm": MPI.COMM_WORLD,
            "process_sets": [hvd.ProcessSet(stage_ranks(stage, stages, size))
                             for stage in range(stages)]}


def stage(stage_model, where, arguments, microbatches, num_outputs, recompute, order):
    """This rank's PipelinedStage, once hvd.init(**arguments) ran: its pipeline's
    communicator (MPI's world split by replica) and its stage's process set; `order`, one
    of SCHEDULES."""
    if where.stages == 1:
        pipe, process_set = OneStage(), hvd.global_process_set
    else:
        pipe = arguments["comm"].Split(color=where.replica, key=where.stage)
        process_set = arguments["process_sets"][where.stage]
    return PipelinedStage(stage_model, where, pipe, process_set, microbatches, num_outputs,
                          recompute, order)


class BroadcastStageVariables(keras.callbacks.Callback):
    """Horovod's BroadcastGlobalVariablesCallback for the replicas of one stage (Horovod's
    takes no process set): after the first step, which made the optimizer's slots, the model
    and optimizer variables of the stage's first replica go to the others."""

    def __init__(self):
        super().__init__()
        self.done = False

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            return
        hvd_tensorflow.broadcast_variables(
            [*self.model.variables, *self.model.optimizer.variables],
            root_rank=self.model.where.stage, process_set=self.model.process_set)
        self.done = True


class OneStage:
    """The pipeline of a run without stages (microbatches or recomputation alone)."""

    @staticmethod
    def allreduce(value):
        return value

    @staticmethod
    def bcast(value, root):
        del root
        return value


class PipelinedStage(keras.Model):
    """One rank's stage of a pipelined model, trained by Keras' fit() with the schedule
    above (eagerly: each step exchanges tensors with MPI between its operations).

    `stage_model` is the rank's blocks; `pipe` the MPI communicator of its pipeline (ranked
    by stage); `process_set` Horovod's of the stage's replicas, over which its gradients are
    averaged; with `recompute`, each microbatch keeps only its stage input and recomputes
    the stage's activations in the backward pass (tf.recompute_grad); `order` the schedule's
    (one of SCHEDULES)."""

    def __init__(self, stage_model, where, pipe, process_set, microbatches, num_outputs,
                 recompute=False, order="1f1b"):
        super().__init__(name=stage_model.name)
        self.stage_model, self.where, self.pipe = stage_model, where, pipe
        self.process_set, self.microbatches = process_set, microbatches
        self.num_outputs = num_outputs
        self.metrics_built = where.last  # the other stages build theirs as the last's are
        self.passes = schedule(order, where, microbatches)
        # Compiled pieces between the messages: a tape records a tf.function as one operation
        # and runs its compiled gradient in the backward pass. No AutoGraph: they branch on
        # Python values only, which its conversion at each trace would only slow.
        compiled = functools.partial(tf.function, reduce_retracing=True, autograph=False)
        self.forward = compiled(tf.recompute_grad(self._call_training) if recompute
                                else self._call_training)
        self.infer = compiled(self.stage_model)
        self.loss_and_metrics = compiled(self._loss_and_metrics)
        # The last stage's outputs and loss in one function, as in one process's step:
        # Keras takes a softmax's cross-entropy from its logits only where it sees the
        # softmax, and from the probabilities (other rounding) past a function's boundary.
        # Under 1F1B the last stage holds one microbatch's activations at a time, so not
        # recomputing them there costs nothing.
        self.fuses_loss = where.last and not (recompute and order == "gpipe")
        self.forward_and_loss = compiled(self._forward_and_loss)
        self.evaluate_and_loss = compiled(self._evaluate_and_loss)

    def call(self, inputs, training=None):
        return self.stage_model(inputs, training=training)

    def _call_training(self, inputs):
        return self.stage_model(inputs, training=True)

    def train_step(self, data):
        inputs, labels = data[:2]
        where, count = self.where, self.microbatches
        variables = self.stage_model.trainable_variables
        regularization, regularization_gradients = self._regularization(variables)
        input_parts = tf.split(inputs, count) if where.first else [None] * count
        label_parts = tf.split(labels, count)
        pending, kept = [], {}  # kept: each microbatch's tape until its backward pass
        totals = [tf.zeros_like(variable) for variable in variables]
        for direction, index in self.passes:  # messages tagged by microbatch and direction
            if direction == "forward":
                with tf.GradientTape() as tape:
                    stage_input = self._receive(input_parts[index], index)
                    if not where.first:
                        tape.watch(stage_input)
                    if self.fuses_loss:
                        target = self.forward_and_loss(stage_input, label_parts[index],
                                                       regularization)
                    else:
                        outputs = self.forward(stage_input)
                        target = (self.loss_and_metrics(label_parts[index], outputs,
                                                        regularization)
                                  if where.last else outputs)
                if not where.last:
                    pending.append(self.pipe.isend(outputs.numpy(), where.stage + 1, index))
                kept[index] = (tape, stage_input, target)
                continue
            tape, stage_input, target = kept.pop(index)
            upstream = None if where.last else tf.constant(
                self.pipe.recv(source=where.stage + 1, tag=count + index))
            sources = [*variables, *([] if where.first else [stage_input])]
            gradients = _gradients(tape, target, sources, upstream)
            if not where.first:
                pending.append(self.pipe.isend(gradients[-1].numpy(), where.stage - 1,
                                               count + index))
            totals = [total + gradient for total, gradient in zip(totals, gradients)]
        self.optimizer.apply_gradients(self.reduced(
            [total / count + own for total, own in zip(totals, regularization_gradients)],
            variables))
        for request in pending:
            request.wait()
        return self._shared_metrics(labels)

    def test_step(self, data):
        inputs, labels = data[:2]
        regularization, _ = self._regularization([])
        stage_input = self._receive(inputs, 0)
        if self.where.last:
            self.evaluate_and_loss(stage_input, labels, regularization)
        else:
            self.pipe.send(self.infer(stage_input, training=False).numpy(),
                           self.where.stage + 1, 0)
        return self._shared_metrics(labels)

    def reduced(self, gradients, variables):
        """(gradient, variable) pairs to apply: the gradients averaged over the stage's
        replicas (Horovod's grouped allreduce in the stage's process set: the gradients come
        from the microbatches' backward passes, not from the one loss
        hvd.DistributedOptimizer's compute_gradients would take), or, for an optimizer whose
        state is sharded over them, the local gradients, which it reduce-scatters itself."""
        if isinstance(self.optimizer, sharded_optimizer.ShardedState):
            return list(zip(gradients, variables))
        if self.process_set.size() > 1:
            gradients = hvd_tensorflow.grouped_allreduce(gradients, op=hvd_tensorflow.Average,
                                                         process_set=self.process_set)
        return list(zip(gradients, variables))

    def _loss_and_metrics(self, labels, outputs, regularization):
        """The last stage's loss, with the whole model's weight decay (compute_loss() adds the
        stage's own, `regularization` the other stages'); the metrics updated."""
        loss = self.compute_loss(y=labels, y_pred=outputs)
        loss += tf.cast(regularization, loss.dtype)  # Keras' losses are of floatx
        self._update_metrics(labels, outputs, loss)
        return loss

    def _update_metrics(self, labels, outputs, loss):
        """Keras 3's way for a train_step of one's own: the loss's tracker by its name."""
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
        self.compute_metrics(None, labels, outputs)

    def _forward_and_loss(self, inputs, labels, regularization):
        return self._loss_and_metrics(labels, self._call_training(inputs), regularization)

    def _evaluate_and_loss(self, inputs, labels, regularization):
        return self._loss_and_metrics(labels, self.stage_model(inputs, training=False),
                                      regularization)

    def _receive(self, own, tag):
        """The stage's input: its own (the first stage's data), or the previous stage's."""
        return own if self.where.first else tf.constant(
            self.pipe.recv(source=self.where.stage - 1, tag=tag))

    def _regularization(self, variables):
        """(the weight decay of the other stages of the pipeline, which the loss the last
        stage reports includes; the gradients of this stage's own). The last stage's own
        is in its loss, whose gradients carry it."""
        losses = self.stage_model.losses
        with tf.GradientTape() as tape:
            own = tf.add_n(losses) if losses else tf.constant(0.0)
        gradients = (_gradients(None, own, variables) if self.where.last
                     else _gradients(tape, own, variables))
        others = self.pipe.allreduce(float(own)) - float(own)
        return tf.constant(others, own.dtype), gradients

    def _shared_metrics(self, labels):
        """The last stage's loss and metric state, on every stage of the pipeline."""
        if not self.metrics_built:  # the same metric variables as the last stage's
            self.compute_metrics(None, labels, tf.zeros([tf.shape(labels)[0], self.num_outputs]))
            self.metrics_built = True
        state = [variable for metric in self.metrics for variable in metric.variables]
        values = self.pipe.bcast([variable.numpy() for variable in state]
                                 if self.where.last else None, root=self.where.stages - 1)
        for variable, value in zip(state, values):
            variable.assign(value)
        return self.get_metrics_result()


def _gradients(tape, target, sources, upstream=None):
    """The tape's gradients of `target` (none: zeros), zeros for the sources it does not
    reach (TensorFlow's UnconnectedGradients.ZERO cannot read a Keras 3 variable's dtype)."""
    found = (tape.gradient(target, sources, upstream) if tape is not None
             else [None] * len(sources))
    return [tf.zeros(source.shape, source.dtype) if gradient is None else gradient
            for gradient, source in zip(found, sources)]
