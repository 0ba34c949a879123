"""Shampoo (Gupta, Koren and Singer 2018; distributed as Anil et al. 2020 and Shi et al.
2023) for Keras 3 optimizers: each weight with two or more axes, as a matrix (a kernel's
rows by its outputs), cut into blocks of at most `block_size` x `block_size`; each block
keeps a left and a right statistic, L += G G^T and R += G^T G of its gradients (or their
running averages), and its gradient is preconditioned as (L + e I)^-1/4 G (R + e I)^-1/4,
e relative to each statistic's largest eigenvalue. The step's size is grafted from a
first-order method per block (`grafting`: the gradient's own norm, SGD's; or AdaGrad's
step's), and the result handed to the base optimizer (its momentum, LR and schedule its
own). Variables of one axis (biases, normalization) get the grafted method's step as it is.

Distributed: the gradients reaching the optimizer are the same on every rank (Horovod's
average, or Adasum's), so every rank keeps the same statistics without a message; the
inverse roots, the costly part, are dealt over the ranks (app.curvature: the costliest
first, to the least loaded), each computed on its rank alone every `root_steps` updates
and summed from there to every rank (the others give zeros).
"""
from app.horovod import tf  # first: it sets TF_XLA_FLAGS

from app import curvature

GRAFTINGS = ("sgd", "adagrad")
_ADAGRAD_EPSILON = 1e-10


def blocks(rows, columns, block_size):
    """[(row slice, column slice)] of a rows x columns matrix cut into blocks of at most
    block_size on a side, row-major (the last of a row or column smaller)."""
    cuts = [[slice(start, min(start + block_size, extent))
             for start in range(0, extent, block_size)] for extent in (rows, columns)]
    return [(row, column) for row in cuts[0] for column in cuts[1]]


def inverse_fourth_root(statistic, epsilon):
    """(statistic + epsilon x its largest eigenvalue x I)^-1/4, from its eigendecomposition in
    float64 (the eigenvalues no lower than 0: rounding can put a zero one just below)."""
    values, vectors = curvature.eigh(tf.cast(statistic, tf.float64))
    values = tf.maximum(values, 0.0)
    ridge = epsilon * tf.maximum(tf.reduce_max(values), tf.constant(1e-30, tf.float64))
    root = tf.matmul(vectors * (values + ridge) ** -0.25, vectors, transpose_b=True)
    return tf.cast(root, statistic.dtype)


def preconditioning(optimizer, block_size=128, beta2=1.0, epsilon=1e-6, root_steps=10,
                    grafting="sgd", ranks=curvature.ONE_PROCESS):
    """`optimizer` (a Keras 3 optimizer) made to precondition its gradients with Shampoo
    before its own update: the same class with Preconditioning before it (as
    app.kfac.preconditioning). `beta2` 1 sums the statistics (Shampoo's and AdaGrad's),
    below 1 averages them; the roots are taken anew every `root_steps` updates, on the ranks
    of `ranks` the placement gives them."""
    # the ranks a class attribute: Horovod's DistributedOptimizer, a subclass rebuilt from the
    # config, keeps it
    cls = type(f"Shampoo{type(optimizer).__name__}", (Preconditioning, type(optimizer)),
               {"ranks": ranks})
    return cls.from_config({**optimizer.get_config(), "shampoo_block_size": block_size,
                            "shampoo_beta2": beta2, "shampoo_epsilon": epsilon,
                            "shampoo_root_steps": root_steps, "shampoo_grafting": grafting})


