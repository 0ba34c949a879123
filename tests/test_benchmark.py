"""Benchmark mode, the timeline and the scaling study: the tools run, and every number they
report is computed from the measured steps (no timing is asserted: this machine is noisy)."""
import csv
import json
import os

import numpy as np
import pytest

from app import callbacks
from app.results import throughput_summary
from conftest import PYTHON, mpirun, run, train_command


def test_throughput_counts_only_steps_after_warmup_and_within_epochs(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 1.7, 1.9,   # epoch 0: 5 step ends
                  10.0, 10.25, 10.5])         # epoch 1: 3 step ends after validation
    cpu_clock = iter([0.0, 2.0, 3.0, 3.4, 3.8,  # the process's CPU seconds, two cores busy
                      20.0, 20.5, 21.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(callbacks.time, "process_time", lambda: next(cpu_clock))
    meter = callbacks.Throughput(batch_size=8, world_size=2, warmup_steps=2)
    logs = [{}, {}]
    for epoch, steps in ((0, 5), (1, 3)):
        meter.on_epoch_begin(epoch)
        for step in range(steps):
            meter.on_train_batch_end(step)
        meter.on_epoch_end(epoch, logs[epoch])
    # Steps 0 and 1 warm up; steps 2-4 take 0.5, 0.2, 0.2 s; epoch 1's first step end only
    # starts the clock again (validation came between), then 0.25 and 0.25 s.
    np.testing.assert_allclose(meter.step_seconds, [0.5, 0.2, 0.2, 0.25, 0.25])
    assert meter.images_per_sec() == pytest.approx(8 * 5 / 1.4)
    assert logs[0]["images_per_sec"] == pytest.approx(2 * 8 * 3 / 0.9)
    assert logs[1]["images_per_sec"] == pytest.approx(2 * 8 * 2 / 0.5)
    assert meter.window_rates().size == 0  # fewer than WINDOW steps
    assert meter.cpu_seconds_per_image() == pytest.approx(2.8 / (8 * 5))  # the same steps


def test_throughput_shares_an_execution_time_among_its_steps(monkeypatch):
    """With steps_per_execution=4 Keras reports steps 3, 7, 11, 15: one call per 4 steps."""
    clock = iter([0.0, 1.0, 1.4, 2.2])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    meter = callbacks.Throughput(batch_size=8, world_size=1, warmup_steps=4)
    logs = {}
    meter.on_epoch_begin(0)
    for last_step in (3, 7, 11, 15):
        meter.on_train_batch_end(last_step)
    meter.on_epoch_end(0, logs)
    # Steps 0-3 warm up and start the clock; 4-7 took 1.0 s, 8-11 0.4 s, 12-15 0.8 s.
    np.testing.assert_allclose(meter.step_seconds, [0.25] * 4 + [0.1] * 4 + [0.2] * 4)
    assert logs["images_per_sec"] == pytest.approx(8 * 12 / 2.2)


def test_throughput_summary_sums_ranks_and_spreads_over_windows():
    summary = throughput_summary([100.0, 110.0], [[90.0, 110.0], [100.0, 120.0]],
                                 [0.002, 0.004])
    assert summary["images_per_sec"] == 210.0
    assert summary["cpu_ms_per_image"] == pytest.approx(3.0)  # CPU of both / images of both
    assert summary["images_per_sec_per_process"] == 105.0
    assert summary["images_per_sec_spread"] == pytest.approx(np.std([190.0, 230.0]))
    assert summary["images_per_sec_by_rank"] == [100.0, 110.0]


@pytest.mark.distributed
def test_benchmark_mode_on_two_processes_reports_every_rank_and_writes_a_timeline(tmp_path):
    result = run([*mpirun(2), *train_command(
        "--flagfile=configs/digits_cnn.cfg", "--benchmark", "--timeline", "--epochs=1",
        "--warmup_epochs=0", "--steps_per_epoch=25", "--warmup_steps=5",
        f"--model_dir={tmp_path}")])
    results = json.loads((tmp_path / "results.json").read_text())
    by_rank = results["images_per_sec_by_rank"]
    assert len(by_rank) == 2 and min(by_rank) > 0
    assert results["images_per_sec"] == pytest.approx(sum(by_rank))
    assert results["images_per_sec_per_process"] == pytest.approx(sum(by_rank) / 2)
    assert results["images_per_sec_spread"] >= 0 and results["val_loss"] is None
    # At most every core busy (twice that: the ranks' clocks are read at slightly other times)
    assert 0 < results["cpu_ms_per_image"] < 2 * 1000 * os.cpu_count() / results["images_per_sec"]
    assert json.loads(result.stdout.strip().splitlines()[-1])["images_per_sec"] == \
        pytest.approx(results["images_per_sec"])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()
    events = (tmp_path / "timeline.json").read_text()
    assert '"HorovodAllreduce' in events or "ALLREDUCE" in events


def test_the_scaling_studys_runs_take_the_first_slots_of_the_hosts():
    from app.studies.throughput_scaling import first_slots
    assert first_slots("node1:2,node2:2", 1) == "node1:1"
    assert first_slots("node1:2,node2:2", 3) == "node1:2,node2:1"
    assert first_slots("node1,node2,node3", 2) == "node1:1,node2:1"
    assert first_slots("node1:2,node2:2", 4) == "node1:2,node2:2"


@pytest.mark.distributed
def test_scaling_study_tables_what_its_runs_measured(tmp_path):
    run([PYTHON, "-m", "app.studies.throughput_scaling", "-N", "2", "--repeats=1",
         "--flagfile=configs/digits_cnn.cfg", "--steps_per_epoch=25", "--warmup_steps=5",
         f"--out_dir={tmp_path}"])
    with open(tmp_path / "scaling.csv") as table:
        rows = list(csv.DictReader(table))
    assert [row["kind"] for row in rows] == [
        "reference", "weak", "weak", "strong", "strong", "threads", "tf.distribute",
        "independent"]
    measured = {"run1-weak-np1-r0": rows[1], "run2-weak-np2-r0": rows[2],
                "run3-strong-np1-r0": rows[3]}
    for name, row in measured.items():
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert float(row["images_per_sec"]) == pytest.approx(results["images_per_sec"])
        assert float(row["cpu_ms_per_image"]) == pytest.approx(results["cpu_ms_per_image"])
        assert int(row["global_batch"]) == results["global_batch_size"]
    mwms = [json.loads((tmp_path / "run5-tf.distribute-np2-r0" / f"reference-{rank}.json")
                       .read_text())
            for rank in (0, 1)]
    assert {r["strategy"] for r in mwms} == {"multi_worker_mirrored"}
    assert float(rows[6]["images_per_sec"]) == pytest.approx(
        sum(r["images_per_sec"] for r in mwms))
    copies = [json.loads((tmp_path / "run6-independent-np2-r0" / f"copy-{index}" /
                          "reference-0.json").read_text()) for index in (0, 1)]
    assert {(r["strategy"], r["world_size"]) for r in copies} == {("none", 1)}
    assert float(rows[7]["images_per_sec"]) == pytest.approx(
        sum(r["images_per_sec"] for r in copies))
    weak_speedup = float(rows[2]["images_per_sec"]) / float(rows[1]["images_per_sec"])
    assert float(rows[2]["speedup"]) == pytest.approx(weak_speedup)
    markdown = (tmp_path / "scaling.md").read_text()
    assert f"Horovod np=2 / np=1: {weak_speedup:.2f}x" in markdown
    communication = float(rows[2]["images_per_sec"]) / float(rows[7]["images_per_sec"])
    assert f"Horovod np=2 / 2 independent processes: {communication:.2f}x" in markdown
    cpu_ratio = float(rows[7]["cpu_ms_per_image"]) / float(rows[2]["cpu_ms_per_image"])
    assert (f"CPU time per image, 2 independent processes / Horovod np=2: {cpu_ratio:.2f}x"
            in markdown)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "scaling.png") > 10_000


@pytest.mark.distributed  # the training run it compares with goes through app.launch (mpirun)
def test_pipeline_check_compares_measured_rates(tmp_path):
    run([PYTHON, "-m", "app.studies.pipeline_check", "--flagfile=configs/digits_cnn.cfg",
         "--steps_per_epoch=30", "--warmup_steps=5", f"--model_dir={tmp_path}"])
    found = json.loads((tmp_path / "pipeline_check.json").read_text())
    assert min(found.values()) > 0
    assert found["pipeline_over_training"] == pytest.approx(
        found["pipeline_images_per_sec"] / found["training_images_per_sec"])
    assert found["tfrecord_over_raw_read"] == pytest.approx(
        found["tfrecord_read_bytes_per_sec"] / found["raw_file_read_bytes_per_sec"])
    trained = json.loads((tmp_path / "train_benchmark" / "results.json").read_text())
    assert found["training_images_per_sec"] == pytest.approx(trained["images_per_sec"])
    assert len(list((tmp_path / "tfrecords").glob("train-*-of-00004"))) == 4


def test_imagenet_pipeline_benchmark_tables_its_own_measurements(tmp_path):
    """The JPEG preprocessing benchmark writes its shards, measures every path, and its
    table's ratios are computed from the rates it measured."""
    run([PYTHON, "-m", "app.studies.imagenet_pipeline", "--num_images=8", "--repeats=1",
         "--image_size=32", f"--out_dir={tmp_path}"])
    found = json.loads((tmp_path / "imagenet_pipeline.json").read_text())["rows"]
    assert [row["path"].split(":")[0] for row in found] == [
        "decode only (the ceiling)", "training", "evaluation", "before"]
    ceiling = found[0]
    for row in found:
        assert row["images_per_sec"] > 0 and row["cpu_ms_per_image"] > 0
        assert row["of_decode_only"] == pytest.approx(
            row["images_per_sec"] / ceiling["images_per_sec"])
    with open(tmp_path / "imagenet_pipeline.csv") as table:
        rows = list(csv.DictReader(table))
    assert [float(row["images_per_sec"]) for row in rows] == pytest.approx(
        [row["images_per_sec"] for row in found])
    assert len(list((tmp_path / "shards").glob("train-*-of-00004"))) == 4


CPUINFO = "processor\t: {index}\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu sse sse2 {flags}\n\n"


@pytest.mark.parametrize("flags, float32, bfloat16, unit", [
    ("avx2 fma avx512f avx512_bf16 amx_tile amx_bf16", 64, 1024, "amx_bf16"),
    ("avx2 fma avx512f avx512_bf16", 64, 128, "avx512_bf16"),
    ("avx2 fma avx512f", 64, 64, "avx512f"),
    ("avx2 fma", 32, 32, "avx2"),
    ("", 8, 8, "sse")])
def test_the_peak_follows_the_cpus_vector_units(flags, float32, bfloat16, unit):
    from app.studies import roofline
    cpuinfo = "".join(CPUINFO.format(index=index, flags=flags) for index in range(2))
    peaks, found = roofline.cpu_peak(cpuinfo, cores=2)
    assert found == unit
    assert peaks == {"float32": 2 * 2e9 * float32, "bfloat16": 2 * 2e9 * bfloat16}


def test_the_flops_of_a_model_are_counted_from_its_layers():
    """A dense layer of 10 -> 5 is 50 multiply-adds and 5 bias additions; ResNet-50 at 224x224
    is the published 4.1 billion multiply-adds."""
    from app.horovod import keras
    import models
    from app.studies import roofline
    dense = keras.Sequential([keras.Input([10]), keras.layers.Dense(5)])
    assert models.forward_flops(dense, [10]) == 2 * 10 * 5 + 5
    assert roofline.training_flops_per_example("resnet50", 224) == pytest.approx(
        3 * 2 * 4.1e9, rel=0.01)


@pytest.mark.distributed  # its runs go through app.launch (mpirun -np 1)
def test_roofline_study_tables_what_its_runs_measured(tmp_path):
    from app.studies import roofline
    run([PYTHON, "-m", "app.studies.roofline", "--runs=cnn:8:32", "--precisions=float32,bfloat16",
         "--steps=6", "--warmup_steps=2", f"--out_dir={tmp_path}"])
    found = json.loads((tmp_path / "roofline.json").read_text())
    assert [row["precision"] for row in found["rows"]] == ["float32", "mixed_bfloat16"]
    for row, precision in zip(found["rows"], ("float32", "bfloat16")):
        results = json.loads((tmp_path / f"cnn-8-32-{precision}" / "results.json").read_text())
        assert row["images_per_sec"] == pytest.approx(results["images_per_sec"])
        assert row["achieved_gflops"] == pytest.approx(
            row["images_per_sec"] * row["gflop_per_image"])
        assert 0 < row["of_peak"] == pytest.approx(row["achieved_gflops"] / row["peak_gflops"])
        assert row["of_peak"] < 1  # a run faster than the processor's peak is a counting error
        # what the kernels delivered in this precision, measured, beside the nominal peak
        kernels = found["kernel_gflops"][precision]
        assert set(kernels) == set(roofline.KERNELS) and min(kernels.values()) > 0
        assert row["kernel_gflops"] == max(kernels.values())
        assert row["of_kernels"] == pytest.approx(row["achieved_gflops"] / row["kernel_gflops"])
    table = (tmp_path / "roofline.md").read_text()
    assert "| cnn | 8x8 | 32 | mixed_bfloat16 |" in table
    assert "Kernels, GFLOP/s on " in table and "matmul 2048x2048: float32 " in table


@pytest.mark.parametrize("op_type, op_name, kind", [
    ("_MklNativeConv2DBackpropFilterWithBias",
     "StatefulPartitionedCall/gradient_tape/cnn_1/conv2d_1_2/convolution/Conv2DBackpropFilter",
     "convolutions and matrix products"),
    ("_MklNativeFusedMatMul", "StatefulPartitionedCall/cnn_1/dense_1/Relu",
     "convolutions and matrix products"),
    ("Cast", "StatefulPartitionedCall/cnn_1/dense_1/Cast/Cast", "casts"),
    ("_MklNativeFusedBatchNormGradV3", "StatefulPartitionedCall/gradient_tape/resnet20_1/"
     "batch_normalization_1/FusedBatchNormGradV3", "batch norm"),
    ("ResourceApplyKerasMomentum", "StatefulPartitionedCall/momentum_sgd/"
     "ResourceApplyKerasMomentum_4", "optimizer update"),
    ("Sqrt", "StatefulPartitionedCall/adam/Sqrt_9", "optimizer update"),
    ("AssignSubVariableOp", "StatefulPartitionedCall/adam/AssignSubVariableOp_4",
     "optimizer update"),
    ("", "StatefulPartitionedCall/PartitionedCall/DistributedAdam_Allreduce/cond_4/then/_92/"
     "DistributedAdam_Allreduce/cond_4/HorovodAllreduce_grads_4_0", "Horovod"),
    ("Dataset", "Iterator::Root::Prefetch::MapAndBatch", "input pipeline"),
    ("ReluGrad", "StatefulPartitionedCall/gradient_tape/cnn_1/conv2d_1/ReluGrad",
     "element-wise and the rest")])
def test_each_op_of_a_trace_counts_to_its_kind(op_type, op_name, kind):
    """Op types and names as TensorFlow's profiler recorded them in app.train's steps (on
    two processes with Adam, the last but one: Horovod's asynchronous op has no type)."""
    from app.studies import step_profile
    assert step_profile.kind_of(op_type, op_name) == kind


@pytest.mark.distributed  # its runs go through app.launch (mpirun -np 1)
def test_the_step_profile_study_tables_where_each_precisions_step_goes(tmp_path):
    """The digits CNN in float32 and bfloat16: each kind's milliseconds per step from the
    trace (the convolutions and the optimizer's update in both, casts only where the layers
    compute in bfloat16 from float32 weights), the untraced step times, their ratio."""
    from app.studies import step_profile
    run([PYTHON, "-m", "app.studies.step_profile", "--runs=cnn:8:32",
         "--precisions=float32,bfloat16", "--steps=6", "--warmup_steps=2",
         "--profiled_steps=2", "--rounds=1", f"--out_dir={tmp_path}"])
    rows = json.loads((tmp_path / "step_profile.json").read_text())["rows"]
    assert [row["precision"] for row in rows] == ["float32", "mixed_bfloat16"]
    for row in rows:
        assert row["convolutions and matrix products ms"] > 0
        assert row["optimizer update ms"] > 0 and row["Horovod ms"] == 0  # one process
        assert row["step_ms_min"] == row["step_ms"] == row["step_ms_max"] > 0
        results = json.loads((tmp_path / f"cnn-8-32-{row['precision'].split('_')[-1]}-plain-"
                                          f"round0" / "results.json").read_text())
        assert row["step_ms"] == pytest.approx(1000 * 32 / results["images_per_sec"])
        assert {f"{kind} ms" for kind, _, _ in step_profile.KINDS} <= set(row)
    assert rows[1]["casts ms"] > rows[0]["casts ms"]
    assert rows[1]["speedup"] == pytest.approx(rows[0]["step_ms"] / rows[1]["step_ms"])


def test_the_keras_reference_computes_in_the_precision_it_is_given(tmp_path):
    """The scaling study's non-Horovod runs take --mixed_precision as app.train does, so that
    both sides of its ratios compute alike."""
    run([PYTHON, "-m", "app.studies.keras_reference", "--flagfile=configs/digits_cnn.cfg",
         "--epochs=1", "--warmup_epochs=0", "--steps_per_epoch=6", "--warmup_steps=2",
         "--mixed_precision=bfloat16", f"--model_dir={tmp_path}"])
    found = json.loads((tmp_path / "reference-0.json").read_text())
    assert found["precision"] == "mixed_bfloat16" and found["images_per_sec"] > 0


@pytest.mark.distributed  # its runs go through app.launch (mpirun -np 1)
def test_conv3d_flops_are_counted_and_the_roofline_trains_a_unet_on_surveys(tmp_path):
    """A 3x3x3 convolution of c to k channels on an n^3 volume: 2 * 27 * c * k FLOPs per
    voxel and k for the bias; the roofline study's U-Net run measures patches/s."""
    import keras

    import models
    from app.studies import roofline
    conv = keras.Sequential([keras.Input((4, 4, 4, 2)),
                             keras.layers.Conv3D(3, 3, padding="same")])
    assert models.forward_flops(conv, (4, 4, 4, 2)) == 4 ** 3 * (2 * 27 * 2 * 3 + 3)
    flops = roofline.training_flops_per_example("unet3d_small", 8)
    assert flops > 3 * 8 ** 3 * 2 * 27 * 8  # at least its first convolution's, three times
    run([PYTHON, "-m", "app.studies.roofline", "--runs=unet3d_small:8:2",
         "--precisions=float32", "--steps=4", "--warmup_steps=1", f"--out_dir={tmp_path}"])
    row = json.loads((tmp_path / "roofline.json").read_text())["rows"][0]
    assert row["gflop_per_image"] == pytest.approx(flops / 1e9) and 0 < row["of_peak"] < 1
    results = json.loads((tmp_path / "unet3d_small-8-2-float32" / "results.json").read_text())
    assert results["voxels_per_sec"] == pytest.approx(results["images_per_sec"] * 8 ** 3)


@pytest.mark.distributed  # its runs go through app.launch (mpirun -np 1)
def test_the_survey_study_tables_the_generator_against_training(tmp_path):
    run([PYTHON, "-m", "app.studies.survey_throughput", "--sizes=8", "--steps=3",
         "--warmup_steps=1", "--repeats=1", f"--out_dir={tmp_path}"])
    row = json.loads((tmp_path / "survey_throughput.json").read_text())["rows"][0]
    trained = json.loads((tmp_path / "unet3d_small-8-0" / "results.json").read_text())
    assert row["trained_per_sec"] == pytest.approx(trained["images_per_sec"])
    assert row["ratio"] == pytest.approx(row["generated_per_sec"] / row["trained_per_sec"])
    assert "| 8^3 |" in (tmp_path / "survey_throughput.md").read_text()
