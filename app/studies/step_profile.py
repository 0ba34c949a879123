"""Where a training step's time goes, by kind of operation, in each precision and setting:
TensorFlow's profiler traces steps of `app.train --benchmark` (one process on every core, as
the roofline study runs), its framework_op_stats tool sums each operation's self time, and
the study adds them up by kind (KINDS: the convolutions and matrix products, the casts,
batch norm, the optimizer's update, Horovod's collectives, the element-wise rest, the input
pipeline), per step. Apart from the traced run, each configuration is timed untraced in
--rounds rounds, interleaved, and its median step set against the first precision's first
setting.

    python -m app.studies.step_profile --runs=resnet50:224:16,unet3d:64:1 \\
        --precisions=float32,bfloat16 --settings=plain,xla,onednn_bf16_math

A run is MODEL:IMAGE_SIZE:BATCH on generated data, as in app.studies.roofline; a setting
(SETTINGS) adds app.train flags or environment variables. Ops' self times are the time their
kernels ran on the thread that started them (a kernel's own threads inside it): their sum can
exceed a step, when ops run side by side, or fall short of it (the time between ops).
Horovod's collectives run on its background thread: their ops return at once, and the wait
for the other ranks shows as time between ops, not under "Horovod". Writes step_profile.md,
.csv and .json to --out_dir; other arguments go to every run.
"""
import collections
import glob
import json
import os
import re
import statistics

import app.horovod  # noqa: F401  (first: it sets TF_XLA_FLAGS)

from app.studies import harness

# A setting: the environment variables and app.train flags it adds.
Setting = collections.namedtuple("Setting", "environment flags")
SETTINGS = {
    "plain": Setting({}, []),
    "xla": Setting({}, ["--jit_compile"]),  # XLA's auto-clustering on the CPU
    # oneDNN computes float32 convolutions and matrix products in bfloat16
    "onednn_bf16_math": Setting({"TF_SET_ONEDNN_FPMATH_MODE": "BF16"}, []),
}
# (kind, pattern its op types match, or pattern its op names match), the first match wins.
KINDS = (
    ("Horovod", r"^Horovod", r"/Horovod[A-Za-z]*_"),
    ("input pipeline", r"^(Dataset|IteratorGetNext)", None),
    ("casts", r"^(_Mkl)?Cast$", None),
    ("convolutions and matrix products", r"Conv|MatMul|Einsum", None),
    ("batch norm", r"BatchNorm", None),
    ("optimizer update", r"^ResourceApply", r"(^|/)(momentum_sgd|sgd|adam|adamw|lamb|lars|"
                                            r"kfac|shampoo|[a-z_]*optimizer)[_0-9]*/"),
    ("element-wise and the rest", r"", None),
)


def kind_of(op_type, op_name):
    """The KINDS name of an operation of `op_type` named `op_name`."""
    for kind, type_pattern, name_pattern in KINDS:
        if re.search(type_pattern, op_type) or (name_pattern and re.search(name_pattern,
                                                                         op_name)):
            return kind
    raise AssertionError("the last kind takes every op")


def op_self_times(trace_dir):
    """{(op type, op name): self time in microseconds} of the host ops of the profiler's
    trace under `trace_dir` (the framework_op_stats table without the idle time)."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data, ok = profiler.xspace_to_tools_data(paths, "framework_op_stats", {})
    if not (paths and ok):
        raise FileNotFoundError(f"{trace_dir}: no profiler trace")
    without_idle = json.loads(data)[-1]
    columns = [column["id"] for column in without_idle["cols"]]
    times = collections.Counter()
    for row in without_idle["rows"]:
        cells = dict(zip(columns, (cell["v"] if cell else None for cell in row["c"])))
        if cells["host_or_device"] == "Host":
            times[cells["type"], cells["operation"]] += cells["total_self_time"]
    return times


def breakdown(times, steps):
    """{kind: milliseconds per step} of op_self_times' `times` over `steps` steps."""
    by_kind = dict.fromkeys((kind for kind, _, _ in KINDS), 0.0)
    for (op_type, op_name), microseconds in times.items():
        by_kind[kind_of(op_type, op_name)] += microseconds / 1000 / steps
    return by_kind


def top_op_types(times, steps, count=6):
    """The `count` op types of most self time: [(type, milliseconds per step)]."""
    by_type = collections.Counter()
    for (op_type, _), microseconds in times.items():
        by_type[op_type] += microseconds / 1000 / steps
    return by_type.most_common(count)