class Preconditioning(curvature.Configured):
    """The Shampoo half of preconditioning()'s class (before the base optimizer's in the MRO):
    its hyperparameters in the config; its statistics, roots and AdaGrad accumulators its
    variables (checkpointed and broadcast): `preconditioned`, variable index -> its blocks'
    state; `roots_computed`, a root's name -> its computations on this rank."""

    ranks = curvature.ONE_PROCESS
    HYPERPARAMETERS = ("shampoo_block_size", "shampoo_beta2", "shampoo_epsilon",
                       "shampoo_root_steps", "shampoo_grafting")
    UNTRACKED = {"preconditioned": dict, "roots_computed": dict, "graft_accumulators": list}

    def build(self, variables):
        super().build(variables)
        self.graft_accumulators[:] = [
            self.add_variable_from_reference(variable, "shampoo_graft")
            if self.shampoo_grafting == "adagrad" else None for variable in variables]
        jobs = []
        for index, variable in enumerate(variables):
            if len(variable.shape) < 2:
                continue
            rows, columns = variable.shape[:-1].num_elements(), variable.shape[-1]
            found = []
            for number, (row, column) in enumerate(blocks(rows, columns,
                                                          self.shampoo_block_size)):
                name = f"{variable.path.replace('/', '_')}_{number}"
                block = {"rows": row, "columns": column}
                for side, extent in (("left", row.stop - row.start),
                                     ("right", column.stop - column.start)):
                    block[side] = self.add_variable((extent, extent), dtype=variable.dtype,
                                                    name=f"{name}_shampoo_{side}")
                    block[f"{side}_root"] = self.add_variable(
                        (extent, extent), initializer="identity", dtype=variable.dtype,
                        name=f"{name}_shampoo_{side}_root")
                    jobs.append((f"{name}_{side}", block, side, extent))
                found.append(block)
            self.preconditioned[index] = found
        owners = curvature.placement([extent for *_, extent in jobs], self.ranks.size)
        for (name, block, side, _), owner in zip(jobs, owners):
            block[f"{side}_owner"] = owner
            block[f"{side}_name"] = name
            self.roots_computed[name] = tf.Variable(0, trainable=False,
                                                    name=f"{name}_roots_computed")

    def apply(self, grads, trainable_variables):
        grads, variables = list(grads), list(trainable_variables)
        if not self.built:
            self.build(variables)
        matrices = {index: tf.reshape(grads[index], [-1, grads[index].shape[-1]])
                    for index in self.preconditioned if grads[index] is not None}
        self._update_statistics(matrices)
        tf.cond(tf.equal(self.iterations % self.shampoo_root_steps, 0), self._update_roots,
                lambda: None)
        return super().apply(self._preconditioned(grads, matrices), variables)

    def _update_statistics(self, matrices):
        beta2 = self.shampoo_beta2
        for index, matrix in matrices.items():
            for block in self.preconditioned[index]:
                gradient = matrix[block["rows"], block["columns"]]
                for side, product in (
                        ("left", tf.matmul(gradient, gradient, transpose_b=True)),
                        ("right", tf.matmul(gradient, gradient, transpose_a=True))):
                    if beta2 == 1:
                        block[side].assign_add(product)
                    else:
                        block[side].assign(beta2 * block[side] + (1 - beta2) * product)

    def _update_roots(self):
        jobs = [curvature.Job(block[f"{side}_owner"],
                              lambda statistic=block[side]: [
                                  inverse_fourth_root(statistic, self.shampoo_epsilon)],
                              [block[f"{side}_root"]], self.roots_computed[block[f"{side}_name"]])
                for state in self.preconditioned.values() for block in state
                for side in ("left", "right")]
        if jobs:
            curvature.run_on_owners(jobs, self.ranks)

    def _grafted_direction(self, index, gradient):
        """The grafted method's step direction for variable `index`'s gradient: the
        gradient itself (SGD), or AdaGrad's, its accumulator added to."""
        accumulator = self.graft_accumulators[index]
        if accumulator is None:
            return gradient
        accumulator.assign_add(tf.square(gradient))
        return gradient / (tf.sqrt(accumulator) + _ADAGRAD_EPSILON)

    def _preconditioned(self, grads, matrices):
        found = list(grads)
        for index, gradient in enumerate(grads):
            if gradient is None:  # not in the loss: Keras leaves the variable alone
                continue
            grafted = self._grafted_direction(index, gradient)
            if index not in matrices:
                found[index] = grafted
                continue
            grafted = tf.reshape(grafted, matrices[index].shape)
            rows = []
            for block in self.preconditioned[index]:
                piece = matrices[index][block["rows"], block["columns"]]
                direction = tf.matmul(tf.matmul(block["left_root"], piece), block["right_root"])
                norm = tf.norm(grafted[block["rows"], block["columns"]])
                scale = tf.math.divide_no_nan(norm, tf.norm(direction))
                rows.append((block["rows"], direction * scale))
            found[index] = tf.reshape(_assembled(rows), gradient.shape)
        return found


def _assembled(pieces):
    """The matrix whose blocks are `pieces` ([(row slice, block)], row-major)."""
    by_row = {}
    for row, piece in pieces:
        by_row.setdefault(row.start, []).append(piece)
    return tf.concat([tf.concat(by_row[start], axis=1) for start in sorted(by_row)], axis=0)
