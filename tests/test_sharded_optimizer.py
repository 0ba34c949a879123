"""Optimizer state sharded over the ranks (app.parallel.sharded_optimizer, --shard_optimizer_state,
--shard_gradients): every optimizer ends where Horovod's unsharded optimizer ends, each rank
holds 1/N of the state, one checkpoint format at any number of processes, a signal
mid-epoch, the spatial groups, and the refusals."""
import json
import shutil

import numpy as np
import pytest

from conftest import (INTEGRITY_FLAGS, PYTHON, error_lines, horovodrun, mpirun, read_log, run,
                      run_concurrently, run_study, train_command)
from test_fault_tolerance import resumed_after_a_signal_mid_epoch
from test_train import checkpoint_values

from app.parallel.sharded_optimizer import piece_bounds
from app.studies import harness

OPTIMIZERS = ("momentum", "adam", "lamb", "lars", "novograd")


def test_pieces_are_horovods_reducescatter_split_and_cover_each_variable_once():
    """The first `elements % N` ranks get one element more; the pieces tile the range, and
    a variable with fewer elements than ranks leaves some ranks an empty piece."""
    for elements, size in ((10, 4), (3, 4), (8, 2), (1, 3), (0, 2)):
        bounds = [piece_bounds(elements, rank, size) for rank in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == elements
        assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert sizes == [elements // size + (rank < elements % size) for rank in range(size)]
    assert piece_bounds(10, 1, 4) == (3, 6)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, processes, settings, optimizers", [
    # each setting at least once; on 4 ranks, the optimizers whose update of a piece takes
    # norms of the whole variable (an empty piece's too), elementwise ones on 2
    (mpirun, 2, "stage2,stage1_accumulated", OPTIMIZERS),
    (mpirun, 4, "stage1,stage2_accumulated", ("lamb", "lars", "novograd")),
    (horovodrun, 2, "stage2_accumulated", OPTIMIZERS)], ids=["mpi-2", "mpi-4", "gloo-2"])
def test_each_optimizer_sharded_ends_with_horovods_weights_and_state(launcher, processes,
                                                                     settings, optimizers,
                                                                     tmp_path):
    """tests/workers/sharded_optimizer_check.py in float64: momentum SGD, Adam, LAMB, LARS
    and NovoGrad (weight decay on), stage 1 and 2, with and without --accumulation_steps=2,
    trained by Keras' fit() on a CNN whose output bias (3 elements) leaves the fourth of 4
    ranks an empty piece, beside (without accumulation, whose Horovod 0.28.1 asserts every
    gradient exists) a head the loss does not reach: the weights and the whole slots of the
    unsharded twin a save holds, gathered from the pieces, equal those of Horovod's
    DistributedOptimizer on the same batches to 1e-10, the iteration counts (updates) too;
    neither moves the unreached head; each rank's slots hold its pieces' elements (1/N,
    within one element per variable), the ranks' elements add up to the unsharded
    optimizer's (Keras 3 builds slots for the head too, both alike), and gathering them for
    a save leaves nothing behind. Under MPI, and under Gloo (horovodrun --gloo) at 2
    ranks."""
    run([*launcher(processes), PYTHON, "tests/workers/sharded_optimizer_check.py",
         str(tmp_path), settings, ",".join(optimizers)])
    by_rank = [json.loads((tmp_path / f"rank-{rank}.json").read_text())
               for rank in range(processes)]
    expected = {f"{name}_{setting}" for name in optimizers for setting in settings.split(",")}
    assert set(by_rank[0]) == expected
    for case in sorted(expected):
        for rank, cases in enumerate(by_rank):
            found = cases[case]
            assert found["weights"] < 1e-10 and found["slots"] < 1e-10, (case, rank, found)
            if "accumulated" not in case:  # the head the loss does not reach
                assert found["unused_moved"] == [0, 0], (case, rank, found)
            assert found["iterations"][0] == found["iterations"][1] > 0, (case, found)
            whole = found["unsharded_slot_elements"]
            assert found["slot_elements"] <= whole / processes + found["slot_variables"], found
            assert found["slot_elements_after_save"] == found["slot_elements"], found
        shards = sum(cases[case]["slot_elements"] for cases in by_rank)
        variables = by_rank[0][case]["slot_variables"] // len(by_rank[0][case]["slot_names"])
        # NovoGrad's second moment is one number per variable, which every rank keeps
        scalars = (processes - 1) * variables if case.startswith("novograd") else 0
        assert shards == whole + scalars, (case, shards, whole)


