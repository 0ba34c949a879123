"""Checkpoints of model and optimizer after every epoch, and resume from the latest one.

tf.train.CheckpointManager writes each checkpoint's files first and only then points its
`checkpoint` index at them (an atomic rename), so a run stopped at any moment, mid-save
included, finds its last complete epoch. Each checkpoint also records the global batch it
was trained with, so that a run resumed on another number of processes keeps it. A run
resumes from the newest checkpoint that reads whole, passing over damaged newer ones."""
import contextlib
import glob
import json
import os
import re

import keras
import tensorflow as tf

from app import cli

KEEP = 3
_GLOBAL_BATCH_KEY = "global_batch_size/.ATTRIBUTES/VARIABLE_VALUE"
_INDEX_FILE = re.compile(r"epoch-(\d+)(?:-step-(\d+))?\.index")


MODEL_RECORD = "model.json"


def write_model_record(model_dir, model, source, precision):
    """MODEL_DIR/MODEL_RECORD: what the checkpoints are of (the model's name, its inputs and
    outputs, the task, how the inputs were scaled, the precision), so that app.predict
    rebuilds the model from the run alone, wherever its training data has gone."""
    if model.endswith(".keras"):  # app.predict may run from another folder
        model = os.path.abspath(model)
    record = {"model": model, "task": source.task, "input_shape": list(source.feature_shape),
              "num_outputs": source.num_outputs, "standardization": source.standardization,
              "precision": precision}
    with open(os.path.join(model_dir, MODEL_RECORD), "w") as written:
        json.dump(record, written, indent=2)


def read_model_record(model_dir):
    """The run's MODEL_RECORD, None where it has none."""
    path = os.path.join(model_dir, MODEL_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as record:
        return json.load(record)


class MismatchError(ValueError):
    """A checkpoint that does not fit the model being built."""


class WrittenByTfKerasError(RuntimeError):
    """A checkpoint of the project's tf_keras version, which app.convert_checkpoint converts."""


def stage_folder(stage=0, stages=1):
    """The folder, under the model_dir, of the checkpoints of a run's model, or of one stage
    of it (app.parallel.pipeline: each stage's first replica saves its own)."""
    return "checkpoints" if stages == 1 else os.path.join("checkpoints", f"stage-{stage}")


def manager(model, optimizer, model_dir, folder="checkpoints"):
    """Saves model, optimizer and the global batch (see set_global_batch) under model_dir."""
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     global_batch_size=tf.Variable(0, dtype=tf.int64))
    return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, folder),
                                      max_to_keep=KEEP, checkpoint_name="epoch")


def set_global_batch(checkpoint_manager, global_batch):
    """The global batch the next checkpoints record (it changes when an elastic job resizes)."""
    checkpoint_manager.checkpoint.global_batch_size.assign(global_batch)


class NoIntactCheckpointError(RuntimeError):
    """Checkpoints exist, and every one is damaged."""


def latest(model_dir, warn=None, folder="checkpoints"):
    """(epochs done, steps done in the next epoch, global batch) of the newest intact
    checkpoint in `model_dir`: epoch-N after N epochs, epoch-N-step-S after S more steps (a
    run stopped by a signal); (0, 0, 0) if there is none. Each is read whole before it is
    trusted: a newer one that is damaged (truncated or missing data, a bad index) is passed
    over with one `warn` line naming it and the fallback. Raises NoIntactCheckpointError,
    deleting nothing, when there are checkpoints and none is intact.

    The files are listed rather than the `checkpoint` index read, as the index names a
    checkpoint that was complete once, not one that is intact now, and not the mid-epoch
    ones."""
    checkpoint_dir = os.path.join(model_dir, folder)
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    points = sorted(((int(match[1]), int(match[2] or 0))
                     for match in map(_INDEX_FILE.fullmatch, names) if match), reverse=True)
    damaged = []
    for epochs_done, steps_done in points:
        path = os.path.join(checkpoint_dir, checkpoint_name(epochs_done, steps_done))
        try:
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
            global_batch = int(reader.get_tensor(_GLOBAL_BATCH_KEY))
        except (tf.errors.OpError, ValueError, IndexError) as error:  # IndexError: truncated
            damaged.append(f"{path} ({cli.first_line(error)})")
            continue
        if damaged and warn:
            warn(f"damaged checkpoint {'; '.join(damaged)}: resuming from {path} instead")
        return epochs_done, steps_done, global_batch
    if damaged:
        raise NoIntactCheckpointError(f"--model_dir={model_dir}: no intact checkpoint to resume "
                                      f"from, none deleted: {'; '.join(damaged)}")
    return 0, 0, 0


