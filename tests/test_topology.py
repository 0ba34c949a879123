"""The topology data (input_pipeline.topology): load cases deterministic by seed and what
they hold, the inputs a network sees of them, SIMP's designs and their thresholds."""
import json
import os

import numpy as np
import pytest

from conftest import PYTHON, error_lines, mpirun, read_log, run, train_command
from test_train import checkpoint_values
from input_pipeline import simp, topology


def test_a_load_case_is_its_seeds_alone():
    first, again, other = (topology.random_load_case((8, 6, 4), seed) for seed in (3, 3, 4))
    for name in ("forces", "fixed"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.volume_fraction == again.volume_fraction
    assert not (np.array_equal(first.forces, other.forces)
                and np.array_equal(first.fixed, other.fixed))


@pytest.mark.parametrize("seed", range(20))
def test_a_load_case_is_held_on_one_face_and_loaded_on_others(seed):
    case = topology.random_load_case((6, 5, 4), seed)
    assert topology.VOLUME_FRACTIONS[0] <= case.volume_fraction <= topology.VOLUME_FRACTIONS[1]
    held = np.argwhere(case.fixed.any(axis=-1))
    face, = [axis for axis in range(3) if held[0, axis] in (0, case.shape[axis])
             and (held[:, axis] == held[0, axis]).all()][:1]  # all on one face of the box
    assert (case.fixed.all(axis=-1) == case.fixed.any(axis=-1)).all()  # all three directions
    loaded = np.abs(case.forces).sum(axis=-1) > 0
    assert loaded.any() and not (loaded & case.fixed.any(axis=-1)).any()
    on_surface = np.zeros(case.forces.shape[:-1], bool)
    on_surface[[0, -1]] = on_surface[:, [0, -1]] = on_surface[:, :, [0, -1]] = True
    assert not (loaded & ~on_surface).any()
    # each on a face other than the supported one (on an edge it is on both)
    support = (face, held[0, face])
    for node in np.argwhere(loaded):
        assert any(node[axis] == end for axis in range(3) for end in (0, case.shape[axis])
                   if (axis, end) != support), node
    # one to three loads of magnitude 1 (less what fell on a support)
    assert np.linalg.norm(case.forces.sum(axis=(0, 1, 2))) <= topology.MAX_LOADS + 1e-9


def test_the_inputs_put_a_point_load_whole_on_each_element_it_touches():
    shape = (4, 4, 4)
    forces, fixed = np.zeros((5, 5, 5, 3)), np.zeros((5, 5, 5, 3), bool)
    forces[4, 2, 2] = (0.0, 0.6, -0.8)  # the middle of the face x = 4
    fixed[0] = True
    case = topology.LoadCase(shape, forces, fixed, 0.3)
    inputs = topology.inputs_of(case)
    assert inputs.shape == shape + (len(topology.CHANNELS),)
    touching = np.zeros(shape, bool)
    touching[3, 1:3, 1:3] = True
    np.testing.assert_allclose(inputs[touching][:, :3], [[0.0, 0.6, -0.8]] * 4, atol=1e-7)
    assert not inputs[~touching][:, :3].any()
    np.testing.assert_allclose(inputs[0, :, :, 3], 0.5)  # half of each element's nodes held
    assert not inputs[1:, :, :, 3].any()
    assert (inputs[..., 4] == np.float32(0.3)).all()
    # the strain energy is largest where the load is, and relative to its mean
    energy = inputs[..., 5]
    assert energy[touching].min() > np.median(energy)
    assert np.log10(np.mean(10.0 ** energy.astype(float))) == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("change, words", [
    (dict(volume_fraction=1.0), "volume fraction 1.0: must be in (0, 1)"),
    (dict(volume_fraction=0.0), "volume fraction 0.0: must be in (0, 1)"),
    (dict(fixed=np.zeros((5, 5, 5, 3), bool)), "no support: the box would float"),
    (dict(forces=np.zeros((5, 5, 4, 3))), "forces of shape (5, 5, 4, 3), not the box's nodes "
                                          "(5, 5, 5, 3)"),
])
def test_a_load_case_that_cannot_be_is_refused(change, words):
    case = topology.random_load_case((4, 4, 4), 0)
    fields = {**dict(shape=case.shape, forces=case.forces, fixed=case.fixed,
                     volume_fraction=case.volume_fraction), **change}
    with pytest.raises(topology.LoadCaseError) as error:
        topology.LoadCase(**fields)
    assert str(error.value) == words


def test_an_example_is_simps_design_of_its_case_and_the_same_each_time():
    case = topology.random_load_case((8, 8, 8), 5)
    first, again = topology.example(case), topology.example(case)
    np.testing.assert_array_equal(first.density, again.density)
    assert first.compliance == again.compliance and first.iterations == again.iterations
    assert first.density.mean() == pytest.approx(case.volume_fraction, abs=1e-3)
    assert first.solid.sum() == round(case.volume_fraction * 8 ** 3)
    assert first.density[first.solid].min() >= first.density[~first.solid].max()
    # the design is stiffer than the uniform material of the same volume
    uniform = simp.compliance(case.shape, case.forces.ravel(), case.fixed.ravel(),
                              np.full(case.shape, case.volume_fraction))
    assert first.compliance < uniform / 2


def test_a_design_is_kept_where_its_settings_say_and_read_back(tmp_path):
    made = topology.cached_example(4, 7, "train", 3, str(tmp_path))
    folder = topology.design_folder(str(tmp_path), 4, 7, "train")
    assert sorted(os.listdir(folder)) == ["3.npz"]
    os.utime(os.path.join(folder, "3.npz"), (0, 0))
    read = topology.cached_example(4, 7, "train", 3, str(tmp_path))
    for found, again in zip(made, read):
        np.testing.assert_array_equal(found, again)
    assert os.stat(os.path.join(folder, "3.npz")).st_mtime == 0  # read, not made again
    others = {topology.design_folder(str(tmp_path), *settings)
              for settings in ((4, 8, "train"), (4, 7, "validation"), (8, 7, "train"))}
    assert folder not in others and len(others) == 3


@pytest.mark.distributed
def test_two_processes_make_the_designs_once_and_learn_them(tmp_path):
    """The CPU experiment, small: the ranks make their shards' designs into --data_dir (a
    folder that did not exist), train on them, and a second run reads them."""
    designs = tmp_path / "designs"
    command = [*mpirun(2), *train_command(
        "--flagfile=configs/topology_cpu.cfg", "--volume_size=8", "--num_volumes=8",
        "--epochs=1", "--warmup_epochs=0", f"--data_dir={designs}",
        f"--model_dir={tmp_path / 'run'}")]
    run(command)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["headline_metric"] == "val_compliance_ratio"
    assert results["headline_lower_is_better"]
    last = read_log(tmp_path / "run")[-1]
    assert 0 < float(last["val_iou"]) <= 1
    assert 0 < float(last["val_compliance_ratio"]) <= float(last["val_compliance_ratio_p90"])
    assert 0 <= float(last["val_connected"]) <= 1
    assert 0 <= float(last["val_volume_fraction_error"]) < 1
    assert sorted(path.name for path in designs.glob("*train*/*.npz")) == sorted(
        f"{index}.npz" for index in range(8))
    assert len(list(designs.glob("*validation*/*.npz"))) == 2
    times = {path: path.stat().st_mtime for path in designs.glob("*/*.npz")}
    run([*command[:-1], f"--model_dir={tmp_path / 'again'}"])
    assert {path: path.stat().st_mtime for path in designs.glob("*/*.npz")} == times


@pytest.mark.parametrize("flag, words", [
    ("--patch_size=8", "--patch_size=8: --dataset=topology has no patches"),
    ("--data_dir=configs/topology_cpu.cfg", "--data_dir=configs/topology_cpu.cfg: "),
    ("--validation_steps=1", "--validation_steps=1: a topology data set's scores take every "
                             "validation example each epoch"),
])
def test_a_flag_topology_cannot_take_is_refused_in_one_line(tmp_path, flag, words):
    result = run(train_command("--flagfile=configs/topology_cpu.cfg", "--volume_size=8",
                               flag, f"--model_dir={tmp_path / 'run'}"), check=False)
    assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr[-2000:]
    assert error_lines(result)[0].startswith(f"app.train: error: {words}")
    assert "data_dir" not in flag or "is a file, not a folder" in error_lines(result)[0]
    assert not (tmp_path / "run").exists()


def test_a_designs_compliance_is_the_hand_solution_on_one_element():
    """One unit cube held on its face x = 0, a load at a free corner: f.u from the element's
    own stiffness matrix, solved densely, against the design score's sparse solve."""
    forces, fixed = np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 3), bool)
    fixed[0] = True
    forces[1, 1, 1] = (0.2, -0.5, 0.3)
    case = topology.LoadCase((1, 1, 1), forces, fixed, 0.6)
    free = np.flatnonzero(~fixed.ravel())  # the element's unknowns are the box's, in order
    stiffness = simp.element_stiffness()[np.ix_(free, free)]
    by_hand = forces.ravel()[free] @ np.linalg.solve(stiffness, forces.ravel()[free])
    assert topology.solid_compliance(case, np.ones((1, 1, 1), bool)) == pytest.approx(
        by_hand, rel=1e-6)
    scores = topology.design_scores(case, np.full((1, 1, 1), 0.9), by_hand)
    assert scores["compliance_ratio"] == pytest.approx(1, rel=1e-6)
    assert scores["volume_fraction_error"] == pytest.approx(0.4) and scores["connected"]


