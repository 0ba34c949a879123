"""How close a training step runs to the processor: the FLOP/s one process achieves training
a model (`app.train --benchmark` on every core) against this CPU's peak, in float32 and in
bfloat16.

    python -m app.studies.roofline --runs=resnet20:32:64,resnet50:224:16

A run is MODEL:IMAGE_SIZE:BATCH on synthetic images (a U-Net: on synthetic seismic surveys of
IMAGE_SIZE voxels a side, Conv3D's FLOPs counted alike). The FLOPs of a step are counted from the
model: TensorFlow's profiler counts the forward pass of one image (a multiply-add is 2 FLOPs),
and a training step costs three forward passes (the backward pass computes the gradients of
the activations and of the weights, each about a forward pass). The peak is cores x clock x
FLOPs per cycle and core, from the CPU's flags in /proc/cpuinfo: 64 in float32 with AVX-512
and 32 with AVX2 (two fused multiply-add units), and in bfloat16 1024 with AMX, 128 with
AVX512_BF16, otherwise the float32 figure (the CPU converts bfloat16 to float32 to compute).
It is a nominal figure: turbo and the clock drop of wide vector units move it, and so does
whether TensorFlow's kernels use the units. So the study also measures what the processor
delivers, on the threads a run's one process has: a 2048x2048 matrix product and a 3x3
convolution of 64 to 64 channels on a 16x56x56 batch (ResNet-50's first stage), in each
precision, and sets each model's step against the faster of the two as well. Writes
roofline.md, .csv and .json to --out_dir; other arguments go to every run.
"""
import os
import statistics
import time

from app.horovod import tf  # first: it sets TF_XLA_FLAGS

import models
from app import devices, launch
from app.precision import cpu_flags, first_processor
from app.studies import harness

PRECISIONS = ("float32", "bfloat16")
# FLOPs per cycle and core: (CPU flag, float32, bfloat16), the first flag the CPU has wins.
VECTOR_UNITS = (("amx_bf16", 64, 1024), ("avx512_bf16", 64, 128), ("avx512f", 64, 64),
                ("avx2", 32, 32))
SCALAR_FLOPS_PER_CYCLE = 8  # SSE: 4 floats, multiply and add


# name: (the operands' shapes, the kernel, its FLOPs)
KERNELS = {
    "matmul 2048x2048": ([[2048, 2048], [2048, 2048]], tf.linalg.matmul, 2 * 2048 ** 3),
    "conv 3x3 64->64, 16x56x56": (
        [[16, 56, 56, 64], [3, 3, 64, 64]],
        lambda images, kernel: tf.nn.conv2d(images, kernel, strides=1, padding="SAME"),
        2 * 16 * 56 * 56 * 3 * 3 * 64 * 64)}
KERNEL_SECONDS = 0.25  # of each timed repeat


