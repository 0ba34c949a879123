"""Pipeline parallelism (app.parallel.pipeline): stages on ranks, microbatches, hybrid with
Horovod's data parallelism, recomputation; the same weights as one process."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import INTEGRITY_FLAGS, PYTHON, error_lines, horovodrun, mpirun, run
from conftest import read_log, run_concurrently, run_study, train_command
from test_fault_tolerance import signalled_beside_uninterrupted
from test_train import checkpoint_values, per_step_learning_rates

from app.parallel import pipeline, pipeline_plan
from app.horovod import tf
import models

BFLOAT16 = ["--nofloat64", "--mixed_precision=bfloat16", "--threads_per_process=1"]
EPOCHS = 8  # of one step: digits_cnn's 2 of warmup, then its cosine
RUN_FLAGS = [*INTEGRITY_FLAGS, f"--epochs={EPOCHS}"]  # the integrity test's (conftest), shorter
RUNS = {  # name: (processes, flags), each after RUN_FLAGS
    "mlp-np1": (1, ["--model=mlp"]),
    "mlp-stages2": (2, ["--model=mlp", "--pipeline_stages=2", "--microbatches=4",
                        "--pipeline_schedule=gpipe"]),  # the others: 1F1B
    "cnn-np1": (1, ["--model=cnn"]),
    # recomputing, and each stage's 2 replicas shard that stage's momentum
    # (app.parallel.sharded_optimizer)
    "cnn-stages2x2-recompute-sharded": (4, ["--model=cnn", "--pipeline_stages=2",
                                            "--microbatches=2", "--recompute",
                                            "--shard_optimizer_state"]),
    # batch norm normalizes each microbatch: the one process splits its batch alike
    "resnet-np1-microbatches2": (1, ["--model=resnet20", "--microbatches=2"]),
    "resnet-stages2": (2, ["--model=resnet20", "--pipeline_stages=2", "--microbatches=2"]),
    # mixed bfloat16: each stage computes on one thread, and so does the one process
    "resnet-np1-bf16": (1, ["--model=resnet20", "--microbatches=2", *BFLOAT16]),
    "resnet-stages2-bf16": (2, ["--model=resnet20", "--pipeline_stages=2", "--microbatches=2",
                                *BFLOAT16]),
}


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """Each RUNS entry's model_dir after its run."""
    def run_case(name):
        processes, flags = RUNS[name]
        model_dir = tmp_path_factory.mktemp(name)
        command = train_command(*RUN_FLAGS, *flags, f"--model_dir={model_dir}")
        run([*mpirun(processes), *command] if processes > 1 else command)
        return model_dir
    return dict(zip(RUNS, run_concurrently(run_case, list(RUNS))))


def stage_values(model_dir, epoch, stage):
    return checkpoint_values(model_dir, epoch, "model/", f"checkpoints/stage-{stage}")


def by_layer(values, first=0):
    """{"layer-K/...": value}: a model's weights by the order of their layers, the first
    numbered `first` (a functional model numbers every operation, its input included)."""
    operations = sorted({int(re.match(r"model/_operations/(\d+)/", name).group(1))
                         for name in values})
    return {re.sub(r"model/_operations/(\d+)/",
                   lambda found: f"layer-{first + operations.index(int(found.group(1)))}/",
                   name): value for name, value in values.items()}


def whole_model_values(model_dir, epoch, stages):
    """The stages' checkpoints as one model's: each stage's layers with weights numbered
    after those of the stages before it."""
    merged = {}
    for stage in range(stages):
        merged.update(by_layer(stage_values(model_dir, epoch, stage),
                               len({name.split("/")[0] for name in merged})))
    return merged


