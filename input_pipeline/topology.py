"""The topology data: random load cases on a box of hexahedra, SIMP's design for each
(input_pipeline.simp), and the voxel arrays a network learns the design from (Rade et al.
2021's inputs: the loads, the supports, the volume fraction and the strain energy of the
uniform design).

A load case is deterministic by its seed: one face of the box supported (the whole face,
or a rectangle of it), one to three loads on the other faces, each at one node or spread
along a line of nodes, in a random direction, of magnitude 1, and a volume fraction
drawn from [0.2, 0.5].
"""
import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np
import scipy.ndimage
import tensorflow as tf

from input_pipeline import simp
from input_pipeline.sources import Source

VOLUME_FRACTIONS = (0.2, 0.5)
SPLIT_IDS = {"train": 0, "validation": 1}
# What makes a design besides its load case; a cached design is of these (and FORMAT, raised
# whenever the generator's code changes what it makes). At most 100 iterations and CG to
# 1e-5: on 16^3 cases the designs were 98-100% (IoU) those of 200 iterations and CG to 1e-8,
# their compliance within 0.1%, for about a third of the CPU time (BENCHMARKS.md).
SIMP_SETTINGS = dict(penalty=3.0, filter_radius=1.5, move=0.2, tolerance=0.01,
                     max_iterations=100, cg_tolerance=1e-5)
FORMAT = 1
# The load cases' seed: the designs are one data set for every run, whatever its --seed (which
# seeds the network, the order and the augmentation, and would remake costly designs)
SEED = 42
MAX_LOADS = 3
# The inputs' channels, in order
CHANNELS = ("load_x", "load_y", "load_z", "support", "volume_fraction", "log_strain_energy")


class LoadCaseError(ValueError):
    """A load case that cannot be: a load or support outside the box, a volume fraction
    outside (0, 1), a box that is not held."""


@dataclasses.dataclass
class LoadCase:
    """`shape`, elements along x, y, z; `forces` [nodes..., 3] and `fixed` [nodes..., 3]
    (boolean) on the nodes' grid, one larger along each axis; `volume_fraction`."""
    shape: tuple
    forces: np.ndarray
    fixed: np.ndarray
    volume_fraction: float

    def __post_init__(self):
        nodes = tuple(extent + 1 for extent in self.shape)
        for name in ("forces", "fixed"):
            if getattr(self, name).shape != nodes + (3,):
                raise LoadCaseError(f"{name} of shape {getattr(self, name).shape}, not the "
                                    f"box's nodes {nodes + (3,)}")
        if not 0 < self.volume_fraction < 1:
            raise LoadCaseError(f"volume fraction {self.volume_fraction}: must be in (0, 1)")
        if not self.fixed.any():
            raise LoadCaseError("no support: the box would float")
        # held unknowns that stop every translation and rotation of the box as a whole
        held = simp.grid_of(tuple(self.shape)).rigid_body_modes(self.fixed.ravel())
        if np.linalg.matrix_rank(held) < 6:
            raise LoadCaseError("the supports do not hold the box: it could move or turn as "
                                "a whole")
        if not self.forces.any():
            raise LoadCaseError("no load")


