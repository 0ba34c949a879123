"""Issue 43's questions on the topology experiment: what each network and each optimizer
reaches on the same designs in the same epochs, and what growing the resolution buys
(Balu et al.): a model trained on small cubes, continued on large ones from its weights,
against the large ones from scratch for the same time.

    python -m app.studies.topology_study --variants=unet_adam,resunet_adam,unet_lamb \\
        --seeds=1,2
    python -m app.studies.topology_study --variants=unet_adam --grow_to=32 \\
        --grow_volumes=64 --grow_epochs=10

Every run is an app.train of --flagfile (configs/topology_cpu.cfg) through app.launch on
-np processes; other arguments go to every run. A variant is a network and an optimizer
(VARIANTS), at the experiment's LR times each factor of --lr_grid. With --grow_to, after
each variant's run at the experiment's size, two runs at --grow_to: one starting from the
small run's last checkpoint for --grow_epochs, one from scratch, stopped by --time_budget at
the small run and the continued run's seconds together.

Writes to --out_dir: each run's folder and topology.md/.csv/.json (per run: the network,
optimizer, size, LR, epochs, seconds, milliseconds a step, and the last epoch's design
scores: the median and 90th percentile of the compliance over SIMP's, the connected share,
the volume-fraction error, the solid's IoU).
"""
import csv
import os

from app.studies import harness

# Each variant's flags: a network of the model table and an optimizer (K-FAC and Shampoo
# precondition Adam: the experiment's own update)
VARIANTS = {
    "unet_adam": ["--model=unet3d_small", "--optimizer=adam"],
    "resunet_adam": ["--model=resunet3d_small", "--optimizer=adam"],
    "unet_lamb": ["--model=unet3d_small", "--optimizer=lamb"],
    "unet_kfac": ["--model=unet3d_small", "--optimizer=kfac", "--base_optimizer=adam"],
    "unet_shampoo": ["--model=unet3d_small", "--optimizer=shampoo", "--base_optimizer=adam"],
}
SCORES = ("val_compliance_ratio", "val_compliance_ratio_p90", "val_connected",
          "val_volume_fraction_error", "val_iou")
COLUMNS = ("run", "variant", "start", "side", "seed", "learning_rate", "epochs", "seconds",
           "ms_per_step", *SCORES)


def measure(run_dir, flags, args, row):
    """One run: `row` with its results and last epoch's scores (None where it diverged)."""
    results = harness.run_app_train(run_dir, ["-np", str(args.processes)],
                                    [f"--flagfile={args.flagfile}", *flags],
                                    divergence_ok=True)
    if results is None:
        return {**row, "learning_rate": None, "epochs": None, "seconds": None,
                "ms_per_step": None, **{score: None for score in SCORES}}
    with open(os.path.join(run_dir, "training_log.csv")) as log:
        last = list(csv.DictReader(log))[-1]
    return {**row, "learning_rate": results["learning_rate"],
            "epochs": results["epochs_completed"], "seconds": float(last["wall_seconds"]),
            "ms_per_step": (1000 * results["global_batch_size"] / results["images_per_sec"]
                            if results["images_per_sec"] else None),
            **{score: float(last[score]) for score in SCORES}}


def experiment_defaults(flagfile):
    """The registry's defaults of the experiment `flagfile` names."""
    from app.experiments import EXPERIMENTS
    with open(flagfile) as lines:
        name = next(line.split("=", 1)[1].strip() for line in lines
                    if line.startswith("--experiment="))
    return EXPERIMENTS[name].defaults


def given(train_args, name, default):
    """The value of --`name`=... last given in `train_args`, else `default`."""
    values = [argument.split("=", 1)[1] for argument in train_args
              if argument.startswith(f"--{name}=")]
    return int(values[-1]) if values else default


def main(argv=None):
    parser = harness.study_parser("app.studies.topology_study", __doc__)
    parser.add_argument("-np", "--processes", type=int, default=2,
                        help="processes of every run")
    parser.add_argument("--flagfile", default="configs/topology_cpu.cfg",
                        help="the experiment every run starts from")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--lr_grid", default="1", help="factors of the experiment's LR tried")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds of every setting")
    parser.add_argument("--grow_to", type=int, default=None,
                        help="the larger cube side to continue each variant at")
    parser.add_argument("--grow_volumes", type=int, default=64,
                        help="training designs at --grow_to")
    parser.add_argument("--grow_epochs", type=int, default=10,
                        help="epochs of the continued run at --grow_to")
    parser.add_argument("--out_dir", default="runs/topology_study",
                        help="where the runs and the table go")
    args, train_args = parser.parse_known_args(argv)
    variants = harness.known_names(parser, "variants", args.variants, VARIANTS)
    seeds = harness.whole_numbers(parser, "seeds", args.seeds)
    try:
        factors = [float(value) for value in args.lr_grid.split(",")]
    except ValueError:
        parser.error(f"--lr_grid={args.lr_grid}: must be numbers, comma-separated")
    if min(factors) <= 0 or args.processes < 1:
        parser.error("--lr_grid and -np must be positive")
    defaults = experiment_defaults(args.flagfile)  # its LR, which the grid scales

    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for variant in variants:
        for factor in factors:
            for seed in seeds:
                name = f"{variant}-{factor:g}x-seed{seed}"
                flags = [*harness.arguments_for(VARIANTS[variant][1].split("=")[1],
                                                train_args),
                         *VARIANTS[variant],
                         f"--learning_rate={defaults['learning_rate'] * factor:g}",
                         f"--seed={seed}"]
                small = measure(os.path.join(args.out_dir, name), flags, args, {
                    "run": name, "variant": variant, "start": "scratch",
                    "side": given(train_args, "volume_size", defaults["volume_size"]),
                    "seed": seed})
                rows.append(small)
                if args.grow_to is None or small["epochs"] is None:
                    continue
                large = [f"--volume_size={args.grow_to}",
                         f"--num_volumes={args.grow_volumes}"]
                grown = measure(
                    os.path.join(args.out_dir, f"{name}-grown{args.grow_to}"),
                    [*flags, *large, f"--epochs={args.grow_epochs}",
                     f"--init_checkpoint={args.out_dir}/{name}/checkpoints/"
                     f"epoch-{small['epochs']}"],
                    args, {"run": f"{name}-grown{args.grow_to}", "variant": variant,
                           "start": f"from {small['side']}^3", "side": args.grow_to,
                           "seed": seed})
                rows.append(grown)
                budget = small["seconds"] + (grown["seconds"] or 0)
                rows.append(measure(
                    os.path.join(args.out_dir, f"{name}-scratch{args.grow_to}"),
                    [*flags, *large, "--epochs=1000", f"--time_budget={budget:.0f}"],
                    args, {"run": f"{name}-scratch{args.grow_to}", "variant": variant,
                           "start": f"scratch, {budget:.0f} s", "side": args.grow_to,
                           "seed": seed}))

    title = (f"{args.flagfile} {' '.join(train_args)}: {args.processes} processes, "
             f"{os.cpu_count()} cores, LR x {args.lr_grid}, seeds {args.seeds}")
    harness.write_study(os.path.join(args.out_dir, "topology"), rows,
                        harness.plain_columns(COLUMNS), title,
                        notes=["Design scores of the last epoch, over the validation designs "
                               "of the run's size (docs/topology.md, The metrics)."])


if __name__ == "__main__":
    main()