def checkpoint_name(epochs_done, steps_done=0):
    return f"epoch-{epochs_done}" + (f"-step-{steps_done}" if steps_done else "")


def broadcast_latest(model_dir, hvd, warn=None, folder="checkpoints"):
    """latest() of rank 0, on every rank (Horovod's broadcast: every rank calls it), so that
    all resume from the same checkpoint; every rank raises NoIntactCheckpointError when rank
    0 found none intact (rank 0 with the message), so that none waits for the others."""
    message, state = "", (0, 0, 0)
    if hvd.rank() == 0:
        try:
            state = latest(model_dir, warn, folder)
        except NoIntactCheckpointError as error:
            message, state = str(error), (-1, 0, 0)
    epochs_done, steps_done, global_batch = (int(value) for value in hvd.broadcast(
        tf.constant(state, tf.int64), root_rank=0, name="resume_state"))
    if epochs_done < 0:
        raise NoIntactCheckpointError(message)
    return epochs_done, steps_done, global_batch


def restore(checkpoint_manager, epochs, steps=0):
    """Restores the checkpoint taken after `epochs` epochs and `steps` more steps. The
    optimizer's slots do not exist until its first step; TensorFlow restores them when they
    are created."""
    path = os.path.join(checkpoint_manager.directory, checkpoint_name(epochs, steps))
    _refuse_tf_keras(path)
    _restore_matching(checkpoint_manager.checkpoint, path)


def _refuse_tf_keras(path):
    """Raises WrittenByTfKerasError for a checkpoint (MODEL_DIR/checkpoints[/stage-K]/NAME)
    of the project's tf_keras version, naming the command that converts its run."""
    if not written_by_tf_keras(path):
        return
    model_dir = os.path.dirname(os.path.dirname(path))
    if os.path.basename(model_dir) == "checkpoints":
        model_dir = os.path.dirname(model_dir)
    raise WrittenByTfKerasError(
        f"{path} was written by the project's tf_keras version: convert it with python -m "
        f"app.convert_checkpoint --from_dir={model_dir} --to_dir=NEW_MODEL_DIR")


# The project's tf_keras version keyed a checkpoint's optimizer step count so; Keras 3's
# optimizer is "optimizer/_iterations" in the object graph.
_TF_KERAS_ITERATIONS = "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"
_TF_KERAS_LOSS_SCALE = {"dynamic_scale": "current_loss_scale", "step_counter": "good_steps"}


def written_by_tf_keras(path):
    """Whether the checkpoint at `path` is of the project's tf_keras version; MismatchError
    when it cannot be read (a damaged index)."""
    try:
        return tf.train.load_checkpoint(path).has_tensor(_TF_KERAS_ITERATIONS)
    except (ValueError, tf.errors.OpError) as error:
        raise MismatchError(f"{path} cannot be read: {cli.first_line(error)}") from None