def kernel_gflops(name, precision, repeats=5):
    """GFLOP/s of KERNELS[name] in `precision` (float32, bfloat16 inputs and outputs): the
    median of `repeats` timings, each of as many calls as take KERNEL_SECONDS."""
    shapes, kernel, flops = KERNELS[name]
    operands = [tf.cast(tf.random.stateless_normal(shape, seed=[index, 0]), precision)
                for index, shape in enumerate(shapes)]
    compiled = tf.function(kernel)
    start = time.perf_counter()
    compiled(*operands).numpy()  # traced, oneDNN's primitive made
    calls = max(1, round(KERNEL_SECONDS / (time.perf_counter() - start)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            compiled(*operands)
        rates.append(calls * flops / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def training_flops_per_example(model_name, image_size):
    """Forward and backward FLOPs of one example of `image_size` through `model_name`."""
    source = harness.benchmark_source(model_name, image_size)
    model = models.build(model_name, source.feature_shape, source.num_outputs)
    return 3 * models.forward_flops(model, source.feature_shape)


def cpu_peak(cpuinfo, cores):
    """{precision: nominal peak FLOP/s} of `cores` cores of the CPU /proc/cpuinfo describes,
    and the flag it was taken from."""
    flags = cpu_flags(cpuinfo)
    hertz = float(first_processor(cpuinfo)["cpu MHz"]) * 1e6
    for flag, float32, bfloat16 in VECTOR_UNITS:
        if flag in flags:
            return {"float32": cores * hertz * float32, "bfloat16": cores * hertz * bfloat16}, flag
    peak = cores * hertz * SCALAR_FLOPS_PER_CYCLE
    return {"float32": peak, "bfloat16": peak}, "sse"


def main(argv=None):
    parser = harness.study_parser("app.studies.roofline", __doc__)
    parser.add_argument("--runs", default="resnet20:32:64,resnet50:224:16",
                        help="MODEL:IMAGE_SIZE:BATCH,... on synthetic images")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help=f"of {', '.join(PRECISIONS)}")
    parser.add_argument("--steps", type=int, default=12, help="steps of each run")
    parser.add_argument("--warmup_steps", type=int, default=3, help="steps not measured")
    parser.add_argument("--out_dir", default="runs/roofline", help="where the runs go")
    args, train_args = parser.parse_known_args(argv)
    try:
        runs = harness.parse_runs(args.runs)
    except ValueError as error:
        parser.error(f"--runs: {error} is not MODEL:IMAGE_SIZE:BATCH (a model of "
                     f"{', '.join(models.BUILDERS)}, a size of at least 8, a positive batch)")
    precisions = args.precisions.split(",")
    if not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions: {args.precisions}: each of {', '.join(PRECISIONS)}")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error("--steps must be more than --warmup_steps (at least 0)")

    with open("/proc/cpuinfo") as cpuinfo:
        peaks, unit = cpu_peak(cpuinfo.read(), launch.usable_cores())
    threads = devices.cpu_threads(1)  # the runs' one process's
    devices.set_cpu_threads(threads)  # before TensorFlow's runtime starts
    kernels = {precision: {name: kernel_gflops(name, precision) for name in KERNELS}
               for precision in precisions}
    rows = []
    for name, size, batch in runs:
        flops = training_flops_per_example(name, size)
        for precision in precisions:
            run_dir = os.path.join(args.out_dir, f"{name}-{size}-{batch}-{precision}")
            results = harness.run_benchmark(run_dir, 1, [
                "--flagfile=configs/digits_cnn.cfg", *harness.benchmark_flags(name, size),
                f"--model={name}", f"--batch_size={batch}", "--epochs=1", "--warmup_epochs=0",
                f"--steps_per_epoch={args.steps}", f"--warmup_steps={args.warmup_steps}",
                f"--mixed_precision={precision}",
                *train_args], [])
            achieved = results["images_per_sec"] * flops
            rows.append({"model": name, "image_size": size,
                         "example": harness.example_extent(name, size), "batch": batch,
                         "precision": results["precision"], "gflop_per_image": flops / 1e9,
                         "images_per_sec": results["images_per_sec"],
                         "achieved_gflops": achieved / 1e9,
                         "peak_gflops": peaks[precision] / 1e9,
                         "of_peak": achieved / peaks[precision],
                         "kernel_gflops": max(kernels[precision].values()),
                         "of_kernels": achieved / 1e9 / max(kernels[precision].values())})
    title = (f"Training FLOP/s against the peak of {launch.usable_cores()} cores "
             f"({unit}: {peaks['float32'] / 1e9:.0f} GFLOP/s float32, "
             f"{peaks['bfloat16'] / 1e9:.0f} bfloat16), one process")
    notes = ([] if peaks["bfloat16"] > peaks["float32"] else
             ["This CPU has no bfloat16 arithmetic: bfloat16 runs convert to float32 to "
              "compute, so their peak is float32's."])
    measured = "; ".join(f"{name}: " + ", ".join(f"{precision} {kernels[precision][name]:.0f}"
                                                  for precision in precisions)
                         for name in KERNELS)
    notes.append(f"Kernels, GFLOP/s on {threads} threads (median of 5): "
                 f"{measured}.")
    columns = [("model", lambda row: row["model"]),
               ("example", lambda row: row["example"]),
               ("batch", lambda row: str(row["batch"])),
               ("precision", lambda row: row["precision"]),
               ("GFLOP/image (train)", lambda row: f"{row['gflop_per_image']:.3f}"),
               ("images/s", lambda row: f"{row['images_per_sec']:.1f}"),
               ("GFLOP/s", lambda row: f"{row['achieved_gflops']:.1f}"),
               ("peak GFLOP/s", lambda row: f"{row['peak_gflops']:.0f}"),
               ("of peak", lambda row: f"{row['of_peak']:.1%}"),
               ("kernels' GFLOP/s", lambda row: f"{row['kernel_gflops']:.0f}"),
               ("of kernels'", lambda row: f"{row['of_kernels']:.1%}")]
    harness.write_study(os.path.join(args.out_dir, "roofline"), rows, columns, title, notes,
                        peak_unit=unit, kernel_gflops=kernels)


if __name__ == "__main__":
    main()
