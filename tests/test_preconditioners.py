"""K-FAC and Shampoo as distributed optimizers: a resume from a checkpoint exact; one
process's weights on 2 and 4 processes (tests/workers/preconditioner_check.py), with each
decomposition computed on the rank the placement gives it; and app.train's
--optimizer=kfac|shampoo on 2 processes, accumulating and resumed on another number of
processes, all in float64 to 1e-10."""
import json
import os

import numpy as np
import pytest
from conftest import INTEGRITY_FLAGS, PYTHON, REPO, mpirun, run, run_concurrently, train_command
from tensorflow.core.protobuf import trackable_object_graph_pb2
from test_train import checkpoint_values

from app.horovod import keras, tf
from app import curvature, kfac, shampoo


def preconditioned_sgd(name, model):
    """Momentum SGD preconditioned by `name` for `model`, its curvature updated every other
    step."""
    base = keras.optimizers.SGD(0.2, momentum=0.9)
    if name == "kfac":
        kfac.watch(model)
        return kfac.preconditioning(base, damping=0.03, factor_decay=0.5, inverse_steps=2)
    return shampoo.preconditioning(base, block_size=8, beta2=0.9, root_steps=2)


@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(name, float64, tmp_path):
    """5 steps of a CNN against 3 steps, a checkpoint (tf.train.Checkpoint of the model and
    optimizer), a fresh model and optimizer restored from it, and 2 more, the first of which
    uses the checkpoint's decompositions (they are taken every other step) and the second
    takes new ones: the same weights to 1e-12, so the running factors or statistics, the
    decompositions and the step count are in the checkpoint; from the weights alone (a
    fresh optimizer's state) the weights part."""
    random = np.random.RandomState(7)
    images, labels = random.randn(5, 8, 5, 5, 2), random.randint(0, 3, (5, 8))

    def fresh():
        keras.utils.set_random_seed(2)
        inputs = keras.Input((5, 5, 2))
        x = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, activation="tanh")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
        optimizer = preconditioned_sgd(name, model)
        optimizer.build(model.trainable_variables)
        return model, optimizer

    def train(model, optimizer, steps):
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = keras.losses.SparseCategoricalCrossentropy()(y, model(x, training=True))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                          model.trainable_variables))
        for index in steps:
            step(images[index], labels[index])

    model, optimizer = fresh()
    train(model, optimizer, range(5))
    uninterrupted = [weight.numpy() for weight in model.weights]
    model, optimizer = fresh()
    train(model, optimizer, range(3))
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp_path / "ckpt"))
    for restored in (True, False):
        model, optimizer = fresh()
        if restored:
            tf.train.Checkpoint(model=model, optimizer=optimizer).read(path).assert_consumed()
        else:  # the weights alone
            tf.train.Checkpoint(model=model).read(path).expect_partial()
        train(model, optimizer, range(3, 5))
        difference = max(np.abs(weight.numpy() - value).max()
                         for weight, value in zip(model.weights, uninterrupted))
        assert difference < 1e-12 if restored else difference > 1e-4, (restored, difference)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_one_processs_weights_on_2_and_4_processes_each_decomposition_on_its_rank(name,
                                                                                 tmp_path):
    """tests/workers/preconditioner_check.py: a CNN trained by momentum SGD with K-FAC or
    Shampoo inside Horovod's DistributedOptimizer, a fixed global batch of 8 split over the
    ranks: every rank ends with one process's weights to 1e-10 in float64. Each
    decomposition (K-FAC's factors', Shampoo's roots') is computed at every step on the
    rank curvature.placement gives it, alone (counted on every rank), and broadcast from
    there. K-FAC's ranks each on their own batch factors (not averaged) part from it. With
    1 and 2 gradient workers of 4 ranks (KAISA's memory-optimal and hybrid placements) too:
    a layer's two decompositions on the rank curvature.grouped_placement gives it, kept by
    the ranks of its column only, which precondition it for the others."""
    worker = os.path.join(REPO, "tests", "workers", "preconditioner_check.py")
    cases = {"1": (1, []), "2": (2, []), "4": (4, [])}
    if name == "kfac":
        cases.update({"2-alone": (2, ["alone"]), "4-workers-1": (4, ["workers=1"]),
                      "4-workers-2": (4, ["workers=2"])})

    def train(case):
        processes, extra = cases[case]
        os.makedirs(tmp_path / case)
        command = [PYTHON, worker, str(tmp_path / case), name, *extra]
        run([*mpirun(processes), *command] if processes > 1 else command)
        return [np.load(tmp_path / case / f"rank-{rank}.npz") for rank in range(processes)]
    found = dict(zip(cases, run_concurrently(train, list(cases))))
    [one] = found["1"]
    for case in set(cases) - {"1", "2-alone"}:
        for rank_weights in found[case]:
            for key in one:
                np.testing.assert_allclose(rank_weights[key], one[key], rtol=0, atol=1e-10,
                                           err_msg=f"{case} processes, {key}")
    if name == "kfac":
        assert max(np.abs(found["2-alone"][0][key] - one[key]).max() for key in one) > 1e-3
    for case in set(cases) - {"1", "2-alone"}:
        processes = len(found[case])
        counts = [json.loads((tmp_path / case / f"decompositions-{rank}.json").read_text())
                  for rank in range(processes)]
        owners = {job: owner for job, (owner, _, _, _) in counts[0].items()}
        assert all({job: owner for job, (owner, _, _, _) in ranks.items()} == owners
                   for ranks in counts)
        for rank, ranks in enumerate(counts):
            assert {job: done for job, (_, done, _, _) in ranks.items()} == {
                job: 3 if owner == rank else 0 for job, owner in owners.items()}
        orders = {job: order for job, (_, _, order, _) in counts[0].items()}
        if "workers" not in case:
            assert list(owners.values()) == curvature.placement(list(orders.values()),
                                                                processes)
            assert set(owners.values()) == set(range(processes))  # every rank has work
            continue
        columns, _ = curvature.grad_worker_grid(processes, int(case.split("-")[-1]))
        layers = list(dict.fromkeys(job.split("/")[0] for job in owners))
        assert [owners[f"{layer}/a"] for layer in layers] == curvature.grouped_placement(
            [orders[f"{layer}/a"] ** 3 + orders[f"{layer}/g"] ** 3 for layer in layers],
            columns, processes)
        for job, owner in owners.items():
            assert owners[job.split("/")[0] + "/g"] == owner
            column = next(ranks for ranks in columns if owner in ranks)
            assert [ranks[job][3] for ranks in counts] == [  # vectors and values
                orders[job] * (orders[job] + 1) if rank in column else 0
                for rank in range(processes)], (case, job)


