"""The type a run computes in: --mixed_precision=auto's choice from the processor (given the
/proc/cpuinfo of each kind of machine the project meets, tests/data/cpuinfo), its record, and
bfloat16's accuracy beside float32's."""
import json
import os

import pytest

from app import precision
from conftest import mpirun, run, run_concurrently, train_command

CPUINFO = os.path.join(os.path.dirname(__file__), "data", "cpuinfo")


def hardware(machine, gpu_capability=None):
    with open(os.path.join(CPUINFO, f"{machine}.txt")) as cpuinfo:
        return precision.Hardware(precision.cpu_flags(cpuinfo.read()), gpu_capability)


@pytest.mark.parametrize("machine, policy, named", [
    ("intel_xeon_8480", "mixed_bfloat16", "AMX (flag amx_bf16)"),
    ("amd_epyc_zen5", "mixed_bfloat16", "AVX512_BF16 (flag avx512_bf16)"),
    ("amd_epyc_zen3", "float32", "neither AMX (amx_bf16) nor AVX512_BF16")])
def test_auto_computes_in_bfloat16_where_the_cpu_has_bfloat16_arithmetic(machine, policy, named):
    choice = precision.choose("auto", False, [hardware(machine)])
    assert choice.policy == policy and choice.reason.startswith("auto: ")
    assert named in choice.reason


@pytest.mark.parametrize("capability, policy", [
    ((7, 0), "float32"), ((7, 5), "float32"), ((8, 0), "mixed_bfloat16"),
    ((8, 6), "mixed_bfloat16"), ((9, 0), "mixed_bfloat16")])
def test_on_a_gpu_its_compute_capability_decides_not_the_cpu(capability, policy):
    """A V100 (7.0) or T4 (7.5) beside an AMX CPU computes in float32; an A100 (8.0) beside
    a CPU without bfloat16, in bfloat16."""
    cpu = "intel_xeon_8480" if policy == "float32" else "amd_epyc_zen3"
    choice = precision.choose("auto", False, [hardware(cpu, capability)])
    assert choice.policy == policy
    assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason


def test_auto_takes_bfloat16_only_where_every_rank_computes_it():
    """A job across two kinds of node computes alike on all ranks: in float32, naming the
    first rank without bfloat16 (none named where no rank has it)."""
    ranks = [hardware("intel_xeon_8480"), hardware("amd_epyc_zen5"),
             hardware("amd_epyc_zen3"), hardware("amd_epyc_zen3")]
    choice = precision.choose("auto", False, ranks)
    assert choice.policy == "float32" and "auto: rank 2: the CPU has neither" in choice.reason
    assert precision.choose("auto", False, ranks[:2]).policy == "mixed_bfloat16"
    alike = precision.choose("auto", False, ranks[2:])  # no rank to name where all lack it
    assert alike.policy == "float32" and alike.reason.startswith("auto: the CPU has neither")


@pytest.mark.parametrize("requested, float64, saved_model, policy", [
    ("float16", False, False, "mixed_float16"), ("bfloat16", False, False, "mixed_bfloat16"),
    ("float32", False, False, "float32"), ("auto", True, False, "float64"),
    ("auto", False, True, None)])
def test_what_is_asked_for_is_taken_on_any_processor(requested, float64, saved_model, policy):
    """float16 only when asked; bfloat16 when asked also where it is slow; --float64 over
    auto; a saved model's layers keep their types (no policy is set)."""
    choice = precision.choose(requested, float64, [hardware("amd_epyc_zen3")],
                              saved_model=saved_model)
    assert choice.policy == policy
    assert "auto" not in choice.reason