def read_load_case(path):
    """The LoadCase of a load case file (JSON; docs/topology.md):

        {"shape": [32, 16, 16], "volume_fraction": 0.3,
         "supports": [{"from": [0, 0, 0], "to": [0, 16, 16]}],
         "loads": [{"from": [32, 8, 0], "to": [32, 8, 16], "force": [0, 0, -1]}]}

    `shape`, elements along x, y, z; a support holds the nodes of the box of node indices
    from `from` to `to` (both included; `to` defaults to `from`) in its `directions` ("xyz"
    by default); a load's `force` is spread evenly over its box's nodes. Raises
    LoadCaseError naming what is wrong."""
    try:
        with open(path) as file:
            spec = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoadCaseError(f"not a load case file: {error}") from None
    if not isinstance(spec, dict) or not {"shape", "volume_fraction", "supports",
                                          "loads"} <= set(spec):
        raise LoadCaseError("a load case file holds shape, volume_fraction, supports and loads")
    shape = spec["shape"]
    if not _numbers(shape, int) or not all(extent > 0 for extent in shape):
        raise LoadCaseError(f"shape {json.dumps(shape)}: three whole numbers of elements, "
                            f"above 0")
    nodes = tuple(extent + 1 for extent in shape)
    forces, fixed = np.zeros(nodes + (3,)), np.zeros(nodes + (3,), bool)
    for number, support in enumerate(_entries(spec, "supports"), 1):
        box = _node_box(support, shape, f"support {number}")
        directions = support.get("directions", "xyz")
        if not isinstance(directions, str) or not directions or set(directions) - set("xyz"):
            raise LoadCaseError(f"support {number}: directions {json.dumps(directions)}, "
                                f"of x, y, z")
        for direction in set(directions):
            fixed[box + ("xyz".index(direction),)] = True
    for number, load in enumerate(_entries(spec, "loads"), 1):
        box = _node_box(load, shape, f"load {number}")
        force = load.get("force")
        if not _numbers(force, (int, float)):
            raise LoadCaseError(f"load {number}: force {json.dumps(force)}, three numbers")
        forces[box] += np.array(force, float) / forces[box][..., 0].size
    forces[fixed] = 0.0  # a load on a support goes straight into it
    volume_fraction = spec["volume_fraction"]
    if not _number(volume_fraction, (int, float)):
        raise LoadCaseError(f"volume fraction {json.dumps(volume_fraction)}: a number in "
                            f"(0, 1)")
    return LoadCase(tuple(shape), forces, fixed, float(volume_fraction))


def _number(value, kinds):
    """Whether `value` is a finite number of `kinds` (JSON's true and false, Python's bools,
    are not numbers here; its NaN and Infinity are not finite)."""
    return isinstance(value, kinds) and not isinstance(value, bool) and np.isfinite(value)


def _numbers(values, kinds):
    """Whether `values` is a list of three _number()s."""
    return (isinstance(values, list) and len(values) == 3
            and all(_number(value, kinds) for value in values))


def _entries(spec, key):
    if not isinstance(spec[key], list) or not all(isinstance(entry, dict)
                                                  for entry in spec[key]):
        raise LoadCaseError(f"{key}: a list of boxes of nodes ({{\"from\": [i, j, k], ...}})")
    return spec[key]


def _node_box(entry, shape, name):
    """The slices of the nodes from entry["from"] to entry["to"], both included."""
    first, last = entry.get("from"), entry.get("to", entry.get("from"))
    for corner in (first, last):
        if not _numbers(corner, int):
            raise LoadCaseError(f"{name}: a node is three whole numbers, not "
                                f"{json.dumps(corner)}")
        if not all(0 <= index <= extent for index, extent in zip(corner, shape)):
            raise LoadCaseError(f"{name}: node {corner} is outside the box's nodes "
                                f"{[[0, extent] for extent in shape]}")
    if any(start > stop for start, stop in zip(first, last)):
        raise LoadCaseError(f"{name}: from {first} is past to {last}")
    return tuple(slice(start, stop + 1) for start, stop in zip(first, last))


def _face_nodes(shape, axis, side):
    """The index arrays (i, j, k) of the nodes of a face: `axis` at 0 or its end."""
    nodes = [np.arange(extent + 1) for extent in shape]
    nodes[axis] = np.array([0 if side == 0 else shape[axis]])
    return nodes


