"""Minimum-compliance topology optimization in 3D by SIMP, the labels of the topology data set:
linear elasticity on a grid of unit 8-node hexahedra (trilinear, 2x2x2 Gauss points), the
modulus of an element E_void + x^penalty (E_solid - E_void), a density filter of radius
`filter_radius` (Bruns and Tortorelli's, as Andreassen et al.'s 88-line code and Liu and
Tovar's top3d use), optimality-criteria updates, stopped when no density moves by more than
`tolerance`.

The speed is the solve: SciPy's conjugate gradients preconditioned by a geometric multigrid
V-cycle on the grid (run by PyAMG's multilevel solver; PyAMG's algebraic smoothed
aggregation where the grid cannot be halved), warm-started from the previous iteration's
displacements, as large 3D SIMP codes do (Amir, Aage and Lazarov 2014); the stiffness
matrix is assembled from a sparsity pattern worked out once per grid (BENCHMARKS.md, "The
SIMP generator", measures each choice).
"""
import dataclasses
import functools
import itertools

import numpy as np
import pyamg
import pyamg.multilevel
import pyamg.relaxation.smoothing
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg
import threadpoolctl

POISSON = 0.3
E_SOLID, E_VOID = 1.0, 1e-9
CG_TOLERANCE = 1e-8  # relative residual
# A hexahedron's corners (i, j, k offsets along x, y, z), in the order of its 24 unknowns:
# corner by corner, x, y and z displacement each.
CORNERS = np.array(list(itertools.product((0, 1), repeat=3)))


class SolveError(RuntimeError):
    """A linear solve that did not converge."""


@functools.cache
def element_stiffness(poisson=POISSON):
    """The 24x24 stiffness matrix of a unit cube of Young's modulus 1."""
    lame = poisson / ((1 + poisson) * (1 - 2 * poisson))
    shear = 1 / (2 * (1 + poisson))
    # Voigt order xx, yy, zz, yz, xz, xy; engineering shear strains
    elasticity = lame * np.outer([1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]) + shear * np.diag(
        [2, 2, 2, 1, 1, 1])
    gauss = 0.5 + np.array([-0.5, 0.5]) / np.sqrt(3)  # on [0, 1], each of weight 1/2
    stiffness = np.zeros((24, 24))
    for point in itertools.product(gauss, repeat=3):
        point = np.array(point)
        factors = np.where(CORNERS == 1, point, 1 - point)  # each corner's 1D shape factors
        signs = np.where(CORNERS == 1, 1.0, -1.0)
        gradients = np.stack([signs[:, axis] * np.prod(np.delete(factors, axis, axis=1), axis=1)
                              for axis in range(3)], axis=1)  # [corner, axis]
        strain = np.zeros((6, 24))
        for corner, (dx, dy, dz) in enumerate(gradients):
            x, y, z = 3 * corner, 3 * corner + 1, 3 * corner + 2
            strain[0, x], strain[1, y], strain[2, z] = dx, dy, dz
            strain[3, y], strain[3, z] = dz, dy
            strain[4, x], strain[4, z] = dz, dx
            strain[5, x], strain[5, y] = dy, dx
        stiffness += strain.T @ elasticity @ strain / 8
    return stiffness


