"""The topology generator's solver choices measured (issue 43): SIMP on random load cases
(input_pipeline.topology) with each linear solver, warm-started from the last iteration's
displacements or not: seconds of CPU per SIMP iteration (its solve, the final compliance's
solve spread over them), conjugate-gradient iterations per solve, and, for the solvers given
to --whole, SIMP iterations and CPU seconds per whole design.

    python -m app.studies.simp_solvers --sides=16,32 --cases=3

Each case runs --iterations SIMP iterations with each solver ("direct", SuperLU, is
measured only at the sides of --direct_sides: at 32^3 one factorization takes minutes),
the solvers interleaved case by case; CPU seconds (the process's, one BLAS thread) are what
the noise of a shared machine moves least. Writes simp_solvers.md, .csv and .json to
--out_dir.
"""
import os
import statistics
import time

from app import cli
from app.studies import harness
from input_pipeline import simp, topology

# SuperLU; a multigrid-preconditioned CG started from zero (cold) or from the last solve
SOLVERS = {"direct": dict(multigrid="direct"),
           "algebraic-cold": dict(multigrid="algebraic", warm_start=False),
           "algebraic-warm": dict(multigrid="algebraic"),
           "geometric-cold": dict(multigrid="geometric", warm_start=False),
           "geometric-warm": dict(multigrid="geometric")}
COLUMNS = ("side", "solver", "cases", "cpu_seconds_per_iteration", "cpu_range",
           "cg_iterations_per_solve", "simp_iterations_per_design", "cpu_seconds_per_design")


def measure(case, options, iterations):
    """(CPU seconds, SIMP iterations, CG iterations per solve) of SIMP on `case`."""
    start = time.process_time()
    settings = {**topology.SIMP_SETTINGS, "max_iterations": iterations}
    if options["multigrid"] == "direct":
        del settings["cg_tolerance"]
    design = simp.optimize(case.shape, case.forces.ravel(), case.fixed.ravel(),
                           case.volume_fraction, **settings, **options)
    seconds = time.process_time() - start
    solves = design.solver_iterations
    return seconds, design.iterations, (statistics.mean(solves) if solves else None)


def main(argv=None):
    parser = cli.argument_parser("app.studies.simp_solvers", __doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="16,32", help="the cubes' sides, in elements")
    parser.add_argument("--cases", type=int, default=3, help="random load cases per side")
    parser.add_argument("--iterations", type=int, default=10,
                        help="SIMP iterations each solver runs on each case")
    parser.add_argument("--direct_sides", default="16", help="sides the direct solve runs at")
    parser.add_argument("--whole", default="geometric-warm",
                        help="solvers also run to SIMP's convergence (comma-separated)")
    parser.add_argument("--out_dir", default="runs/simp_solvers", help="where the table goes")
    args = parser.parse_args(argv)
    sides = harness.whole_numbers(parser, "sides", args.sides)
    direct_sides = harness.whole_numbers(parser, "direct_sides", args.direct_sides)
    whole = [name for name in args.whole.split(",") if name]
    unknown = sorted(set(whole) - set(SOLVERS))
    if unknown:
        parser.error(f"--whole={args.whole}: no solver {', '.join(unknown)} (of "
                     f"{', '.join(SOLVERS)})")

    rows = []
    for side in sides:
        simp.grid_of((side,) * 3)  # the sparsity pattern, once, before any timing
        cases = [topology.random_load_case((side,) * 3, [side, number])
                 for number in range(args.cases)]
        measured = {name: [] for name in SOLVERS}
        for case in cases:
            for name, options in SOLVERS.items():
                if name == "direct" and side not in direct_sides:
                    continue
                seconds, iterations, per_solve = measure(case, options, args.iterations)
                found = {"per_iteration": seconds / iterations, "per_solve": per_solve}
                if name in whole:
                    found["seconds"], found["iterations"], _ = measure(
                        case, options, topology.SIMP_SETTINGS["max_iterations"])
                measured[name].append(found)
        for name, runs in measured.items():
            if not runs:
                continue
            per_iteration = [run["per_iteration"] for run in runs]
            rows.append({
                "side": side, "solver": name, "cases": len(runs),
                "cpu_seconds_per_iteration": statistics.median(per_iteration),
                "cpu_range": f"{min(per_iteration):.3g}-{max(per_iteration):.3g}",
                "cg_iterations_per_solve": (statistics.median(run["per_solve"] for run in runs)
                                            if runs[0]["per_solve"] is not None else None),
                "simp_iterations_per_design": (statistics.median(run["iterations"] for run in runs)
                                               if name in whole else None),
                "cpu_seconds_per_design": (statistics.median(run["seconds"] for run in runs)
                                           if name in whole else None)})
    os.makedirs(args.out_dir, exist_ok=True)
    harness.write_study(os.path.join(args.out_dir, "simp_solvers"), rows,
                        harness.plain_columns(COLUMNS),
                        f"SIMP, {args.cases} random load cases a side, {args.iterations} "
                        f"iterations each, {os.cpu_count()} cores (one used)")


if __name__ == "__main__":
    main()