def _train(model_dir, processes, *flags):
    command = train_command(*INTEGRITY_FLAGS, f"--model_dir={model_dir}", *flags)
    return run([*mpirun(processes), *command] if processes > 1 else command)


def _weights_and_state(model_dir, epoch):
    """A checkpoint's weights, momenta, iteration count and learning rate: Keras 3 saves them
    all under the optimizer (the weights as the variables it updates)."""
    return checkpoint_values(model_dir, epoch, "optimizer/")


def _assert_same_values(found, expected):
    # 8 weights, 8 momenta, the iteration count and the learning rate
    assert found.keys() == expected.keys() and len(expected) == 18
    for name in expected:
        np.testing.assert_allclose(found[name], expected[name], rtol=0, atol=1e-10,
                                   err_msg=name)


@pytest.mark.distributed
def test_sharded_runs_end_with_one_processs_checkpoint_and_resume_at_any_number(
        integrity_runs, tmp_path):
    """The integrity run (digits_cnn's own schedule, momentum with Horovod's warmup and its
    momentum correction, float64): --shard_optimizer_state on 2 processes ends with one
    process's weights and momentum in one process's checkpoint format (1e-10); its checkpoint
    after epoch 14 resumed on one process unsharded, and one process's resumed on 4 processes
    with --shard_gradients, end there too; --init_checkpoint starts a sharded run from the
    trained weights."""
    one = _weights_and_state(integrity_runs[1], 16)
    _train(tmp_path / "sharded", 2, "--shard_optimizer_state")
    _assert_same_values(_weights_and_state(tmp_path / "sharded", 16), one)
    for run_dir, resumed_from in (("sharded_then_one", tmp_path / "sharded"),
                                  ("one_then_sharded4", integrity_runs[1])):
        shutil.copytree(resumed_from, tmp_path / run_dir)
        for path in (tmp_path / run_dir / "checkpoints").glob("epoch-1[56].*"):
            path.unlink()  # as if the run had stopped after epoch 14 of its 16
    resumed = [_train(tmp_path / "sharded_then_one", 1),
               _train(tmp_path / "one_then_sharded4", 4, "--shard_gradients")]
    for run_dir, result in zip(("sharded_then_one", "one_then_sharded4"), resumed):
        assert "Epoch 15/16" in result.stdout and "Epoch 14/16" not in result.stdout
        _assert_same_values(_weights_and_state(tmp_path / run_dir, 16), one)
    results = json.loads((tmp_path / "one_then_sharded4" / "results.json").read_text())
    assert results["optimizer_state_sharding"] == 2 and results["world_size"] == 4

    _train(tmp_path / "initialized", 2, "--shard_optimizer_state", "--epochs=3",
           f"--init_checkpoint={integrity_runs[1] / 'checkpoints' / 'epoch-16'}")
    fresh = read_log(integrity_runs[1])[0]
    assert float(read_log(tmp_path / "initialized")[0]["loss"]) < 0.9 * float(fresh["loss"])


@pytest.mark.distributed
def test_a_signal_stops_a_sharded_run_mid_epoch_and_the_rerun_ends_as_if_uninterrupted(
        tmp_path):
    """SIGUSR1 to rank 1 in epoch 2 of a --shard_gradients run: every rank gathers the
    state, rank 0 saves the step, the job exits 75, and the same command resumes there and
    ends with the uninterrupted run's weights and momentum (float64, 1e-10)."""
    flags = [*INTEGRITY_FLAGS, "--shard_gradients", "--epochs=3", "--warmup_epochs=1",
             "--steps_per_epoch=150", "--global_batch_size=64"]
    straight, stopped = resumed_after_a_signal_mid_epoch(flags, tmp_path, 120, 150)
    _assert_same_values(_weights_and_state(stopped, 3), _weights_and_state(straight, 3))