class Grid:
    """A box of shape[0] x shape[1] x shape[2] unit hexahedra: its elements' unknowns and the
    sparsity pattern of its stiffness matrix, with where each element entry adds up."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.node_shape = tuple(extent + 1 for extent in self.shape)
        self.unknowns = 3 * int(np.prod(self.node_shape))
        first = np.ravel_multi_index(np.indices(self.shape).reshape(3, -1), self.node_shape)
        nodes = first[:, None] + np.ravel_multi_index(CORNERS.T, self.node_shape)[None, :]
        self.element_unknowns = (3 * nodes[:, :, None] + np.arange(3)).reshape(len(first), 24)
        rows = np.repeat(self.element_unknowns, 24, axis=1).ravel()
        columns = np.tile(self.element_unknowns, (1, 24)).ravel()
        keys, self.entry_of = np.unique(rows.astype(np.int64) * self.unknowns + columns,
                                        return_inverse=True)
        self.rows, self.columns = np.divmod(keys, self.unknowns)

    @functools.cached_property
    def node_coordinates(self):
        """[node, 3]: each node's (x, y, z)."""
        return np.stack(np.unravel_index(np.arange(self.unknowns // 3), self.node_shape),
                        axis=1).astype(float)

    def free_pattern(self, free):
        """(the pattern's entries between the unknowns `free` (a boolean [unknowns]), their
        columns and row starts among the free unknowns): stiffness's pattern of a support."""
        kept = np.flatnonzero(free[self.rows] & free[self.columns])
        number = np.cumsum(free) - 1
        rows = number[self.rows[kept]]
        return kept, number[self.columns[kept]], np.searchsorted(rows, np.arange(free.sum() + 1))

    def stiffness(self, moduli, pattern):
        """The stiffness matrix (CSR) of elements of Young's moduli `moduli`, its rows and
        columns of the free unknowns of `pattern` (free_pattern's) alone."""
        values = (moduli[:, None] * element_stiffness().ravel()[None, :]).ravel()
        data = np.bincount(self.entry_of, weights=values, minlength=len(self.rows))
        kept, indices, indptr = pattern
        return scipy.sparse.csr_matrix((data[kept], indices, indptr),
                                       shape=(len(indptr) - 1,) * 2)

    def rigid_body_modes(self, free):
        """[free unknowns, 6]: the translations and rotations, the multigrid's near-null
        space."""
        x, y, z = (self.node_coordinates[:, axis] - self.shape[axis] / 2 for axis in range(3))
        zero, one = np.zeros_like(x), np.ones_like(x)
        modes = [(one, zero, zero), (zero, one, zero), (zero, zero, one),
                 (-y, x, zero), (zero, -z, y), (z, zero, -x)]
        return np.stack([np.stack(mode, axis=1).ravel() for mode in modes], axis=1)[free]


class ElasticSolver:
    """K(moduli) u = f on `grid` with the unknowns `fixed` (a boolean [unknowns]) held at 0, by
    conjugate gradients to a relative residual of `cg_tolerance`, warm-started from the last
    solve (unless not `warm_start`), preconditioned by a V-cycle of `multigrid`:
    "geometric" (the grid's even extents halved level by level, trilinear interpolation,
    Galerkin coarse matrices: a hierarchy costs two sparse products a level, so each solve
    gets its own) or "algebraic" (PyAMG's smoothed aggregation, the rigid-body modes its
    near-null space: any grid, and where the grid cannot be halved); "direct" is SuperLU."""

    def __init__(self, grid, fixed, cg_tolerance=CG_TOLERANCE, multigrid="geometric",
                 warm_start=True):
        _one_blas_thread()
        self.grid, self.cg_tolerance, self.multigrid = grid, cg_tolerance, multigrid
        self.warm_start = warm_start
        self.free = np.flatnonzero(~fixed)
        self.pattern = grid.free_pattern(~fixed)
        self.interpolations = (interpolations(grid.shape, fixed) if multigrid == "geometric"
                               else None)
        if not self.interpolations:
            self.multigrid = "algebraic" if multigrid == "geometric" else multigrid
        self.previous = None
        self.iterations = []  # each solve's, which BENCHMARKS.md counts

    def preconditioner(self, matrix):
        if self.multigrid == "geometric":
            hierarchy = geometric_hierarchy(matrix, self.interpolations)
        else:
            hierarchy = pyamg.smoothed_aggregation_solver(
                matrix, B=self.grid.rigid_body_modes(self.free), smooth="jacobi")
        return hierarchy.aspreconditioner(cycle="V")

    def solve(self, moduli, forces):
        """The displacements [unknowns] (0 at the fixed unknowns)."""
        matrix = self.grid.stiffness(moduli, self.pattern)
        displacements = np.zeros(self.grid.unknowns)
        if self.multigrid == "direct":
            displacements[self.free] = scipy.sparse.linalg.spsolve(matrix.tocsc(),
                                                                   forces[self.free])
            return displacements
        count = [0]
        solution, info = scipy.sparse.linalg.cg(
            matrix, forces[self.free], x0=self.previous, rtol=self.cg_tolerance, maxiter=1000,
            M=self.preconditioner(matrix),
            callback=lambda _: count.__setitem__(0, count[0] + 1))
        if info:
            raise SolveError(f"conjugate gradients did not converge in {info} iterations")
        self.iterations.append(count[0])
        displacements[self.free] = solution
        self.previous = solution if self.warm_start else None
        return displacements


@functools.cache
def _one_blas_thread():
    """NumPy's and SciPy's BLAS on one thread in a process that solves, from then on (set
    once: the limit is the process's, and the input pipeline solves from several threads):
    the vectors are short, and the ranks already solve side by side, one a core."""
    threadpoolctl.threadpool_limits(1, user_api="blas")


def _linear_interpolation(coarse):
    """[2 coarse + 1, coarse + 1]: the nodes of a line of 2 coarse elements from those of
    `coarse` elements (a coarse node on every other fine one, the others halfway)."""
    fine = np.arange(2 * coarse + 1)
    rows = np.concatenate([fine, fine[1::2]])
    columns = np.concatenate([fine // 2, fine[1::2] // 2 + 1])
    values = np.where(fine % 2 == 0, 1.0, 0.5)
    return scipy.sparse.csr_matrix((np.concatenate([values, values[1::2]]), (rows, columns)),
                                   shape=(2 * coarse + 1, coarse + 1))


def interpolations(shape, fixed):
    """The geometric multigrid's interpolations, finest first, each from the free unknowns
    of a coarser grid to the next finer grid's: every extent that is even and at least 4
    halved at each level, until none is (a coarse node is fixed where the fine node under
    it is)."""
    found = []
    while any(extent % 2 == 0 and extent >= 4 for extent in shape):
        halved = [extent % 2 == 0 and extent >= 4 for extent in shape]
        coarse = tuple(extent // 2 if halve else extent for extent, halve in zip(shape, halved))
        nodes = scipy.sparse.identity(1, format="csr")
        for extent, halve in zip(coarse, halved):
            nodes = scipy.sparse.kron(nodes, _linear_interpolation(extent) if halve
                                      else scipy.sparse.identity(extent + 1))
        unknowns = scipy.sparse.kron(nodes, scipy.sparse.identity(3)).tocsr()
        steps = np.array([2 if halve else 1 for halve in halved])[:, None]
        under = np.ravel_multi_index(
            np.indices(tuple(e + 1 for e in coarse)).reshape(3, -1) * steps,
            tuple(e + 1 for e in shape))
        coarse_fixed = fixed.reshape(-1, 3)[under].ravel()
        found.append(unknowns[np.flatnonzero(~fixed)][:, np.flatnonzero(~coarse_fixed)].tocsr())
        shape, fixed = coarse, coarse_fixed
    return found


def geometric_hierarchy(matrix, interpolations_):
    """PyAMG's multilevel solver of `matrix` on the given interpolations (Galerkin coarse
    matrices, symmetric Gauss-Seidel smoothing, the coarsest solved by SuperLU)."""
    levels = []
    for interpolation in interpolations_:
        level = pyamg.multilevel.MultilevelSolver.Level()
        level.A, level.P, level.R = matrix, interpolation, interpolation.T.tocsr()
        levels.append(level)
        matrix = (level.R @ matrix @ interpolation).tocsr()
    levels.append(pyamg.multilevel.MultilevelSolver.Level())
    levels[-1].A = matrix
    solver = pyamg.multilevel.MultilevelSolver(levels, coarse_solver="splu")
    smoother = ("gauss_seidel", {"sweep": "symmetric"})
    pyamg.relaxation.smoothing.change_smoothers(solver, smoother, smoother)
    return solver


def element_energies(grid, displacements):
    """u_e^T K_e u_e of each element at modulus 1."""
    local = displacements[grid.element_unknowns]
    return np.einsum("ei,ij,ej->e", local, element_stiffness(), local)


def moduli_of(densities, penalty):
    return E_VOID + densities ** penalty * (E_SOLID - E_VOID)


@functools.cache
def _filter_kernel(radius):
    reach = int(np.ceil(radius)) - 1
    offsets = np.indices((2 * reach + 1,) * 3) - reach
    return np.maximum(0.0, radius - np.sqrt((offsets ** 2).sum(axis=0)))


def density_filter(radius, shape):
    """(filter, its adjoint) of densities on `shape`: each element's filtered density is the
    mean of its neighbours' within `radius`, weighted by radius - distance."""
    kernel = _filter_kernel(radius)
    weights = scipy.ndimage.convolve(np.ones(shape), kernel, mode="constant")

    def smooth(values):
        return scipy.ndimage.convolve(values.reshape(shape), kernel, mode="constant").ravel()
    return (lambda values: smooth(values) / weights.ravel(),
            lambda values: smooth(values / weights.ravel()))


@dataclasses.dataclass
class Design:
    """SIMP's result: the filtered densities [shape], the compliance f.u of them, the
    iterations, and each iteration's compliance."""
    densities: np.ndarray
    compliance: float
    iterations: int
    history: list
    solver_iterations: list


def optimize(shape, forces, fixed, volume_fraction, *, penalty=3.0, filter_radius=1.5,
             move=0.2, tolerance=0.01, max_iterations=200, **solver_options):
    """Minimum compliance under `volume_fraction` on a grid of `shape` elements: `forces`
    [unknowns] (the nodal loads), `fixed` [unknowns] (the supported unknowns), from uniform
    densities; `solver_options`, ElasticSolver's."""
    grid = grid_of(shape)
    solver = ElasticSolver(grid, fixed, **solver_options)
    forward, adjoint = density_filter(filter_radius, shape)
    count = grid.element_unknowns.shape[0]
    densities = np.full(count, float(volume_fraction))
    physical, history = forward(densities), []
    volume_sensitivity = adjoint(np.ones(count))  # the volume is linear in the densities
    for iteration in range(1, max_iterations + 1):
        displacements = solver.solve(moduli_of(physical, penalty), forces)
        energies = element_energies(grid, displacements)
        history.append(float(forces @ displacements))
        sensitivity = adjoint(-penalty * physical ** (penalty - 1) * (E_SOLID - E_VOID)
                              * energies)
        updated = optimality_criteria(densities, sensitivity, volume_sensitivity, forward,
                                      volume_fraction, move)
        change = np.abs(updated - densities).max()
        densities, physical = updated, forward(updated)
        if change <= tolerance:
            break
    compliance = float(forces @ solver.solve(moduli_of(physical, penalty), forces))
    return Design(physical.reshape(shape), compliance, iteration, history, solver.iterations)


def optimality_criteria(densities, sensitivity, volume_sensitivity, forward, volume_fraction,
                        move):
    """The OC update: each density scaled by sqrt(-dc/dx / (lambda dv/dx)), within `move` of
    its value and [0, 1], lambda found by bisection so that the filtered densities fill the
    volume fraction."""
    low, high = 0.0, 1e9
    target = volume_fraction * densities.size
    scale = np.sqrt(np.maximum(-sensitivity, 0) / volume_sensitivity)
    while (high - low) / (high + low) > 1e-3:
        middle = (low + high) / 2
        candidate = np.clip(densities * scale / np.sqrt(middle),
                            np.maximum(0.0, densities - move), np.minimum(1.0, densities + move))
        if forward(candidate).sum() > target:
            low = middle
        else:
            high = middle
    return candidate


@functools.lru_cache(maxsize=4)
def grid_of(shape):
    """Grid(shape), kept: its sparsity pattern is the costly part."""
    return Grid(shape)


def compliance(shape, forces, fixed, densities, penalty=3.0, **solver_options):
    """f.u of `densities` [shape] (a predicted design too), by the same solver
    (ElasticSolver's options)."""
    solver = ElasticSolver(grid_of(tuple(shape)), fixed, **solver_options)
    return float(forces @ solver.solve(moduli_of(np.asarray(densities, float).ravel(),
                                                 penalty), forces))