def restore_tf_keras(path, model, optimizer, slot_names, slots_by_variable):
    """Restores a checkpoint of the project's tf_keras version into a Keras 3 `model` and
    `optimizer` (built on the model's trainable variables): each layer with weights was
    model/layer_with_weights-K/ (K counting such layers), each weight under its name, its
    slots `slot_names` under it; `slots_by_variable`: the optimizer's slots of each trainable
    variable, in that order. Raises MismatchError naming what does not match, before it
    changes anything."""
    reader = tf.train.load_checkpoint(path)
    value = "/.ATTRIBUTES/VARIABLE_VALUE"
    pairs, trainable = [], {id(weight) for weight in model.trainable_weights}
    slots = dict(zip((id(weight) for weight in model.trainable_weights), slots_by_variable))
    layers = [layer for layer in model.layers if layer.weights]
    for index, layer in enumerate(layers):
        for weight, key in _tf_keras_keys(layer, f"model/layer_with_weights-{index}"):
            pairs.append((weight, key + value))
            if id(weight) in trainable:
                pairs += [(slot, f"{key}/.OPTIMIZER_SLOT/optimizer/{name}{value}")
                          for slot, name in zip(slots[id(weight)], slot_names, strict=True)]
    pairs.append((optimizer.iterations, _TF_KERAS_ITERATIONS))
    for name, tf_keras_name in _TF_KERAS_LOSS_SCALE.items():
        if hasattr(optimizer, name):
            pairs.append((getattr(optimizer, name),
                          f"optimizer/loss_scale/{tf_keras_name}{value}"))
    shapes = reader.get_variable_to_shape_map()
    missing = [key for _, key in pairs if key not in shapes]
    unused = sorted({key for key in shapes if key.startswith("model/")}
                    - {key for _, key in pairs})
    wrong = [f"{key} is of shape {shapes[key]}, the model's {list(variable.shape)}"
             for variable, key in pairs if key in shapes
             and list(variable.shape) != list(shapes[key])]
    if missing or unused or wrong:
        raise MismatchError(f"{path} does not match this model: " + (
            f"it has no {missing[0]}" if missing else
            f"{unused[0]} has no place in it" if unused else wrong[0]))
    for variable, key in pairs:
        variable.assign(reader.get_tensor(key))


def _tf_keras_keys(layer, prefix):
    """(weight, key) of each weight of `layer` in a tf_keras checkpoint: the path of Python
    attributes to it (a list's items by index), its own weights by their names."""
    nested = []
    for name, value in vars(layer).items():
        if name.startswith("_"):
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        nested += [(item, f"{prefix}/{name}" + (f"/{index}" if items is value else ""))
                   for index, item in enumerate(items) if isinstance(item, keras.layers.Layer)]
    inside = set()
    for sublayer, path in nested:
        for weight, key in _tf_keras_keys(sublayer, path):
            inside.add(id(weight))
            yield weight, key
    for weight in layer.weights:
        if id(weight) not in inside:
            yield weight, f"{prefix}/{weight.name}"


# An optimizer whose state is not the same on every rank (the sharded optimizer's pieces,
# K-FAC's decompositions kept by their gradient workers) saves and restores through a twin
# that holds all of it as one process's optimizer would, so that checkpoints are the same
# whatever the placement and the number of processes: it `stands_aside`, has a
# `gathered_twin(keep)` for a save, a `whole_twin()` to restore into, and takes a twin's
# state (`take_state(twin)`).


@contextlib.contextmanager
def whole_state(checkpoint, keep):
    """For the block's duration, the optimizer `checkpoint` saves holds the whole state on
    the rank that `keep`s it: one that stands aside gives way to its gathered twin. Yields
    that optimizer (None on the other ranks of one that stands aside). Every rank calls it,
    as the gathering is collective; any other optimizer is its own."""
    optimizer = checkpoint.optimizer
    if not getattr(optimizer, "stands_aside", False):
        yield optimizer
        return
    twin = optimizer.gathered_twin(keep)
    if not keep:
        yield None
        return
    with _standing_in(checkpoint, optimizer, twin):
        yield twin


@contextlib.contextmanager
def restored_whole_state(checkpoint, variables):
    """Around a restore of `checkpoint`, whose optimizer state is the whole one: an optimizer
    that stands aside gives way to its whole twin, built on `variables` (the model's
    trainable ones), while the block restores, then takes its part of what the twin
    restored. Nothing for any other optimizer."""
    optimizer = checkpoint.optimizer
    if not optimizer.built:  # a K-FAC optimizer knows where its state goes once built
        optimizer.build(variables)
    if not getattr(optimizer, "stands_aside", False):
        yield
        return
    twin = optimizer.whole_twin()
    with _standing_in(checkpoint, optimizer, twin):
        yield
    optimizer.take_state(twin)