def test_the_placement_deals_the_costliest_first_to_the_least_loaded_rank():
    assert curvature.placement([19, 3, 49, 4], 4) == [1, 3, 0, 2]  # each alone
    assert curvature.placement([19, 3, 49, 4], 2) == [1, 1, 0, 1]  # 49^3 outweighs the rest
    assert curvature.placement([5, 5, 5], 2) == [0, 1, 0]  # ties to the lowest rank
    # KAISA's grid of 8 ranks in 2 rows: 4 columns of 2 gradient workers, rows of 4 receivers
    columns, rows = curvature.grad_worker_grid(8, 2)
    assert columns == [[0, 4], [1, 5], [2, 6], [3, 7]] and rows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # a column at a time (the least loaded), in it the least loaded rank
    assert curvature.grouped_placement([9, 8, 7, 6, 5], [[0, 2], [1, 3]], 4) == [0, 1, 3, 2, 2]


# app.train's runs of each: the rounds of (name, extra flags), 2 at a time
APP_TRAIN_ROUNDS = {
    # K-FAC's 2-process runs with 1 gradient worker (memory-optimal) save through the
    # gathered twin; the resume of the comm-optimal run restores into one
    "kfac": ([("np1", []), ("np2", ["-np", "2", "--kfac_grad_workers=1"])],
             [("accumulated", ["--accumulation_steps=2", "--steps_per_epoch=2"]),
              ("resumed", ["-np", "2", "--epochs=3"])],
             [("resumed", ["-np", "2", "--kfac_grad_workers=1"]),
              ("momentum", ["--optimizer=momentum"])]),
    "shampoo": ([("np1", []), ("np2", ["-np", "2"])],
                [("resumed", ["-np", "2", "--epochs=3"])],
                [("resumed", [])]),
}