def test_a_design_connects_its_loads_to_its_supports_only_through_solid_faces():
    shape = (4, 3, 3)
    forces, fixed = np.zeros((5, 4, 4, 3)), np.zeros((5, 4, 4, 3), bool)
    fixed[0] = True
    forces[4, 1, 1] = (0, 0, -1)  # a corner of elements [3, 0:2, 0:2]
    case = topology.LoadCase(shape, forces, fixed, 0.3)
    bar = np.zeros(shape, bool)
    bar[:, 0, 0] = True  # a bar of elements from the support to the load
    assert topology.connects(case, bar)
    gap = bar.copy()
    gap[2, 0, 0] = False
    assert not topology.connects(case, gap)
    diagonal = gap.copy()
    diagonal[2, 1, 1] = True  # joins the two halves by edges only
    assert not topology.connects(case, diagonal)
    stiff, broken = (topology.solid_compliance(case, design) for design in (bar, gap))
    assert broken > 1e6 * stiff  # the load rests on the void's 1e-9


def test_the_design_scores_of_simps_own_designs_are_one_and_of_noise_worse():
    """app.design_evaluation.DesignScores on three 4^3 designs in batches of two: a model
    that predicts SIMP's design (given it as its input) scores a compliance ratio of 1 and
    no volume-fraction error beyond rounding; one that predicts noise is less stiff. A
    spatial group's two ranks dealing the designs out log the same. Its logs are those the
    topology task's target reads (lower is better)."""
    import keras
    import tensorflow as tf
    from app import callbacks, design_evaluation, tasks
    cases = [topology.load_case(4, 0, "validation", index) for index in range(3)]
    solids = np.stack([topology.example(case, max_iterations=20).solid for case in cases])
    batches = tf.data.Dataset.from_tensor_slices(
        (solids[..., np.newaxis].astype(np.float32),) * 2).batch(2)
    noise = np.random.default_rng(0).random((4, 4, 4, 1)).astype(np.float32)
    logs_of, predictors = {}, {}
    for name, predicts in {"simp": lambda design: design,
                           "noise": lambda design: design * 0 + noise}.items():
        model = keras.Sequential([keras.Input((4, 4, 4, 1)), keras.layers.Lambda(predicts)])
        scores = design_evaluation.DesignScores(
            lambda index: cases[index], batches, 0, 1, lambda examples: examples,
            lambda rows: rows)
        scores.set_model(model)
        predictors[name] = model
        logs_of[name] = {"val_loss": 0.0}
        scores.on_epoch_end(0, logs_of[name])
    simp_logs, noise_logs = logs_of["simp"], logs_of["noise"]
    assert simp_logs["val_compliance_ratio"] == pytest.approx(1, rel=1e-12)
    assert simp_logs["val_compliance_ratio_p90"] == pytest.approx(1, rel=1e-12)
    assert simp_logs["val_volume_fraction_error"] < 1 / 64
    assert simp_logs["val_connected"] == np.mean([topology.connects(case, solid)
                                                  for case, solid in zip(cases, solids)])
    assert noise_logs["val_compliance_ratio"] > 1.5
    # a spatial group of two deals the designs out: each rank scores its share, marking
    # progress after each of its solves; gathered, every design once, the logs are one
    # rank's (the noise predictor's: its designs score apart)
    solves, shares = {0: 0, 1: 0}, {}

    def gather_of(part):
        def gather(rows):  # part 0 runs last: it sees both shares, as the allgather would
            shares[part] = rows
            return tf.concat(list(shares.values()), 0)
        return gather

    def progressed_of(part):
        return lambda: solves.update({part: solves[part] + 1})

    for part in (1, 0):
        scores = design_evaluation.DesignScores(
            lambda index: cases[index], batches, 0, 1, lambda examples: examples,
            gather_of(part), part, 2, progressed_of(part))
        scores.set_model(predictors["noise"])
        group_logs = {"val_loss": 0.0}
        scores.on_epoch_end(0, group_logs)
    assert solves == {0: 2, 1: 1} and group_logs == noise_logs
    gathered = tf.concat(list(shares.values()), 0).numpy()
    assert sorted(gathered[:, 0]) == [0, 1, 2]
    target = callbacks.TimeToAccuracy(1.2, "compliance_ratio", None, None,
                                      lambda value, at: tasks.reached("topology", value, at))
    for logs, stops in ((noise_logs, False), (simp_logs, True)):
        model.stop_training = False
        target.set_model(model)
        target.on_train_begin()
        target.on_epoch_end(0, logs)
        assert model.stop_training is stops and (target.reached is not None) is stops