@contextlib.contextmanager
def _standing_in(checkpoint, optimizer, twin):
    """`twin` where `checkpoint` holds `optimizer`: as its optimizer, and as its model's,
    which a Keras 3 model that compiled it tracks too."""
    holders = [holder for holder in (checkpoint, checkpoint.model)
               if getattr(holder, "optimizer", None) is optimizer]
    for holder in holders:
        holder.optimizer = twin
    try:
        yield
    finally:
        for holder in holders:
            holder.optimizer = optimizer


def save_mid_epoch(checkpoint_manager, epochs, steps, saves=True,
                   whole_state=contextlib.nullcontext):
    """Writes epoch-N-step-S (after N epochs and S steps) beside the epoch checkpoints where
    `saves`, and returns its path; the next epoch's save removes it. Every rank calls it,
    inside `whole_state()` (which gathers an optimizer's state that is not on every rank
    alike)."""
    path = os.path.join(checkpoint_manager.directory, checkpoint_name(epochs, steps))
    with whole_state():
        if saves:
            _saving(checkpoint_manager, path, lambda: checkpoint_manager.checkpoint.write(path))
    return path if saves else None


def _saving(checkpoint_manager, path, save):
    """Runs `save`, raising SaveError naming the model_dir and `path` when it fails."""
    try:
        save()
    except (OSError, tf.errors.OpError) as error:
        raise SaveError(f"--model_dir={os.path.dirname(checkpoint_manager.directory)}: saving "
                        f"{os.path.basename(path)} failed: {cli.first_line(error)}; the "
                        f"checkpoints before it are intact") from None


def prediction_model(record, input_shape, checkpoint, model_dir):
    """app.predict's model: that of the run of `record` (its model.json) on inputs of
    `input_shape`, its weights from `checkpoint`; one line and out where it cannot be had."""
    import models  # here: app.train's checkpoints need no model table
    if record["precision"] == "float64":
        models.use_float64()
    try:
        model = models.build(record["model"], input_shape, record["num_outputs"])
        initialize_from(model, checkpoint)
    except models.user.UserModelError as error:
        cli.fail(f"--model_dir={model_dir}: --model={record['model']}: {error}")
    except (MismatchError, WrittenByTfKerasError) as error:
        cli.fail(f"--model_dir={model_dir}: {error}", cli.RUN_ERROR)
    return model


def initialize_from(model, path):
    """Starts `model` from the model weights of another run's checkpoint, and nothing else:
    they are read into an uncompiled twin, whose weights are then copied (restoring into
    `model` itself would also restore its optimizer's state, now or once it is created)."""
    _refuse_tf_keras(path)
    twin = keras.models.clone_model(model)
    _restore_matching(tf.train.Checkpoint(model=twin), path, expect_partial=True)
    model.set_weights(twin.get_weights())


def _restore_matching(checkpoint, path, expect_partial=False):
    try:
        status = checkpoint.restore(path)
        if expect_partial:
            status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise MismatchError(f"{path} does not match this model: {cli.first_line(error)}") from None


class SaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a lost filesystem)."""


class SaveEveryEpoch(keras.callbacks.Callback):
    """Saves epoch-N after N epochs where `saves` (on every rank, inside `whole_state()`,
    which gathers a state that is not on every rank alike); raises SaveError naming the
    model_dir when the save fails (the manager writes a checkpoint's files before it points
    its index at them, so the checkpoints before stay intact)."""

    def __init__(self, checkpoint_manager, saves=True, whole_state=contextlib.nullcontext):
        super().__init__()
        self.checkpoint_manager = checkpoint_manager
        self.saves, self.whole_state = saves, whole_state

    def on_epoch_end(self, epoch, logs=None):
        with self.whole_state():
            if not self.saves:
                return
            _saving(self.checkpoint_manager, checkpoint_name(epoch + 1),
                    lambda: self.checkpoint_manager.save(checkpoint_number=epoch + 1))
        for mid_epoch in glob.glob(os.path.join(self.checkpoint_manager.directory,
                                                "epoch-*-step-*")):
            os.remove(mid_epoch)