@pytest.mark.distributed
@pytest.mark.parametrize("one, pipelined, stages", [
    ("mlp-np1", "mlp-stages2", 2),
    ("cnn-np1", "cnn-stages2x2-recompute-sharded", 2),
    ("resnet-np1-microbatches2", "resnet-stages2", 2),
])
def test_pipelined_runs_end_with_the_weights_of_one_process(pipeline_runs, one, pipelined,
                                                            stages):
    """S=2 on 2 processes (MLP in GPipe's order, ResNet-20 cut between residual blocks in
    1F1B's), S=2 x 2 replicas on 4 (CNN, recomputing, 1F1B, each stage's momentum sharded
    over its replicas and gathered into the stage's checkpoint): the stages' weights and
    momentum (and batch norm's statistics), put together, are one process's to 1e-10 after
    the EPOCHS steps, every step at the same LR; each stage holds only its own part of the
    model. In float64, as the integrity test: in float32 the sums' order alone parts such
    runs by 1e-4 on some CPUs (BENCHMARKS.md)."""
    reference = by_layer(checkpoint_values(pipeline_runs[one], EPOCHS, "model/"))
    merged = whole_model_values(pipeline_runs[pipelined], EPOCHS, stages)
    assert merged.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(merged[name], reference[name], rtol=0, atol=1e-10,
                                   err_msg=name)
    parts = [len(stage_values(pipeline_runs[pipelined], EPOCHS, stage))
             for stage in range(stages)]
    assert sum(parts) == len(reference) and min(parts) > 0
    assert per_step_learning_rates(pipeline_runs[pipelined]) == \
        per_step_learning_rates(pipeline_runs[one])
    moved = by_layer(checkpoint_values(pipeline_runs[one], EPOCHS - 2, "model/"))
    assert max(np.abs(reference[name] - moved[name]).max() for name in reference) > 1e-3


@pytest.mark.distributed
def test_a_long_staged_run_stays_at_one_processs_rounding(tmp_path):
    """32 steps of the CNN in 2 stages against one process, in float64 (the integrity flags,
    warmup then cosine over 32 epochs of one step): every epoch's validation loss agrees to
    1e-12 and the weights to 1e-12. Before the last stage took its loss in the function of
    its forward pass, Keras computed the cross-entropy from the softmax's probabilities
    there (from its logits in one process's step), and the two drifted apart to 8.5e-8 after
    22 steps and 1.3e-5 after 88 (BENCHMARKS.md)."""
    def run_case(case):
        processes, flags = case
        model_dir = tmp_path / str(processes)
        command = train_command(*INTEGRITY_FLAGS, "--model=cnn", "--epochs=32", *flags,
                                f"--model_dir={model_dir}")
        run([*mpirun(processes), *command] if processes > 1 else command)
        return model_dir
    one, staged = run_concurrently(run_case, [(1, []), (2, ["--pipeline_stages=2"])])
    logs = [read_log(model_dir) for model_dir in (one, staged)]
    assert len(logs[0]) == len(logs[1]) == 32
    for reference, found in zip(*logs):
        assert float(found["val_loss"]) == pytest.approx(float(reference["val_loss"]),
                                                         rel=1e-12, abs=0)
    reference = by_layer(checkpoint_values(one, 32, "model/"))
    merged = whole_model_values(staged, 32, 2)
    for name in reference:
        np.testing.assert_allclose(merged[name], reference[name], rtol=0, atol=1e-12,
                                   err_msg=name)


@pytest.mark.distributed
def test_a_bfloat16_pipeline_computes_the_bits_of_one_process(pipeline_runs):
    """Mixed bfloat16 across stages (activations and their gradients sent as bfloat16): the
    ResNet-20 cut in 2 ends with exactly the weights of one process on one thread, and not
    with those of the float64 runs."""
    reference = by_layer(checkpoint_values(pipeline_runs["resnet-np1-bf16"], EPOCHS, "model/"))
    merged = whole_model_values(pipeline_runs["resnet-stages2-bf16"], EPOCHS, 2)
    assert merged.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(merged[name], reference[name], err_msg=name)
    in_float64 = by_layer(checkpoint_values(pipeline_runs["resnet-np1-microbatches2"], EPOCHS,
                                            "model/"))
    assert max(np.abs(reference[name] - in_float64[name]).max() for name in reference) > 1e-3
    with open(pipeline_runs["resnet-stages2-bf16"] / "results.json") as results:
        assert json.load(results)["precision"] == "mixed_bfloat16"


