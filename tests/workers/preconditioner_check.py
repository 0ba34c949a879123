"""Run under mpirun -np N: in float64, a small CNN (a Conv2D and a Dense layer) trained STEPS
steps of a fixed global batch through Keras' fit() by momentum SGD preconditioned by K-FAC
(app.kfac) or Shampoo (app.shampoo, blocks of 16) inside Horovod's DistributedOptimizer,
each rank on its share of every batch. K-FAC's batch factors are averaged over the ranks
in one grouped allreduce (or, with `alone`, not at all); each decomposition (K-FAC's
factors', Shampoo's roots') is computed on the rank its placement gives it; with
`workers=W`, K-FAC's layers are preconditioned by W gradient workers each. Writes
OUT_DIR/rank-R.npz, the weights after the steps, and OUT_DIR/decompositions-R.json: {name:
[its owner, the decompositions this rank computed of it, its matrix's order, the elements
of its decomposition this rank keeps]}.

    mpirun -np N python tests/workers/preconditioner_check.py OUT_DIR kfac|shampoo \
        [alone|workers=W]
"""
import json
import os
import sys

import numpy as np

from app.horovod import hvd, keras, tf  # first: it sets TF_XLA_FLAGS

from app import cli, curvature, kfac, shampoo

STEPS, GLOBAL_BATCH = 3, 8


def preconditioned(model, name, alone, grad_workers):
    """Momentum SGD preconditioned by `name`, and a function of the optimizer trained (a copy
    of it: Horovod's) giving {decomposition: (owner, count variable, order, elements
    kept)}."""
    ranks = curvature.horovod_ranks()
    if alone:
        ranks = ranks._replace(average=lambda tensors: tensors)
    base = keras.optimizers.SGD(0.1, momentum=0.9)
    if name == "kfac":
        watched = kfac.watch(model, ranks)

        def kept(trained, factors, factor):
            return sum(int(tf.size(variable)) for key, variable in
                       trained.curvature[factors].items() if key.startswith(f"{factor}_"))
        return (kfac.preconditioning(base, damping=0.03, factor_decay=0.5,
                                     grad_workers=grad_workers),
                lambda trained: {
                    f"{layer.name}/{factor}": (owner, factors.decompositions[factor],
                                               getattr(factors, factor).shape[0],
                                               kept(trained, factors, factor))
                    for layer, factors in watched.items()
                    for factor, owner in factors.owners.items()})
    return (shampoo.preconditioning(base, block_size=16, root_steps=1, ranks=ranks),
            lambda trained: {block[f"{side}_name"]: (block[f"{side}_owner"],
                                                     trained.roots_computed[block[f"{side}_name"]],
                                                     block[side].shape[0], None)
                             for state in trained.preconditioned.values() for block in state
                             for side in ("left", "right")})


def main(out_dir, name, option):
    grad_workers = int(option[len("workers="):]) if option.startswith("workers=") else None
    world_size = cli.world_size_from_environment()
    hvd.init(process_sets=curvature.process_sets(world_size, grad_workers or world_size))
    keras.config.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, activation="tanh")(inputs)
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    optimizer, counts = preconditioned(model, name, option == "alone", grad_workers)
    model.compile(hvd.DistributedOptimizer(optimizer), "sparse_categorical_crossentropy",
                  jit_compile=False)
    random = np.random.RandomState(0)
    images = random.randn(STEPS * GLOBAL_BATCH, 6, 6, 2)
    labels = random.randint(0, 4, STEPS * GLOBAL_BATCH)
    local = GLOBAL_BATCH // hvd.size()
    steps = [slice(step * GLOBAL_BATCH + hvd.rank() * local,
                   step * GLOBAL_BATCH + (hvd.rank() + 1) * local) for step in range(STEPS)]
    mine = np.concatenate([np.arange(STEPS * GLOBAL_BATCH)[part] for part in steps])
    model.fit(images[mine], labels[mine], batch_size=local, epochs=1, shuffle=False,
              verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    np.savez(os.path.join(out_dir, f"rank-{hvd.rank()}.npz"),
             *[weight.numpy() for weight in model.weights])
    with open(os.path.join(out_dir, f"decompositions-{hvd.rank()}.json"), "w") as out:
        json.dump({key: [owner, int(count.numpy()), order, kept]
                   for key, (owner, count, order, kept) in counts(model.optimizer).items()},
                  out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