@pytest.fixture(scope="module")
def topology_run(tmp_path_factory):
    """A topology run of one step on 8^3 designs: a model to predict with."""
    folder = tmp_path_factory.mktemp("topology")
    run(train_command("--flagfile=configs/topology_cpu.cfg", "--volume_size=8",
                      "--num_volumes=2", "--epochs=1", "--steps_per_epoch=1",
                      "--warmup_epochs=0", f"--data_dir={folder / 'designs'}",
                      f"--model_dir={folder / 'run'}"))
    return folder / "run"


def write_case(path, **changes):
    """A load case file: a 16 x 8 x 8 cantilever held at x = 0, loaded down along its tip's
    bottom edge (any entry replaced by `changes`)."""
    path.write_text(json.dumps({
        "shape": [16, 8, 8], "volume_fraction": 0.3,
        "supports": [{"from": [0, 0, 0], "to": [0, 8, 8]}],
        "loads": [{"from": [16, 0, 0], "to": [16, 8, 0], "force": [0, 0, -1]}], **changes}))
    return path


def test_predict_designs_for_a_load_case_file_and_compares_with_simp(topology_run, tmp_path):
    """app.predict on a box the run was not trained on: the design is the density's
    thresholded to the volume fraction, its compliance the solver's, over SIMP's."""
    out = tmp_path / "predicted"
    result = run([PYTHON, "-m", "app.predict", f"--model_dir={topology_run}", "--simp",
                  f"--input={write_case(tmp_path / 'case.json')}", f"--output_dir={out}"])
    found = json.loads((out / "prediction.json").read_text())
    assert json.loads(result.stdout.splitlines()[-1]) == found
    case = topology.read_load_case(tmp_path / "case.json")
    density, design = np.load(out / "density.npy"), np.load(out / "design.npy")
    assert density.shape == design.shape == (16, 8, 8) and design.sum() == round(0.3 * 16 * 64)
    assert (design == topology.thresholded(density, 0.3)).all()
    assert found["compliance"] == pytest.approx(topology.solid_compliance(case, design),
                                                rel=1e-9)
    assert found["compliance_ratio"] == pytest.approx(
        found["compliance"] / found["simp_compliance"], rel=1e-12)
    assert found["simp_iterations"] > 1 and found["compliance_ratio"] > 0
    assert (out / "design.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("changes, flag, words", [
    ({"loads": [{"from": [17, 0, 0], "force": [0, 0, -1]}]}, "--input",
     "load 1: node [17, 0, 0] is outside the box's nodes [[0, 16], [0, 8], [0, 8]]"),
    ({"volume_fraction": 1.2}, "--input", "volume fraction 1.2: must be in (0, 1)"),
    ({"supports": []}, "--input", "no support: the box would float"),
    ({"supports": [{"from": [0, 0, 0], "to": [0, 8, 8], "directions": "z"}]}, "--input",
     "the supports do not hold the box"),
    ({"loads": [{"from": [0, 4, 4], "force": [0, 0, -1]}]}, "--input", "no load"),
    ({"loads": [{"from": [16, True, 0], "force": [0, 0, -1]}]}, "--input",
     "load 1: a node is three whole numbers, not [16, true, 0]"),
    ({"shape": [10, 8, 8]}, "--input", "a box of [10, 8, 8] elements; --model=unet3d_small "
                                       "divides each extent by 4"),
    ({}, "--window=8", "applies to segmentation runs; --model_dir="),
])
def test_predict_refuses_a_load_case_that_cannot_be_in_one_line(topology_run, tmp_path, changes,
                                                                 flag, words):
    case = write_case(tmp_path / "case.json", **changes)
    if changes.get("shape"):  # the rest fits it
        case = write_case(tmp_path / "case.json", shape=[10, 8, 8], loads=[
            {"from": [10, 0, 0], "force": [0, 0, -1]}])
    extra = [] if flag == "--input" else [flag]
    result = run([PYTHON, "-m", "app.predict", f"--model_dir={topology_run}", f"--input={case}",
                  f"--output_dir={tmp_path / 'out'}", *extra], check=False)
    lines = error_lines(result, "app.predict")
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    prefix = f"app.predict: error: --input={case}: " if flag == "--input" else (
        f"app.predict: error: {flag.split('=')[0]}: ")
    assert lines[0].startswith(prefix) and words in lines[0], lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_the_cpu_experiment_trains_alike_on_1_and_2_processes_in_float64(tmp_path):
    """The topology experiment's recipe, small, in float64 at a global batch of 4: 1 and 2
    processes, as data-parallel replicas or as the two slabs of every design
    (--spatial_parts=2, the largest resolutions' way), end with the same weights and log the
    same design scores: 2 replicas split the 3 validation designs 2 and 1 (DesignScores
    gathers them by design), 2 slabs put each design together before scoring it."""
    small = ["--flagfile=configs/topology_cpu.cfg", "--volume_size=8", "--num_volumes=24",
             "--global_batch_size=4", "--epochs=4", "--steps_per_epoch=1", "--warmup_epochs=1",
             "--deterministic", "--float64", f"--data_dir={tmp_path / 'designs'}"]
    runs = {"1": [], "2": [], "slabs": ["--spatial_parts=2"]}
    for name, extra in runs.items():
        command = train_command(*small, *extra, f"--model_dir={tmp_path / name}")
        run([*mpirun(2), *command] if name != "1" else command)
    logs = {name: read_log(tmp_path / name) for name in runs}
    weights = {name: checkpoint_values(tmp_path / name, 4, "model/") for name in runs}
    assert len(logs["1"]) == 4 and len(weights["1"]) >= 20
    for name in ("2", "slabs"):
        assert len(logs[name]) == 4 and weights[name].keys() == weights["1"].keys()
        for key in ("loss", "val_loss", "val_iou", "val_compliance_ratio",
                    "val_compliance_ratio_p90", "val_volume_fraction_error", "val_connected"):
            for one, other in zip(logs["1"], logs[name]):
                assert float(other[key]) == pytest.approx(float(one[key]), rel=1e-10), (
                    name, key)
        for weight, value in weights["1"].items():
            np.testing.assert_allclose(weights[name][weight], value, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name}: {weight}")


