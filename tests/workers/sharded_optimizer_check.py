"""Run under mpirun -np N (or horovodrun -np N --gloo): in float64, a small CNN (a bias of 3
elements, fewer than 4 ranks' pieces; without accumulation, a head the loss does not reach)
trained some steps through Keras' fit() by each of OPTIMIZERS named with its state sharded
(app.parallel.sharded_optimizer; stage 1 and 2, with and without --accumulation_steps) and by
Horovod's DistributedOptimizer on the same data: the largest relative differences of the
weights and of the optimizer's whole slots (those of the unsharded twin a checkpoint would
save, gathered from the pieces), how far each moved the unreached head, this rank's slot
elements and the unsharded optimizer's, for each of SETTINGS named. Writes
OUT_DIR/rank-R.json.

    mpirun -np N python tests/workers/sharded_optimizer_check.py OUT_DIR SETTING[,SETTING] \
        OPTIMIZER[,OPTIMIZER]
"""
import json
import os
import sys

import numpy as np

from app.horovod import hvd, keras, tf  # first: it sets TF_XLA_FLAGS

from app import checkpoints, horovod, optimizers
from app.parallel import sharded_optimizer

LEARNING_RATES = {"momentum": 0.05, "adam": 0.01, "lamb": 0.01, "lars": 1.0, "novograd": 0.05}
SETTINGS = {"stage1": (False, 1), "stage2": (True, 1), "stage1_accumulated": (False, 2),
            "stage2_accumulated": (True, 2)}
STEPS, BATCH = 4, 2  # per rank, per step


def model(unused_head):
    """The logits, and with `unused_head` an output that has no loss, whose variables get no
    gradient (not with accumulation: Horovod 0.28.1's eager gradient aggregation asserts
    that every gradient exists)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(keras.layers.BatchNormalization()(x))
    outputs = [keras.layers.Dense(3, name="logits")(x)]
    if unused_head:
        outputs.append(keras.layers.Dense(2, name="unused")(x))
    return keras.Model(inputs, outputs)


def data(accumulation_steps, outputs):
    """This rank's shard of the same global batches on every rank, the labels once for each
    of the model's `outputs` (Keras 3 takes as many as there are outputs, losses or not)."""
    examples = STEPS * accumulation_steps * BATCH * hvd.size()
    generator = np.random.default_rng(0)
    images = generator.normal(size=(examples, 6, 6, 1))
    labels = generator.integers(0, 3, size=examples)
    return (tf.data.Dataset.from_tensor_slices((images, (labels,) * outputs))
            .shard(hvd.size(), hvd.rank()).batch(BATCH))


def train(name, sharded, gradients_too=False, accumulation_steps=1):
    net = model(unused_head=accumulation_steps == 1)
    optimizer = optimizers.build(name, LEARNING_RATES[name], momentum=0.9, weight_decay=1e-3)
    if sharded:
        optimizer = sharded_optimizer.shard(optimizer, gradients_too=gradients_too,
                                            accumulation_steps=accumulation_steps)
    else:
        optimizer = hvd.DistributedOptimizer(
            optimizer, **horovod.allreduce_options(accumulation_steps))
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True), None]
    net.compile(optimizer=optimizer, loss=losses[:len(net.outputs)])
    unused = [layer for layer in net.layers if layer.name == "unused"]
    before = [layer.get_weights() for layer in unused]
    net.fit(data(accumulation_steps, len(net.outputs)), epochs=1, verbose=0)
    moved = [float(np.max(np.abs(after - start))) for layer, weights in zip(unused, before)
             for after, start in zip(layer.get_weights(), weights)]
    return net, optimizer, max(moved, default=None)


def slots(net, optimizer):
    """{(variable's index, slot name): value} of the optimizer's slots: Keras 3 names each
    `{the variable's path, '/' as '_'}_{slot name}`."""
    prefixes = [variable.path.replace("/", "_") + "_" for variable in net.trainable_variables]
    return {(index, slot.name[len(prefix):]): slot.numpy()
            for slot in optimizer.variables
            for index, prefix in enumerate(prefixes) if slot.name.startswith(prefix)}


def largest_difference(found, expected):
    return max(float(np.max(np.abs(found[key] - expected[key])
                            / np.maximum(np.abs(expected[key]), 1e-3))) for key in expected)


def main(out_dir, settings, names):
    hvd.init()
    keras.mixed_precision.set_global_policy("float64")
    tf.config.experimental.enable_op_determinism()
    cases = {}
    for name in names.split(","):
        for setting in settings.split(","):
            gradients_too, accumulation_steps = SETTINGS[setting]
            reference, reference_optimizer, reference_moved = train(
                name, False, accumulation_steps=accumulation_steps)
            net, optimizer, moved = train(name, True, gradients_too, accumulation_steps)
            elements = optimizers.state_elements(optimizer)
            expected_slots = slots(reference, reference_optimizer)
            checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer)
            with checkpoints.whole_state(checkpoint, keep=True) as whole:
                assert checkpoint.optimizer is whole  # what a save in the block saves
                found_slots = slots(net, whole)
            assert checkpoint.optimizer is optimizer
            cases[f"{name}_{setting}"] = {
                "weights": largest_difference(
                    dict(enumerate(net.get_weights())), dict(enumerate(reference.get_weights()))),
                "slots": largest_difference(found_slots, expected_slots),
                "unused_moved": [moved, reference_moved],
                "slot_names": sorted({slot_name for _, slot_name in expected_slots}),
                "iterations": [int(optimizer.iterations.numpy()),
                               int(reference_optimizer.iterations.numpy())],
                "slot_elements": elements,
                "slot_elements_after_save": optimizers.state_elements(optimizer),
                "unsharded_slot_elements": optimizers.state_elements(reference_optimizer),
                "slot_variables": len(expected_slots)}
    with open(os.path.join(out_dir, f"rank-{hvd.rank()}.json"), "w") as out:
        json.dump(cases, out, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
