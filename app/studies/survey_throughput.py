"""Whether making synthetic surveys keeps up with training on them: the generator's volumes/s
on one core (input_pipeline.seismic, FaultSeg3D's recipe) against the volumes/s a U-Net
trains at on the same volumes (`app.train --benchmark`, one process on every core), interleaved
and repeated.

    python -m app.studies.survey_throughput --sizes=32,64 --model=unet3d_small --repeats=3

Training consumes what the generator makes while the ratio of the two is above 1 per core
the input pipeline has (its parallel workers make several volumes at once); below it, the
first epoch waits for the generator, and `--cache=memory` (or a file) keeps later epochs
from making them again. Writes survey_throughput.md, .csv and .json to --out_dir; other
arguments go to every training run.
"""
import os
import statistics
import time

import app.horovod  # noqa: F401  (first: it sets TF_XLA_FLAGS)

from app.studies import harness
from input_pipeline import seismic


def generator_volumes_per_sec(size, count=3, seed=0):
    """Surveys of `size`^3 made per second on this thread, over `count` of them."""
    started = time.perf_counter()
    for index in range(count):
        seismic.synthetic_survey(size, [seed, 0, index])
    return count / (time.perf_counter() - started)


def main(argv=None):
    parser = harness.study_parser("app.studies.survey_throughput", __doc__)
    parser.add_argument("--sizes", default="32,64", help="survey sides, each divisible by "
                                                          "the model's down-sampling")
    parser.add_argument("--model", default="unet3d_small", help="the U-Net trained")
    parser.add_argument("--batch_size", type=int, default=1, help="volumes per step")
    parser.add_argument("--steps", type=int, default=8, help="training steps of each run")
    parser.add_argument("--warmup_steps", type=int, default=2, help="steps not measured")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out_dir", default="runs/survey_throughput", help="where runs go")
    args, train_args = parser.parse_known_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes={args.sizes}: whole numbers, comma separated")
    if not 0 <= args.warmup_steps < args.steps or args.repeats < 1:
        parser.error("--steps must be more than --warmup_steps, --repeats at least 1")
    measured = {size: {"generated": [], "trained": []} for size in sizes}
    for round_index in range(args.repeats):
        for size in sizes:
            measured[size]["generated"].append(generator_volumes_per_sec(size, seed=round_index))
            results = harness.run_benchmark(
                os.path.join(args.out_dir, f"{args.model}-{size}-{round_index}"), 1,
                ["--flagfile=configs/seismic_faults_cpu.cfg", f"--model={args.model}",
                 f"--volume_size={size}", f"--patch_size={size}", "--num_volumes=4",
                 f"--batch_size={args.batch_size}", "--epochs=1", "--warmup_epochs=0",
                 f"--steps_per_epoch={args.steps}", f"--warmup_steps={args.warmup_steps}",
                 *train_args], [])
            measured[size]["trained"].append(results["images_per_sec"])
    rows = []
    for size in sizes:
        generated, trained = measured[size]["generated"], measured[size]["trained"]
        ratios = [made / used for made, used in zip(generated, trained)]
        rows.append({"size": size, "generated_per_sec": statistics.median(generated),
                     "trained_per_sec": statistics.median(trained),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)})
    columns = [("survey", lambda row: f"{row['size']}^3"),
               ("made/s (one core)", lambda row: f"{row['generated_per_sec']:.2f}"),
               (f"trained/s ({args.model})", lambda row: f"{row['trained_per_sec']:.2f}"),
               ("made / trained", lambda row: f"{row['ratio']:.1f} "
                                              f"({row['ratio_min']:.1f}-{row['ratio_max']:.1f})")]
    harness.write_study(
        os.path.join(args.out_dir, "survey_throughput"), rows, columns,
        f"Synthetic surveys made against trained, medians of {args.repeats} interleaved rounds",
        ["Made: one thread; trained: one process, batch "
         f"{args.batch_size}, {args.steps - args.warmup_steps} measured steps."])


if __name__ == "__main__":
    main()