def main(argv=None):
    parser = harness.study_parser("app.studies.step_profile", __doc__)
    parser.add_argument("--runs", default="resnet50:224:16,unet3d:64:1",
                        help="MODEL:IMAGE_SIZE:BATCH,... on generated data")
    parser.add_argument("--precisions", default="float32,bfloat16",
                        help="of float32, bfloat16, float16")
    parser.add_argument("--settings", default="plain", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=8, help="steps of each run")
    parser.add_argument("--warmup_steps", type=int, default=3, help="steps not measured")
    parser.add_argument("--profiled_steps", type=int, default=3,
                        help="steps the traced run traces, after its warmup")
    parser.add_argument("--rounds", type=int, default=3,
                        help="untraced timings of each configuration, interleaved")
    parser.add_argument("--out_dir", default="runs/step_profile", help="where the runs go")
    args, train_args = parser.parse_known_args(argv)
    try:
        runs = harness.parse_runs(args.runs)
    except ValueError as error:
        parser.error(f"--runs: {error} is not MODEL:IMAGE_SIZE:BATCH")
    precisions = harness.known_names(parser, "precisions", args.precisions,
                                     ("float32", "bfloat16", "float16"))
    settings = harness.known_names(parser, "settings", args.settings, SETTINGS)
    if not 0 <= args.warmup_steps < args.steps:
        parser.error("--steps must be more than --warmup_steps (at least 0)")
    if not 0 < args.profiled_steps <= args.steps - args.warmup_steps:
        parser.error("--profiled_steps must be from 1 to --steps minus --warmup_steps")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    configurations = [(run, precision, setting) for run in runs for precision in precisions
                      for setting in settings]

    def train(configuration, run_dir, extra):
        (name, size, batch), precision, setting = configuration
        return harness.run_benchmark(run_dir, 1, [
            "--flagfile=configs/digits_cnn.cfg", *harness.benchmark_flags(name, size),
            f"--model={name}", f"--batch_size={batch}", "--epochs=1", "--warmup_epochs=0",
            f"--steps_per_epoch={args.steps}", f"--warmup_steps={args.warmup_steps}",
            f"--mixed_precision={precision}", *SETTINGS[setting].flags, *extra, *train_args],
            [], environment=SETTINGS[setting].environment)

    def run_dir(configuration, what):
        (name, size, batch), precision, setting = configuration
        return os.path.join(args.out_dir, f"{name}-{size}-{batch}-{precision}-{setting}-{what}")

    first = args.warmup_steps + 1
    profiles = {}
    for configuration in configurations:
        traced = run_dir(configuration, "traced")
        results = train(configuration, traced,
                        [f"--profile_steps={first},{first + args.profiled_steps - 1}"])
        times = op_self_times(os.path.join(traced, "tensorboard"))
        profiles[configuration] = (results["precision"], breakdown(times, args.profiled_steps),
                                   top_op_types(times, args.profiled_steps))
    step_ms = collections.defaultdict(list)
    for round_index in range(args.rounds):
        for configuration in configurations:
            results = train(configuration, run_dir(configuration, f"round{round_index}"), [])
            batch = configuration[0][2]
            step_ms[configuration].append(1000 * batch / results["images_per_sec"])

    rows = []
    for configuration in configurations:
        (name, size, batch), precision, setting = configuration
        baseline = statistics.median(step_ms[(configuration[0], precisions[0], settings[0])])
        median = statistics.median(step_ms[configuration])
        policy, by_kind, top = profiles[configuration]
        rows.append({"model": name, "example": harness.example_extent(name, size),
                     "batch": batch, "precision": policy, "setting": setting,
                     "step_ms": median, "step_ms_min": min(step_ms[configuration]),
                     "step_ms_max": max(step_ms[configuration]),
                     "speedup": baseline / median,
                     **{f"{kind} ms": value for kind, value in by_kind.items()},
                     "top_op_types": "; ".join(f"{op} {ms:.1f}" for op, ms in top)})
    columns = [("model", lambda row: row["model"]), ("example", lambda row: row["example"]),
               ("batch", lambda row: str(row["batch"])),
               ("precision", lambda row: row["precision"]),
               ("setting", lambda row: row["setting"]),
               ("step ms (min-max)", lambda row: f"{row['step_ms']:.0f} "
                                                 f"({row['step_ms_min']:.0f}-"
                                                 f"{row['step_ms_max']:.0f})"),
               (f"speedup over {precisions[0]} {settings[0]}",
                lambda row: f"{row['speedup']:.2f}x"),
               *((f"{kind} ms", lambda row, kind=kind: f"{row[f'{kind} ms']:.1f}")
                 for kind, _, _ in KINDS)]
    notes = [f"Op self times per step from {args.profiled_steps} traced steps; step times "
             f"the median of {args.rounds} untraced runs of {args.steps - args.warmup_steps} "
             f"measured steps. Most time by op type:"]
    notes += [f"- {row['model']} {row['precision']} {row['setting']}: {row['top_op_types']}"
              for row in rows]
    harness.write_study(os.path.join(args.out_dir, "step_profile"), rows, columns,
                        "Where a training step's time goes, one process, by kind of operation",
                        notes)


if __name__ == "__main__":
    main()
