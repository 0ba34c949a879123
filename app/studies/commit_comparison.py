"""Two checkouts of the project side by side: the step time of the same benchmark runs in
this one and in --baseline (another checkout, with its own Python), interleaved in one run,
so that a change of the code or of its libraries (Keras 3 against the last tf_keras commit)
is measured on the same machine in the same minutes.

    python -m app.studies.commit_comparison --baseline=../old \
        --baseline_python=../old/.venv/bin/python --out_dir=runs/keras3_vs_tf_keras

Each of WORKLOADS runs `app.train --benchmark` through app.launch at 1 and 2 processes,
--repeats times, the two checkouts alternating; reported: the medians of the milliseconds
per step and of the CPU milliseconds per image summed over the ranks (which a busy
neighbour slows less than the wall clock), their spread, and this checkout's over the
baseline's. Writes commit_comparison.md, .csv and .json to --out_dir.
"""
import json
import os
import statistics
import subprocess
import sys

from app.studies import harness

# name: app.train flags (synthetic or generated data: nothing to prepare), each with its
# experiment's LR schedule
WORKLOADS = {
    "digits CNN": ["--flagfile=configs/digits_cnn.cfg", "--steps_per_epoch=150"],
    "ResNet-20": ["--flagfile=configs/digits_cnn.cfg", "--model=resnet20", "--dataset=synthetic",
                  "--image_size=32", "--batch_size=32", "--steps_per_epoch=23"],
    "ResNet-50": ["--flagfile=configs/synthetic_resnet50.cfg", "--image_size=64",
                  "--batch_size=8", "--steps_per_epoch=11"],
    "3D U-Net": ["--flagfile=configs/faultseg3d.cfg", "--num_volumes=8", "--volume_size=32",
                 "--batch_size=1", "--steps_per_epoch=9"],
}
# the first 3 steps (tracing) left out of the throughput
COMMON = ["--epochs=1", "--warmup_epochs=0", "--warmup_steps=3", "--threads_per_process=1",
          "--cache=memory"]


COLUMNS = ("workload", "processes", "this_ms_per_step", "baseline_ms_per_step", "step_ratio",
           "step_ratio_spread", "this_cpu_ms_per_image", "baseline_cpu_ms_per_image",
           "cpu_ratio")


def main():
    parser = harness.study_parser(__name__, __doc__)
    parser.add_argument("--baseline", required=True, help="The other checkout's folder.")
    parser.add_argument("--baseline_python", required=True,
                        help="The Python (of its virtual environment) that runs it.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", default="1,2",
                        type=lambda text: harness.whole_numbers(parser, "processes", text))
    parser.add_argument("--out_dir", default="runs/commit_comparison")
    options, extra = parser.parse_known_args()
    checkouts = {"this": (os.getcwd(), sys.executable),
                 "baseline": (os.path.abspath(options.baseline), options.baseline_python)}
    runs = []
    for repeat in range(options.repeats):
        for name, flags in WORKLOADS.items():
            for processes in options.processes:
                for which, (folder, python) in checkouts.items():
                    model_dir = os.path.abspath(os.path.join(
                        options.out_dir, f"{which}-{name.replace(' ', '_')}-np{processes}-"
                                         f"{repeat}"))
                    results = run(folder, python, processes, [*flags, *COMMON, *extra],
                                  model_dir)
                    runs.append({"checkout": which, "workload": name, "processes": processes,
                                 "ms_per_step": 1000 * results["global_batch_size"]
                                 / results["images_per_sec"],
                                 "cpu_ms_per_image": results["cpu_ms_per_image"]})
    rows = summary(runs, options.processes)
    harness.write_study(
        os.path.join(options.out_dir, "commit_comparison"), rows,
        [(column, lambda row, column=column: str(row[column])) for column in COLUMNS],
        f"This checkout against {options.baseline}, medians of {options.repeats} interleaved "
        f"repeats", runs=runs)


def run(folder, python, processes, flags, model_dir):
    """app.train --benchmark of the checkout in `folder`, by `python`; its results."""
    command = [python, "-m", "app.launch", "-np", str(processes), *flags, "--benchmark",
               f"--model_dir={model_dir}"]
    environment = {**os.environ, "PYTHONPATH": folder}
    environment.pop("TF_USE_LEGACY_KERAS", None)
    result = subprocess.run(command, cwd=folder, env=environment, capture_output=True,
                            text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} (in {folder}) failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(model_dir, "results.json")) as written:
        return json.load(written)


def summary(runs, process_counts):
    """One row per workload and process count: each checkout's medians, and the ratios of
    this one's to the baseline's (the step ratio's spread: the repeats' lowest to highest
    ratio of the pairs run side by side)."""
    rows = []
    for name in WORKLOADS:
        for processes in process_counts:
            found = {which: [entry for entry in runs if entry["workload"] == name
                             and entry["processes"] == processes and entry["checkout"] == which]
                     for which in ("this", "baseline")}
            medians = {which: {measure: statistics.median(entry[measure] for entry in entries)
                               for measure in ("ms_per_step", "cpu_ms_per_image")}
                       for which, entries in found.items()}
            pair_ratios = [this["ms_per_step"] / base["ms_per_step"]
                           for this, base in zip(found["this"], found["baseline"])]
            rows.append({
                "workload": name, "processes": processes,
                "this_ms_per_step": round(medians["this"]["ms_per_step"], 1),
                "baseline_ms_per_step": round(medians["baseline"]["ms_per_step"], 1),
                "step_ratio": round(medians["this"]["ms_per_step"]
                                    / medians["baseline"]["ms_per_step"], 3),
                "step_ratio_spread": f"{min(pair_ratios):.2f}-{max(pair_ratios):.2f}",
                "this_cpu_ms_per_image": round(medians["this"]["cpu_ms_per_image"], 2),
                "baseline_cpu_ms_per_image": round(medians["baseline"]["cpu_ms_per_image"], 2),
                "cpu_ratio": round(medians["this"]["cpu_ms_per_image"]
                                   / medians["baseline"]["cpu_ms_per_image"], 3)})
    return rows


if __name__ == "__main__":
    main()