@pytest.mark.distributed
def test_designs_made_ahead_by_make_designs_are_those_training_reads(tmp_path):
    """app.make_designs on 2 processes makes each split's designs once, dealt by index; a
    training run of the same flags (at another --seed) reads them and makes none; a data set
    of no designs is refused in one line."""
    small = ["--flagfile=configs/topology_cpu.cfg", "--volume_size=8", "--num_volumes=4",
             f"--data_dir={tmp_path / 'designs'}"]
    made = run([*mpirun(2), PYTHON, "-m", "app.make_designs", *small])
    assert sorted(line.split(": made ")[1].split(" designs")[0] for line in
                  made.stdout.splitlines() if ": made " in line) == ["3", "3"], made.stdout
    designs = sorted((tmp_path / "designs").glob("*/*.npz"))
    assert len(designs) == 4 + 2
    times = {path: path.stat().st_mtime_ns for path in designs}
    run(train_command(*small, "--epochs=1", "--steps_per_epoch=1", "--warmup_epochs=0",
                      "--seed=7", f"--model_dir={tmp_path / 'run'}"))
    assert {path: path.stat().st_mtime_ns for path in designs} == times
    refused = run([PYTHON, "-m", "app.make_designs", "--flagfile=configs/digits_cnn.cfg"],
                  check=False)
    assert refused.returncode == 2 and error_lines(refused, "app.make_designs") == [
        "app.make_designs: error: --dataset=digits: is not a data set of designs "
        "(--dataset=topology)"], refused.stderr[-2000:]
