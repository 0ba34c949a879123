"""The topology data's physics (input_pipeline.simp): the finite-element solve against beam
theory, each solver against the others, and SIMP against Liu and Tovar's top3d."""
import numpy as np
import pytest

from input_pipeline import simp, topology


def clamped_box(shape):
    """(grid, fixed): every unknown of the face x = 0 held."""
    grid = simp.grid_of(shape)
    fixed = np.zeros(grid.unknowns, bool)
    fixed[(3 * np.flatnonzero(grid.node_coordinates[:, 0] == 0)[:, None] + np.arange(3))] = True
    return grid, fixed


def tip_deflection(side, slenderness=8):
    """A cantilever of side x side elements' section, slenderness times as long, under a unit
    shear load spread over its tip as a uniform traction: (its tip's mean deflection,
    Timoshenko's)."""
    length = slenderness * side
    grid, fixed = clamped_box((length, side, side))
    nodes = grid.node_coordinates
    tip = np.flatnonzero(nodes[:, 0] == length)
    # a uniform traction's nodal shares: a node on an edge of the face touches half the
    # elements an inner one does, a corner a quarter
    share = np.prod([np.where(np.isin(nodes[tip, axis], (0, side)), 0.5, 1.0)
                     for axis in (1, 2)], axis=0)
    share /= share.sum()
    forces = np.zeros(grid.unknowns)
    forces[3 * tip + 2] = -share
    displacements = simp.ElasticSolver(grid, fixed).solve(np.ones(length * side ** 2), forces)
    deflection = -(displacements[3 * tip + 2] * share).sum()
    inertia, area = side ** 4 / 12, side ** 2
    shear_modulus = simp.E_SOLID / (2 * (1 + simp.POISSON))
    return deflection, (length ** 3 / (3 * simp.E_SOLID * inertia)
                        + length / (5 / 6 * shear_modulus * area))


def test_a_slender_cantilever_bends_as_beam_theory_says_within_the_discretization_error():
    coarse, fine = (deflection / theory - 1 for deflection, theory in (
        tip_deflection(2), tip_deflection(4)))
    # trilinear hexahedra are too stiff in bending, by an error of order h^2
    assert -0.06 < fine < 0 and coarse < 2.5 * fine


@pytest.mark.parametrize("held", ["face", "rectangle"])
def test_the_multigrids_and_a_direct_solve_agree(held):
    grid, fixed = clamped_box((8, 4, 4))
    if held == "rectangle":  # nodes 1-2 along y, 1-3 along z of the face: off the coarse grid
        nodes = grid.node_coordinates
        fixed = np.repeat((nodes[:, 0] == 0) & np.isin(nodes[:, 1], (1, 2))
                          & np.isin(nodes[:, 2], (1, 2, 3)), 3)
    moduli = simp.moduli_of(np.random.default_rng(0).uniform(0.01, 1, 8 * 4 * 4), 3.0)
    forces = np.zeros(grid.unknowns)
    forces[-3:] = (0.3, -1.0, 0.5)
    found = {kind: simp.ElasticSolver(grid, fixed, multigrid=kind).solve(moduli, forces)
             for kind in ("geometric", "algebraic", "direct")}
    for kind in ("geometric", "algebraic"):
        np.testing.assert_allclose(found[kind], found["direct"], rtol=0,
                                   atol=1e-6 * np.abs(found["direct"]).max())
    assert not found["direct"][fixed].any()


# Liu and Tovar's top3d(60, 20, 4, 0.3, 3, 1.5) as MATLAB ran it: the compliance of the
# first iteration to all its digits, and at iterations 10 to 40 as it printed them
# (JuliaTopOpt/SimpleTopOpt.jl logged the run: src/Top_opt_3d/test/ at fb9c908)
TOP3D_FIRST = 28354.7798591674
TOP3D_PRINTED = {10: 4790.5167, 20: 2708.4120, 30: 2512.6369, 40: 2471.2891}


def test_simp_follows_top3ds_cantilever():
    grid, fixed = clamped_box((60, 20, 4))
    nodes = grid.node_coordinates
    forces = np.zeros(grid.unknowns)
    forces[3 * np.flatnonzero((nodes[:, 0] == 60) & (nodes[:, 1] == 0)) + 1] = -1.0
    design = simp.optimize((60, 20, 4), forces, fixed, 0.3, filter_radius=1.5,
                           max_iterations=40)
    assert design.history[0] == pytest.approx(TOP3D_FIRST, rel=1e-9)
    for iteration, printed in TOP3D_PRINTED.items():
        assert design.history[iteration - 1] == pytest.approx(printed, abs=1e-4), iteration
    assert design.densities.mean() == pytest.approx(0.3, abs=1e-3)


def test_the_solver_study_counts_each_solvers_iterations(tmp_path):
    from conftest import run_study
    _, rows = run_study(tmp_path, "app.studies.simp_solvers", "simp_solvers.csv", "--sides=4",
                        "--cases=2", "--iterations=3", "--direct_sides=4")
    assert [row["solver"] for row in rows] == list(
        ("direct", "algebraic-cold", "algebraic-warm", "geometric-cold", "geometric-warm"))
    cases = [topology.random_load_case((4, 4, 4), [4, number]) for number in range(2)]
    settings = {**topology.SIMP_SETTINGS, "max_iterations": 3}
    designs = [simp.optimize(case.shape, case.forces.ravel(), case.fixed.ravel(),
                             case.volume_fraction, **settings) for case in cases]
    found = {row["solver"]: row for row in rows}
    assert found["direct"]["cg_iterations_per_solve"] == ""
    assert float(found["geometric-warm"]["cg_iterations_per_solve"]) == pytest.approx(
        np.median([np.mean(design.solver_iterations) for design in designs]))
    whole = [simp.optimize(case.shape, case.forces.ravel(), case.fixed.ravel(),
                           case.volume_fraction, **topology.SIMP_SETTINGS).iterations
             for case in cases]
    assert float(found["geometric-warm"]["simp_iterations_per_design"]) == np.median(whole)