def test_stages_are_cut_where_the_largest_holds_the_least():
    assert pipeline_plan.balance([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert pipeline_plan.balance([1, 1, 1, 100], 2) == [(0, 3), (3, 4)]
    assert pipeline_plan.balance([5, 1, 1, 1, 5], 3) == [(0, 1), (1, 4), (4, 5)]
    assert pipeline_plan.balance([3, 3, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    blocks = models.blocks_of("mlp", (8, 8, 1), 10)
    assert [block.parameters for block in blocks] == [64 * 256 + 256, 256 * 128 + 128,
                                                      128 * 10 + 10]
    assert [block.input_shape for block in blocks] == [(8, 8, 1), (256,), (128,)]
    # a dense layer's multiply-adds and bias additions (and the flatten, ReLU and softmax)
    assert blocks[1].flops >= 2 * 256 * 128 + 128 and blocks[1].flops < 1.1 * (2 * 256 * 128)


def test_resnet_stages_balanced_by_flops_share_the_compute_and_by_parameters_the_weights():
    """ResNet-20's blocks cost alike in FLOPs (channels double where the image halves) while
    their parameters grow 4x from one group to the next: cut by parameters, the first of 2
    stages would do three quarters of the compute."""
    blocks = models.blocks_of("resnet20", (32, 32, 3), 10)

    def shares(balance_by, of):
        cuts = pipeline_plan.cut(blocks, 2, balance_by)
        total = sum(getattr(block, of) for block in blocks)
        return [sum(getattr(block, of) for block in blocks[first:last]) / total
                for first, last in cuts]
    assert max(shares("flops", "flops")) < 0.6
    assert max(shares("parameters", "parameters")) < 0.6
    assert shares("parameters", "flops")[0] > 0.7


def run_schedules(kind, stages, microbatches):
    """Steps every stage's passes as far as its messages allow (a forward needs the stage
    before's, a backward the stage after's); returns (whether every pass ran, the most
    microbatches any stage held between its forward and backward passes)."""
    orders = [list(pipeline_plan.schedule(kind, pipeline_plan.position(stage, stages, stages),
                                     microbatches)) for stage in range(stages)]
    done, held, most = set(), [set() for _ in range(stages)], 0
    progress = True
    while progress:
        progress = False
        for stage, order in enumerate(orders):
            while order:
                direction, index = order[0]
                needs = ((direction, stage - 1, index) if direction == "forward" and stage
                         else ("backward", stage + 1, index) if direction == "backward"
                         and stage < stages - 1 else None)
                if needs and needs not in done:
                    break
                order.pop(0)
                done.add((direction, stage, index))
                (held[stage].add if direction == "forward" else held[stage].remove)(index)
                most, progress = max(most, len(held[stage])), True
    return not any(orders), most


@pytest.mark.parametrize("stages, microbatches", [(2, 4), (4, 8), (4, 2), (3, 3), (1, 4)])
def test_both_schedules_run_every_pass_once_without_deadlock_and_1f1b_holds_fewer(
        stages, microbatches):
    for kind in pipeline_plan.SCHEDULES:
        for stage in range(stages):
            order = pipeline_plan.schedule(kind, pipeline_plan.position(stage, stages, stages),
                                      microbatches)
            assert sorted(order) == sorted((direction, index) for index in range(microbatches)
                                           for direction in ("forward", "backward"))
            assert all(order.index(("forward", i)) < order.index(("backward", i))
                       for i in range(microbatches))
    assert run_schedules("gpipe", stages, microbatches) == (True, microbatches)
    assert run_schedules("1f1b", stages, microbatches) == (True, min(stages, microbatches))


def test_ranks_are_laid_out_pipeline_by_pipeline():
    assert [tuple(pipeline_plan.position(rank, 4, 2)[:3]) for rank in range(4)] == [
        (0, 2, 0), (1, 2, 0), (0, 2, 1), (1, 2, 1)]
    assert pipeline_plan.stage_ranks(1, 2, 6) == [1, 3, 5]


def test_recomputation_gives_the_plain_gradients():
    """A ResNet stage with batch norm (the case tf.recompute_grad gets wrong when it cannot
    see the variables): the gradients with recomputation are the plain ones."""
    images = tf.random.stateless_normal([4, 8, 8, 16], seed=[1, 2])
    stage_model = models.build("resnet20", (8, 8, 1), 10, seed=3, first_block=1, last_block=4)
    gradients = []
    for recompute in (False, True):
        stage = pipeline.PipelinedStage(stage_model, pipeline_plan.position(0, 1, 1),
                                        pipeline.OneStage(), None, 1, 10, recompute)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(stage.forward(images) ** 2)
        gradients.append(tape.gradient(loss, stage_model.trainable_variables))
    assert len(gradients[1]) == len(stage_model.trainable_variables) > 0
    for plain, recomputed in zip(*gradients):
        assert recomputed is not None
        np.testing.assert_allclose(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_a_pipeline_that_cannot_run_stops_every_rank_with_one_line(tmp_path):
    cases = [
        (mpirun(2), ["--model=linear", "--pipeline_stages=2"],
         "--pipeline_stages=2: --model=linear has 1 block (a pipeline cuts it only where one "
         "tensor passes), so at most 1 stage"),
        (horovodrun(2), ["--pipeline_stages=2"],
         "--pipeline_stages=2: needs MPI (mpirun, srun, horovodrun --mpi); this run uses Gloo"),
    ]

    def run_case(case):
        launcher, flags, _ = case
        model_dir = tmp_path / str(len(flags))
        return run([*launcher, *train_command("--flagfile=configs/digits_cnn.cfg", *flags,
                                              f"--model_dir={model_dir}")],
                   timeout=120, check=False), model_dir

    for (_, _, message), (result, model_dir) in zip(cases, run_concurrently(run_case, cases)):
        assert result.returncode != 0
        errors = error_lines(result)
        assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert not os.path.exists(model_dir)


def test_mpi4py_gives_the_thread_level_horovod_needs_beside_it():
    result = run([PYTHON, "-c", "from mpi4py import MPI; "
                                "print(MPI.Query_thread() == MPI.THREAD_MULTIPLE)"])
    assert result.stdout.strip() == "True"


@pytest.mark.distributed
def test_a_staged_checkpoint_converts_to_one_model_and_back_and_resumes(pipeline_runs,
                                                                         tmp_path):
    """app.convert_checkpoint: the MLP's 2 stages become one model's checkpoint (weights,
    momentum, step count and global batch, all as they were), which resumes on one process;
    one process's checkpoint becomes 2 stages."""
    whole, staged = tmp_path / "whole", tmp_path / "staged"
    run([PYTHON, "-m", "app.convert_checkpoint", f"--from_dir={pipeline_runs['mlp-stages2']}",
         f"--to_dir={whole}", "--to_stages=1"])
    converted = by_layer(checkpoint_values(whole, EPOCHS, "model/"))
    merged = whole_model_values(pipeline_runs["mlp-stages2"], EPOCHS, 2)
    assert converted.keys() == merged.keys()
    assert all(np.array_equal(converted[name], merged[name]) for name in merged)
    momentum = [checkpoint_values(model_dir, EPOCHS, "optimizer/_variables/", folder)
                for model_dir, folder in [(whole, "checkpoints"),
                                          *((pipeline_runs["mlp-stages2"],
                                             f"checkpoints/stage-{stage}") for stage in (0, 1))]]
    assert [value.shape for value in momentum[0].values()] == [
        value.shape for stage in momentum[1:] for value in stage.values()]
    assert all(np.array_equal(whole_value, stage_value) for whole_value, stage_value in zip(
        momentum[0].values(), [value for stage in momentum[1:] for value in stage.values()]))
    assert checkpoint_values(whole, EPOCHS, "optimizer/_iterations")[
        "optimizer/_iterations"] == EPOCHS
    assert checkpoint_values(whole, EPOCHS, "global_batch_size")["global_batch_size"] == 128
    assert "--pipeline_stages=1" in (whole / "flags.cfg").read_text().splitlines()

    run([PYTHON, "-m", "app.convert_checkpoint", f"--from_dir={pipeline_runs['mlp-np1']}",
         f"--to_dir={staged}", "--to_stages=2"])
    one = by_layer(checkpoint_values(pipeline_runs["mlp-np1"], EPOCHS, "model/"))
    split = whole_model_values(staged, EPOCHS, 2)
    assert split.keys() == one.keys() and all(np.array_equal(split[n], one[n]) for n in one)

    run(train_command(f"--flagfile={whole / 'flags.cfg'}", f"--epochs={EPOCHS + 1}"))
    assert (whole / "checkpoints" / f"epoch-{EPOCHS + 1}.index").exists()
    refused = run([PYTHON, "-m", "app.convert_checkpoint", f"--from_dir={tmp_path}",
                   f"--to_dir={tmp_path / 'other'}"], check=False)
    assert refused.returncode == 2
    assert error_lines(refused, "app.convert_checkpoint") == [
        f"app.convert_checkpoint: error: --from_dir={tmp_path}: no flags.cfg (not a model_dir "
        f"of app.train)"]


@pytest.mark.distributed
def test_a_staged_run_resumes_from_each_stages_last_epoch_as_if_uninterrupted(pipeline_runs,
                                                                             tmp_path):
    """The 2-stage MLP's run with its last 2 epochs' checkpoints removed: the same command
    resumes both stages at its epoch before last and ends with the uninterrupted run's
    weights."""
    resumed = tmp_path / "resumed"
    shutil.copytree(pipeline_runs["mlp-stages2"], resumed)
    for stage in (0, 1):
        for epoch in (EPOCHS - 1, EPOCHS):
            for path in (resumed / "checkpoints" / f"stage-{stage}").glob(f"epoch-{epoch}.*"):
                path.unlink()
    processes, flags = RUNS["mlp-stages2"]
    result = run([*mpirun(processes), *train_command(*RUN_FLAGS, *flags,
                                                     f"--model_dir={resumed}")])
    assert f"Epoch {EPOCHS - 1}/{EPOCHS}" in result.stdout
    assert f"Epoch {EPOCHS - 2}/{EPOCHS}" not in result.stdout
    for stage in (0, 1):
        final = stage_values(resumed, EPOCHS, stage)
        straight = stage_values(pipeline_runs["mlp-stages2"], EPOCHS, stage)
        assert final.keys() == straight.keys()
        for name in straight:
            np.testing.assert_array_equal(final[name], straight[name], err_msg=name)


@pytest.mark.distributed
def test_a_resume_that_would_cut_the_model_otherwise_stops_with_one_line(pipeline_runs,
                                                                         tmp_path):
    """The 2-stage ResNet-20 run records its cut (by FLOPs, the default) beside its
    checkpoints; resumed with --pipeline_balance=parameters, which cuts elsewhere, every
    rank stops with one line naming the record, before any checkpoint is touched (a stage
    restored into other blocks would train a different model, or wait forever for
    activations of another shape)."""
    run_dir = tmp_path / "resnet"
    shutil.copytree(pipeline_runs["resnet-stages2"], run_dir)
    record = json.loads((run_dir / "checkpoints" / pipeline_plan.CUT_RECORD).read_text())
    blocks = models.blocks_of("resnet20", (8, 8, 1), 10)
    assert record == {"model": "resnet20", "stages": [
        list(bounds) for bounds in pipeline_plan.cut(blocks, 2, "flops")]}
    assert pipeline_plan.cut(blocks, 2, "parameters") != pipeline_plan.cut(blocks, 2, "flops")
    for stage in (0, 1):
        for path in (run_dir / "checkpoints" / f"stage-{stage}").glob(f"epoch-{EPOCHS}.*"):
            path.unlink()
    before = sorted(path.name for path in (run_dir / "checkpoints").rglob("*"))
    processes, flags = RUNS["resnet-stages2"]
    result = run([*mpirun(processes), *train_command(
        *RUN_FLAGS, *flags, "--pipeline_balance=parameters", f"--model_dir={run_dir}")],
        timeout=120, check=False)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and pipeline_plan.CUT_RECORD in errors[0], result.stderr[-2000:]
    assert "--pipeline_balance" in errors[0] and "Epoch" not in result.stdout
    assert sorted(path.name for path in (run_dir / "checkpoints").rglob("*")) == before


@pytest.mark.distributed
def test_a_signal_stops_a_staged_run_mid_epoch_and_the_rerun_ends_as_if_uninterrupted(
        tmp_path):
    """SIGUSR1 to rank 1 (the last stage) in epoch 2 (or 3, when the loaded machine lets an
    epoch pass before the signal lands): every stage saves the same step, the job exits 75,
    and the same command resumes each stage there and ends with the uninterrupted run's
    weights (float64, to 1e-10)."""
    flags = ["--flagfile=configs/digits_cnn.cfg", "--model=mlp", "--pipeline_stages=2",
             "--microbatches=2", "--deterministic", "--float64", "--global_batch_size=128",
             "--steps_per_epoch=60", "--epochs=3", "--validation_steps=1"]
    command, straight, stopped, returncode, stderr = signalled_beside_uninterrupted(
        flags, tmp_path, 60, checkpoints="checkpoints/stage-1")
    assert returncode == 75, stderr[-3000:]
    saved = [sorted(path.name for path in (stopped / "checkpoints" / f"stage-{stage}").glob(
        "epoch-*-step-*.index")) for stage in (0, 1)]
    assert len(saved[0]) == 1 and saved[0] == saved[1], stderr[-3000:]
    epochs_done, steps_done = map(int, saved[0][0][len("epoch-"):-len(".index")].split(
        "-step-"))
    assert epochs_done in (1, 2) and 0 < steps_done < 60, saved  # 2: the signal came late

    result = run(command(stopped))
    assert f"Epoch {epochs_done + 1}/3" in result.stdout
    assert f"Epoch {epochs_done}/3" not in result.stdout
    for stage in (0, 1):
        final, reference = stage_values(stopped, 3, stage), stage_values(straight, 3, stage)
        assert final.keys() == reference.keys()
        for name in reference:
            np.testing.assert_allclose(final[name], reference[name], rtol=0, atol=1e-10,
                                       err_msg=name)


@pytest.mark.distributed
def test_the_pipeline_study_tables_what_its_runs_measured(tmp_path):
    """app.studies.pipeline_parallelism at its smallest: one process, 2 stages x 2
    microbatches, and the memory runs (data parallel, stages in GPipe's and 1F1B's order,
    recompute) on 2 processes,
    each also under a budget it trains within (a run that does not fit:
    test_sharded_optimizer's budget test)."""
    stdout, rows = run_study(
        tmp_path, "app.studies.pipeline_parallelism", "pipeline_study.csv", "--model=mlp",
        "--image_size=8", "--global_batch=32", "--stages=2", "--microbatches=2", "--steps=3",
        "--warmup_steps=1", "--memory_model=mlp", "--memory_global_batch=32",
        "--memory_microbatches=2", "--memory_processes=2", "--memory_budget_mb=4000")
    assert [row["run"] for row in rows] == ["S=1 M=1", "S=2 M=2", "data parallel",
                                            "2 stages, GPipe", "2 stages, 1F1B",
                                            "2 stages, 1F1B, recompute"]
    one = json.loads((tmp_path / "one-process" / "results.json").read_text())
    piped = json.loads((tmp_path / "stages2-microbatches2" / "results.json").read_text())
    assert piped["pipeline_stages"] == 2 and piped["microbatches"] == 2
    assert float(rows[1]["speedup"]) == pytest.approx(piped["images_per_sec"] /
                                                      one["images_per_sec"])
    assert float(rows[1]["theory_speedup"]) == pytest.approx(2 * 2 / 3)  # bubble 1/3
    for row, name in zip(rows[2:], ("data-parallel", "2-stages-gpipe", "2-stages-1f1b",
                                    "2-stages-1f1b-recompute")):
        measured = json.loads((tmp_path / f"memory-{name}" / "results.json").read_text())
        assert float(row["peak_memory_mb"]) == max(measured["peak_memory_mb_by_rank"])
        assert len(measured["peak_memory_mb_by_rank"]) == 2
        assert row["trained_within_budget"] == "True"
    assert "S=2 M=2: " in stdout and "under 4000 MiB: trained" in stdout
    assert (tmp_path / "pipeline_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