def fifth_update_is_decomposed(name, fifth):
    """The decompositions in the checkpoint after the 5th update (one of them) are those of
    the factors or statistics then."""
    if name == "kfac":
        for factor in ("dense_kfac_a", "conv2d_1_kfac_g"):
            np.testing.assert_allclose(decomposed(fifth, factor), fifth[factor], rtol=0,
                                       atol=1e-12)
        return "dense_kfac_a"
    for side in ("dense_kernel_0_shampoo_left", "conv2d_1_kernel_2_shampoo_right"):
        root = shampoo.inverse_fourth_root(tf.constant(fifth[side]), 1e-6).numpy()
        np.testing.assert_allclose(fifth[f"{side}_root"], root, rtol=0, atol=1e-12)
    return "dense_kernel_0_shampoo_left"


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_app_train_ends_as_one_process_on_two_accumulated_or_resumed_elsewhere(name,
                                                                              tmp_path):
    """--optimizer=kfac|shampoo through app.train: the integrity runs' digits CNN (float64,
    a global batch of 128) for 6 updates at a constant LR, decompositions every 4. On 2
    processes; on 2 for 3 epochs, resumed (between two decompositions: the checkpoint's are
    used) on one (Shampoo) or on 2 with K-FAC's one gradient worker a layer, which also
    trained the whole 2-process run; for K-FAC also on one accumulating 2 batches of 64
    (the factors the mean of the batches'): each ends with one process's weights, momentum and
    curvature state to 1e-10 (of the tensor's largest element where that is above 1). The
    decompositions checkpointed after the 5th update are those of its factors or
    statistics, which moved after. K-FAC's weights are not momentum SGD's."""
    flags = [*INTEGRITY_FLAGS, "--epochs=6", "--warmup_epochs=0", "--lr_schedule=constant",
             f"--optimizer={name}", f"--{name}_{'inverse' if name == 'kfac' else 'root'}_steps=4"]

    def command(case, extra):
        if extra[:1] == ["-np"]:
            return [*mpirun(int(extra[1])), *command(case, extra[2:])]
        if "--optimizer=momentum" in extra:  # without the preconditioner's flags
            return train_command(*flags[:-2], *extra, f"--model_dir={tmp_path / case}")
        return train_command(*flags, *extra, f"--model_dir={tmp_path / case}")
    for commands in APP_TRAIN_ROUNDS[name]:
        run_concurrently(run, [command(case, extra) for case, extra in commands])
    one = comparable(tmp_path / "np1", 6)
    state_names = set(optimizer_state(tmp_path / "np1", 6))
    assert len(one) > 16  # 8 weights, 8 momentum slots, and the curvature's
    cases = {case for commands in APP_TRAIN_ROUNDS[name] for case, _ in commands}
    for case in cases - {"np1", "momentum"}:
        other = comparable(tmp_path / case, 6)
        assert other.keys() == one.keys(), case
        for key in one:  # Shampoo's roots reach 50: to 1e-10 of each tensor's largest
            scale = max(1.0, np.abs(one[key]).max())
            np.testing.assert_allclose(other[key], one[key], rtol=0, atol=1e-10 * scale,
                                       err_msg=f"{case}: {key}")
    fifth = optimizer_state(tmp_path / "np1", 5)
    moved = fifth_update_is_decomposed(name, fifth)
    assert moved in state_names and np.abs(one[moved] - fifth[moved]).max() > 1e-6
    if "momentum" in cases:
        momentum = checkpoint_values(tmp_path / "momentum", 6, "model/")
        assert max(np.abs(momentum[key] - one[key]).max() for key in momentum) > 1e-3


def optimizer_state(model_dir, epoch):
    """{name: value} of the optimizer's variables in MODEL_DIR's epoch-EPOCH checkpoint, by
    the names Keras gave them (K-FAC's: LAYER_kfac_a, _g, _a_vectors, _a_values, ...)."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", f"epoch-{epoch}"))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return {attribute.full_name.split("/")[-1]: reader.get_tensor(attribute.checkpoint_key)
            for node in graph.nodes for attribute in node.attributes
            if attribute.checkpoint_key.startswith("optimizer/_variables/")}


def decomposed(state, factor):
    """Q diag(l) Q^T from a factor's checkpointed eigendecomposition."""
    vectors, values = state[f"{factor}_vectors"], state[f"{factor}_values"]
    return (vectors * values) @ vectors.T


def comparable(model_dir, epoch):
    """The checkpoint's weights by path and its optimizer's state by name, each K-FAC
    eigendecomposition as the matrix it decomposes: eigenvectors of a repeated eigenvalue (A's
    zero ones, where a layer saw fewer examples than it has inputs) are any basis of their
    space, which rounding picks."""
    state = optimizer_state(model_dir, epoch)
    found = checkpoint_values(model_dir, epoch, "model/")
    for name in state:
        if name.endswith("_vectors"):
            factor = name[:-len("_vectors")]
            found[f"{factor}_decomposed"] = decomposed(state, factor)
        elif not name.endswith("_values"):
            found[name] = state[name]
    return found
