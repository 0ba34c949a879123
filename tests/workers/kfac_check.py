"""Run under mpirun -np N: in float64, a small CNN (a Conv2D and a Dense layer, both
preconditioned) trained STEPS steps of a fixed global batch through Keras' fit() by momentum
SGD with K-FAC (app.kfac) inside Horovod's DistributedOptimizer, each rank on its share of
every batch; the batch factors averaged over the ranks in one grouped allreduce (or, with
`alone`, not at all), each factor's eigendecomposition on the rank kfac.placement gives it.
Writes OUT_DIR/rank-R.npz, the weights after the steps, and OUT_DIR/decompositions-R.json:
{layer/factor: [its owner, the eigendecompositions this rank computed of it]}.

    mpirun -np N python tests/workers/kfac_check.py OUT_DIR [alone]
"""
import json
import os
import sys

import numpy as np

from app.horovod import hvd, keras  # first: it sets TF_XLA_FLAGS

from app import kfac

STEPS, GLOBAL_BATCH = 3, 8


def main(out_dir, alone):
    hvd.init()
    keras.config.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, activation="tanh")(inputs)
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    ranks = kfac.horovod_ranks()
    if alone:
        ranks = ranks._replace(average=lambda tensors: tensors)
    watched = kfac.watch(model, ranks)
    optimizer = hvd.DistributedOptimizer(kfac.preconditioning(
        keras.optimizers.SGD(0.1, momentum=0.9), damping=0.03, factor_decay=0.5))
    model.compile(optimizer, "sparse_categorical_crossentropy", jit_compile=False)
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
        json.dump({f"{layer.name}/{name}": [owner, int(factors.decompositions[name].numpy())]
                   for layer, factors in watched.items()
                   for name, owner in factors.owners.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "alone")