@pytest.mark.distributed
def test_sharding_composes_with_spatial_groups_and_float16_loss_scaling(tmp_path):
    """Spatial slabs P=2 x R=2 on 4 processes with --shard_optimizer_state end with one
    process's weights and Adam's moments (the seismic experiment's loss and schedule,
    float64, 1e-10); on 2 processes, float16 with loss scaling and --accumulation_steps
    under --shard_gradients, with and without --fp16_allreduce, and bfloat16 under
    --shard_optimizer_state log float32's losses to their precision, and the compression's
    losses the uncompressed run's to float16's."""
    from test_spatial import SURVEYS, _assert_same_values as same_survey_values
    from test_spatial import _checkpoint_values
    surveys = [*SURVEYS, "--epochs=4"]
    one = tmp_path / "one"
    run_concurrently(run, [
        train_command(*surveys, f"--model_dir={one}"),
        [*mpirun(4), *train_command(*surveys, f"--model_dir={tmp_path / 'hybrid'}",
                                    "--spatial_parts=2", "--shard_optimizer_state")]])
    same_survey_values(_checkpoint_values(tmp_path / "hybrid", 4), _checkpoint_values(one, 4))

    # float32 is every low-precision run's reference; sharded stage 1 and 2 are the same
    # arithmetic (tested above in float64), so one float32 run serves both stages
    accumulated = ["--accumulation_steps=2"]
    runs = {"float32": ["--mixed_precision=float32", *accumulated, "--shard_optimizer_state"],
            "float16": ["--mixed_precision=float16", *accumulated, "--shard_gradients"],
            "bfloat16": ["--mixed_precision=bfloat16", *accumulated, "--shard_optimizer_state"]}
    runs["fp16_allreduce"] = [*runs["float16"], "--fp16_allreduce"]
    run_concurrently(run, [[*mpirun(2), *train_command(
        "--flagfile=configs/digits_cnn.cfg", "--epochs=3", "--steps_per_epoch=4",
        "--deterministic", *flags, f"--model_dir={tmp_path / name}")]
        for name, flags in runs.items()])
    for name, flags in runs.items():
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["precision"] == flags[0].replace(
            "--mixed_precision=", "" if name == "float32" else "mixed_")
        assert results["optimizer_state_sharding"] == (2 if "--shard_gradients" in flags else 1)
    # Each logged loss within the compute type's unit roundoff of float32's (2^-11 for
    # float16, 2^-8 for bfloat16; measured: 4.7e-5 and 2.7e-4 of it after 12 updates)
    float32 = read_log(tmp_path / "float32")
    for name, tolerance in (("float16", 2 ** -11), ("fp16_allreduce", 2 ** -11),
                            ("bfloat16", 2 ** -8)):
        for low, full in zip(read_log(tmp_path / name), float32, strict=True):
            assert float(low["loss"]) == pytest.approx(float(full["loss"]), rel=tolerance), name
    # Compression rounds each update's averaged gradient pieces once more, to float16's 11
    # significant bits, so the losses differ by 2^-11 of what the updates change (1e-2 an
    # epoch here): within 2^-11 of the loss itself (measured: 2e-5 of it). The weights
    # differ: the compression acted.
    for compressed, plain in zip(read_log(tmp_path / "fp16_allreduce"),
                                 read_log(tmp_path / "float16"), strict=True):
        assert float(compressed["loss"]) == pytest.approx(float(plain["loss"]), rel=2 ** -11)
    compressed, plain = (_weights_and_state(tmp_path / name, 3)
                         for name in ("fp16_allreduce", "float16"))
    assert any(np.any(compressed[name] != plain[name]) for name in plain)


@pytest.mark.distributed
def test_what_sharding_does_not_support_is_refused_on_every_rank_with_one_line(tmp_path):
    """--adasum and --elastic with sharded state: exit 2 on both ranks before any work, one
    line naming the flag and why."""
    cases = [
        (["--adasum", "--shard_optimizer_state"],
         ["--adasum=True", "not supported with --shard_optimizer_state"], {}),
        (["--elastic", "--shard_gradients"],
         ["--elastic=True", "not supported with --shard_gradients"], {"HOROVOD_ELASTIC": "1"}),
    ]
    for flags, expected, env in cases:
        model_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        result = run([*mpirun(2), *train_command("--flagfile=configs/digits_cnn.cfg", *flags,
                                                 f"--model_dir={model_dir}")],
                     timeout=120, check=False, env=env)
        errors = error_lines(result)
        assert result.returncode == 2 and len(errors) == 1, (flags, result.stderr[-3000:])
        for part in expected:
            assert part in errors[0], (part, errors)
        assert "Epoch" not in result.stdout and not (model_dir / "checkpoints").exists()