def random_load_case(shape, seed):
    """The load case of `seed` on a box of `shape` elements."""
    rng = np.random.default_rng(seed)
    nodes = tuple(extent + 1 for extent in shape)
    forces, fixed = np.zeros(nodes + (3,)), np.zeros(nodes + (3,), bool)
    faces = [(axis, side) for axis in range(3) for side in (0, 1)]
    support_axis, support_side = faces[rng.integers(6)]
    face = _face_nodes(shape, support_axis, support_side)
    if rng.random() < 0.5:  # a rectangle of at least half the face's nodes along each side
        for axis in range(3):
            if axis != support_axis:
                length = rng.integers((len(face[axis]) + 1) // 2, len(face[axis]) + 1)
                start = rng.integers(0, len(face[axis]) - length + 1)
                face[axis] = face[axis][start:start + length]
    fixed[np.ix_(*face)] = True
    loaded = [face for face in faces if face != (support_axis, support_side)]
    for _ in range(rng.integers(1, MAX_LOADS + 1)):
        axis, side = loaded[rng.integers(len(loaded))]
        place = [np.array([rng.integers(extent + 1)]) for extent in shape]
        place[axis] = np.array([0 if side == 0 else shape[axis]])
        if rng.random() < 0.5:  # spread along a whole line of the face
            along = [other for other in range(3) if other != axis][rng.integers(2)]
            place[along] = np.arange(shape[along] + 1)
        direction = rng.normal(size=3)
        share = direction / np.linalg.norm(direction) / np.prod([len(p) for p in place])
        forces[np.ix_(*place)] += share
    forces[fixed] = 0.0  # a load on a support goes straight into it
    if not forces.any():
        return random_load_case(shape, [seed, 1] if np.isscalar(seed) else [*seed, 1])
    return LoadCase(tuple(shape), forces, fixed,
                    float(rng.uniform(*VOLUME_FRACTIONS)))


@dataclasses.dataclass
class Example:
    """A load case's arrays: `inputs` [x, y, z, CHANNELS] float32, `density` [x, y, z] SIMP's
    design, `solid` its thresholded design (the volume fraction's densest elements), and
    SIMP's compliance and iterations."""
    inputs: np.ndarray
    density: np.ndarray
    solid: np.ndarray
    compliance: float
    iterations: int


def element_means(case, values):
    """[elements..., channels]: the mean of `values` [nodes..., channels] over each element's
    eight nodes."""
    x, y, z = case.shape
    return sum(values[i:i + x, j:j + y, k:k + z] for i, j, k in simp.CORNERS) / 8


def inputs_of(case):
    """The network's inputs [x, y, z, CHANNELS]: the loads at the elements (each the mean of
    its nodes', times 8: a point load's whole magnitude at each element it touches), the
    share of each element's supported nodes, the volume fraction, and log10 of the strain
    energy of the uniform design relative to its mean (which makes it the same at any
    uniform density: where the load case strains the material most)."""
    grid = simp.grid_of(case.shape)
    uniform = np.full(int(np.prod(case.shape)), case.volume_fraction)
    displacements = simp.ElasticSolver(grid, case.fixed.ravel()).solve(
        simp.moduli_of(uniform, 3.0), case.forces.ravel())
    energy = simp.element_energies(grid, displacements).reshape(case.shape)
    relative = np.log10(np.maximum(energy / energy.mean(), 1e-6))
    return np.concatenate([
        8 * element_means(case, case.forces),
        element_means(case, case.fixed.any(axis=-1, keepdims=True).astype(float)),
        np.full(case.shape + (1,), case.volume_fraction),
        relative[..., np.newaxis]], axis=-1).astype(np.float32)


def thresholded(density, volume_fraction):
    """The design of `density` with the volume fraction's share of its densest elements."""
    count = int(round(volume_fraction * density.size))
    solid = np.zeros(density.size, bool)
    solid[np.argsort(-density.ravel(), kind="stable")[:count]] = True
    return solid.reshape(density.shape)


def solid_compliance(case, solid):
    """f.u of the design `solid` [shape] (boolean: solid or void) under `case`, by SIMP's
    solver (void at SIMP's E_VOID) to SIMP's tolerance (to 1e-8 the same to 10 digits, at
    up to twice the time on a disconnected design)."""
    return simp.compliance(case.shape, case.forces.ravel(), case.fixed.ravel(),
                           solid.astype(float), cg_tolerance=SIMP_SETTINGS["cg_tolerance"])


def connects(case, solid):
    """Whether the solid elements carry every loaded node to a supported one: some solid
    element around each loaded node joins, through shared faces, a solid element around a
    supported node."""
    components, _ = scipy.ndimage.label(solid)  # face neighbours

    def around(node):
        """The components of the solid elements that have `node` as a corner."""
        return set(np.unique(components[tuple(slice(max(index - 1, 0), index + 1)
                                              for index in node)])) - {0}
    supported = set().union(*(around(node) for node in np.argwhere(case.fixed.any(axis=-1))))
    return all(around(node) & supported for node in np.argwhere((case.forces != 0).any(axis=-1)))


def design_scores(case, predicted, reference):
    """How a predicted design does on `case`: `predicted` [shape] (the solid's probability)
    thresholded to the volume fraction, its compliance over `reference` (SIMP's thresholded
    design's: 1 is as stiff), the share of voxels predicted solid (p > 0.5) off the volume
    fraction, and whether it connects every load to a support."""
    solid = thresholded(predicted, case.volume_fraction)
    return {"compliance_ratio": solid_compliance(case, solid) / reference,
            "volume_fraction_error": volume_fraction_error(case, predicted),
            "connected": connects(case, solid)}


def volume_fraction_error(case, predicted):
    """How far the share of voxels predicted solid (p > 0.5) is from the volume fraction."""
    return abs(float((predicted > 0.5).mean()) - case.volume_fraction)


def example(case, **simp_options):
    """The Example of `case`: its inputs, and SIMP's design (simp.optimize's options)."""
    design = simp.optimize(case.shape, case.forces.ravel(), case.fixed.ravel(),
                           case.volume_fraction, **simp_options)
    return Example(inputs_of(case), design.densities.astype(np.float32),
                   thresholded(design.densities, case.volume_fraction), design.compliance,
                   design.iterations)


def design_folder(cache_dir, side, seed, split):
    """Where the designs of a split are kept: a folder named by a digest of everything that
    made them, so that no run reads designs of other settings."""
    made_of = json.dumps([FORMAT, side, seed, SPLIT_IDS[split], SIMP_SETTINGS, simp.POISSON,
                          simp.E_VOID, VOLUME_FRACTIONS, MAX_LOADS],
                         sort_keys=True)
    return os.path.join(cache_dir, f"topology-{side}-{split}-"
                                   f"{hashlib.sha256(made_of.encode()).hexdigest()[:12]}")


def load_case(side, seed, split, index):
    """The load case of design `index` of a split on a cube of `side` elements."""
    return random_load_case((side,) * 3, [seed, SPLIT_IDS[split], int(index)])


def cached_example(side, seed, split, index, cache_dir=None):
    """(inputs, density, solid) of design `index` of a split: read from `cache_dir` if made
    before, else made by SIMP (and kept there, written whole or not at all)."""
    path = _kept_path(side, seed, split, index, cache_dir)
    if path and os.path.exists(path):
        with np.load(path) as kept:
            return kept["inputs"], kept["density"], kept["solid"]
    return _made(side, seed, split, index, path)


def keep_example(side, seed, split, index, cache_dir):
    """Makes design `index` of a split into `cache_dir` unless it is kept there already;
    whether it made it (app.make_designs)."""
    path = _kept_path(side, seed, split, index, cache_dir)
    if os.path.exists(path):
        return False
    _made(side, seed, split, index, path)
    return True


def _kept_path(side, seed, split, index, cache_dir):
    return (os.path.join(design_folder(cache_dir, side, seed, split), f"{int(index)}.npz")
            if cache_dir else None)


def _made(side, seed, split, index, path):
    """(inputs, density, solid) of design `index`, made by SIMP, kept in `path` if given."""
    made = example(load_case(side, seed, split, index), **SIMP_SETTINGS)
    if path:
        _keep(path, inputs=made.inputs, density=made.density, solid=made.solid)
    return made.inputs, made.density, made.solid


def _keep(path, **arrays):
    """`arrays` in `path` (.npz), written whole or not at all, readable as the umask lets a
    new file be (a shared --data_dir)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".npz",
                                          delete=False)
    try:
        with partial:
            np.savez(partial, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial.name, 0o666 & ~umask)
        os.replace(partial.name, path)
    finally:
        if os.path.exists(partial.name):
            os.unlink(partial.name)


def designs(split, *, volume_size, num_volumes, seed=SEED, cache_dir=None):
    """A sources.Source of `num_volumes` SIMP designs on cubes of `volume_size` elements,
    made from their index in the input pipeline's parallel workers (its `prepare`, each rank
    its own shard's), kept in `cache_dir` when given. Examples: the inputs [side^3,
    CHANNELS] and the thresholded design [side^3, 1] (1: solid); its `cases`, the designs'
    load cases."""
    shape = (volume_size,) * 3

    def design(index):
        inputs, _, solid = tf.numpy_function(
            lambda i: cached_example(volume_size, seed, split, i, cache_dir), [index],
            [tf.float32, tf.float32, tf.bool], stateful=False)
        return (tf.ensure_shape(inputs, shape + (len(CHANNELS),)),
                tf.ensure_shape(tf.cast(solid, tf.float32)[..., tf.newaxis], shape + (1,)))

    return Source(f"topology-{split}", num_volumes, shape + (len(CHANNELS),), 1,
                  records=lambda: tf.data.Dataset.range(num_volumes), prepare=design,
                  task="topology",
                  cases=lambda index: load_case(volume_size, seed, split, index))