def test_in_bfloat16_a_shallow_3d_convolution_trains_on_its_right_filter_gradient(
        monkeypatch):
    """oneDNN's bfloat16 filter gradient of a `same` 3x3x3 convolution over a depth of 2 is
    wrong (to 1e37, inf: BENCHMARKS.md); under apply(bfloat16) Keras' Conv3D computes that
    one in float32 and the gradient is float64's to bfloat16's rounding, while a deeper input
    stays in bfloat16."""
    import keras
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    # the patch and the policy are this process's: undone after the test
    monkeypatch.setattr(keras.layers.Conv3D, "convolution_op",
                        keras.layers.Conv3D.convolution_op)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        precision.apply(precision.Choice("mixed_bfloat16", "test"))
        # bfloat16's bound: oneDNN sums in float32 (0.3% off on the Zen 5); TensorFlow's Eigen
        # kernel, on CPUs without AVX-512, sums in bfloat16 (2.7% on the Zen 3)
        for depth, computed_in, bound in ((2, tf.float32, 0.02), (6, tf.bfloat16, 0.05)):
            inputs = rng.standard_normal((2, depth, 4, 4, 32))
            inputs = tf.cast(tf.cast(inputs, tf.bfloat16), tf.float32)  # bfloat16's values
            gradients, convolution_types = {}, {}
            for policy in ("float64", "mixed_bfloat16"):
                layer = keras.layers.Conv3D(32, 3, padding="same", dtype=policy)
                layer.build(inputs.shape)

                @tf.function
                def gradient(inputs):
                    with tf.GradientTape() as tape:
                        loss = tf.reduce_sum(tf.cast(layer(inputs), tf.float64) ** 2 / 2)
                    return tape.gradient(loss, layer.kernel)
                layer.kernel.assign(tf.ones_like(layer.kernel) / 100)
                gradients[policy] = gradient(inputs).numpy()
                graph = gradient.get_concrete_function(inputs).graph.as_graph_def()
                convolution_types[policy] = {tf.dtypes.as_dtype(node.attr["T"].type)
                                             for node in graph.node if node.op == "Conv3D"}
            exact = gradients["float64"]
            error = np.abs(gradients["mixed_bfloat16"] - exact).max() / np.abs(exact).max()
            assert error < bound, (depth, error)
            assert convolution_types["mixed_bfloat16"] == {computed_in}, depth
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


@pytest.mark.distributed
def test_the_choice_is_printed_once_and_recorded_with_its_reason(tmp_path):
    """Two processes on this machine compute in what its processor computes natively (which
    kind of machine this is decides which), printed once by rank 0 and in results.json."""
    result = run([*mpirun(2), *train_command(
        "--flagfile=configs/digits_cnn.cfg", "--epochs=1", "--warmup_epochs=0",
        "--steps_per_epoch=2", f"--model_dir={tmp_path}")])
    native, why = precision.computes_bfloat16(precision.this_process())
    expected = "mixed_bfloat16" if native else "float32"
    lines = [line for line in result.stdout.splitlines() if "computing in" in line]
    assert lines == [f"app.train: computing in {expected}: auto: {why}"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["precision"] == expected and results["precision_reason"] == f"auto: {why}"


# experiment: (a short run of it, its headline, how far below float32's bfloat16 may end,
# what float32 reaches at least: that it learned). Measured on the Zen 5 (2026-12-07):
# Fashion-MNIST 0.839 float32, 0.847 bfloat16; faults IoU 0.460 and 0.472.
PARITY = {
    "fashion_mnist_cnn": (["--flagfile=configs/fashion_mnist_cnn.cfg", "--epochs=2",
                           "--warmup_epochs=1", "--steps_per_epoch=150"],
                          "val_accuracy", 0.02, 0.8),
    "seismic_faults_cpu": (["--flagfile=configs/seismic_faults_cpu.cfg", "--volume_size=24",
                            "--patch_size=16", "--num_volumes=16", "--global_batch_size=4",
                            "--epochs=10", "--steps_per_epoch=12", "--warmup_epochs=1"],
                           "val_iou", 0.03, 0.4)}


@pytest.mark.parametrize("experiment", PARITY)
def test_bfloat16_ends_within_a_margin_of_float32_on_the_same_seeds(experiment, tmp_path):
    """The Fashion-MNIST CNN's accuracy on the 10,000 test images and the 3D U-Net's fault
    IoU, after the same steps from the same initial weights and batches, where bfloat16 is
    the default: on a CPU without bfloat16 arithmetic `auto` takes float32, and bfloat16,
    converted to float32 to compute and summed in bfloat16 there, is 5-10x slower (6 minutes of
    a test worker on the Zen 3) and not what a run there computes in."""
    native, reason = precision.computes_bfloat16(precision.this_process())
    if not native:
        pytest.skip(f"bfloat16 is not this machine's default: {reason}")
    flags, metric, margin, learned = PARITY[experiment]
    precisions = ("float32", "bfloat16")
    run_concurrently(lambda name: run(train_command(
        *flags, "--deterministic", f"--mixed_precision={name}",
        f"--model_dir={tmp_path / name}")), precisions)
    results = {name: json.loads((tmp_path / name / "results.json").read_text())
               for name in precisions}
    assert results["bfloat16"]["precision"] == "mixed_bfloat16"
    found = {name: results[name]["final_metrics"][metric] for name in precisions}
    assert found["float32"] > learned
    assert found["bfloat16"] > found["float32"] - margin, found