@pytest.mark.distributed
def test_a_budget_run_is_out_of_memory_only_if_it_trains_without_the_limit(tmp_path):
    """The studies' budget searches: a run that fails under the limit and trains without
    it did not fit; one that fails either way ends the study with its error (before, any
    failure counted as "does not fit")."""
    tiny = ["--flagfile=configs/digits_cnn.cfg", "--epochs=1", "--warmup_epochs=0",
            "--steps_per_epoch=1", "--validation_steps=1"]
    assert not harness.trains_within(str(tmp_path / "tight"), ["-np", "1"], tiny, 50)
    with pytest.raises(SystemExit, match="--warmup_epochs=2: must be shorter"):
        harness.trains_within(str(tmp_path / "bad"), ["-np", "1"],
                              [*tiny, "--warmup_epochs=2"], 50)


@pytest.mark.distributed
def test_the_sharded_state_study_tables_what_its_runs_measured(tmp_path):
    """app.studies.sharded_optimizer_state at its smallest: 16x16 images, 2 processes, two
    updates of two batches, then under a budget each trains within (the search's other
    end, a run that does not fit, is the test above): each mode's row reads its run's
    results, the state per rank is half the allreduce's, stage 2's accumulators half stage
    1's; the models' variables dealt over 2 ranks."""
    stdout, rows = run_study(tmp_path, "app.studies.sharded_optimizer_state",
                             "sharded_study.csv", "--sizes=16", "--processes=2", "--steps=2",
                             "--warmup_steps=1", "--repeats=1", "--memory_budget_mb=4000",
                             "--budget_sizes=16", "--balance_processes=2")
    modes = ["allreduce", "sharded, stage 1", "sharded, stage 2"]
    assert [row["mode"] for row in rows[:6]] == modes + modes
    plain, stage1, stage2 = rows[:3]
    runs = {mode: json.loads((tmp_path / f"16-np2-{name}" / "results.json").read_text())
            for mode, name in zip(modes, ["allreduce", "sharded-stage-1", "sharded-stage-2"])}
    assert runs["sharded, stage 2"]["optimizer_state_sharding"] == 2
    for row in rows[:3]:
        results = runs[row["mode"]]
        assert float(row["peak_memory_mb"]) == max(results["peak_memory_mb_by_rank"])
        assert float(row["optimizer_state_mb"]) == pytest.approx(
            4 * max(results["optimizer_state_elements_by_rank"]) / 2 ** 20)
        assert float(row["cpu_over_allreduce"]) == pytest.approx(
            results["cpu_ms_per_image"] / runs["allreduce"]["cpu_ms_per_image"])
    parameters = runs["allreduce"]["trainable_parameters"]
    assert sum(runs["allreduce"]["optimizer_state_elements_by_rank"]) == 2 * 2 * parameters
    assert runs["sharded, stage 1"]["optimizer_state_elements_by_rank"] == [parameters] * 2
    assert float(stage1["optimizer_state_mb"]) == pytest.approx(
        float(plain["optimizer_state_mb"]) / 2)
    assert float(stage2["accumulators_mb"]) == pytest.approx(float(stage1["accumulators_mb"]) / 2)
    assert all(float(row["largest_parameters_m"]) == pytest.approx(parameters / 1e6)
               for row in rows[3:6])
    balance = {row["model"]: row for row in rows[6:]}
    assert set(balance) == {"resnet50", "wrn16_10", "unet3d", "mlp"}
    # the MLP is one 100M-parameter layer: whole variables put it all on one of 2 ranks
    assert float(balance["mlp"]["whole_variables_over_even"]) > 1.99
    assert all(float(row["split_variables_over_even"]) == pytest.approx(1, abs=1e-4)
               for row in balance.values())
    assert "on 2 processes, sharded, stage 1: optimizer state" in stdout
    assert "under 4000 MiB per process" in stdout
    assert (tmp_path / "sharded_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
