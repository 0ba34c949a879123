"""app.studies.scaling_model: the allreduce arithmetic, Horovod's published figures inside
the predicted range, and the command line."""
import json

import pytest

from conftest import PYTHON, run
from app.studies import scaling_model

MB = scaling_model.MB


def test_a_ring_moves_twice_the_data_in_two_p_minus_1_hops():
    assert scaling_model.ring_allreduce_seconds(100 * MB, 1, 1e-5, 1e9) == 0
    assert scaling_model.ring_allreduce_seconds(100 * MB, 4, 1e-5, 1e9) == pytest.approx(
        6 * 1e-5 + 2 * 3 / 4 * 100 * MB / 1e9)
    # hierarchical: a ring in each node of 4, then one across 2 nodes
    network, node_network = (1e-5, 1e9), (1e-6, 1e11)
    assert scaling_model.allreduce_seconds(8 * MB, 8, 4, network, node_network, True) == \
        pytest.approx(scaling_model.ring_allreduce_seconds(8 * MB, 4, *node_network)
                      + scaling_model.ring_allreduce_seconds(8 * MB, 2, *network))


def test_overlap_hides_at_most_the_backward_pass_and_never_the_last_buffer():
    network = (1e-5, 1e9)
    worst, best = scaling_model.step_seconds(0.3, 200 * MB, 16, 1, network, network,
                                             fusion_bytes=64 * MB, cycle=0.0)
    buffers = [64 * MB] * 3 + [8 * MB]
    communication = sum(scaling_model.ring_allreduce_seconds(size, 16, *network)
                        for size in buffers)
    coordination = 2 * 4 * 1e-5
    assert worst == pytest.approx(0.3 + communication + coordination)
    assert best == pytest.approx(0.3 + communication - 0.2 + coordination)
    tiny_best = scaling_model.step_seconds(0.3, 1 * MB, 16, 1, network, network, cycle=0.0)[1]
    assert tiny_best == pytest.approx(
        0.3 + scaling_model.ring_allreduce_seconds(1 * MB, 16, *network) + coordination)


def test_sharded_state_moves_an_allreduces_bytes_and_hides_only_the_reduce_scatter():
    """--sharded: the reduce-scatter (half a ring) overlaps the backward pass, the weights'
    allgather (the other half) comes after the update: without overlap the step is the
    allreduce's, with it the allgather stays whole."""
    network = (1e-5, 1e9)
    flat = dict(per_node=1, network=network, node_network=network, fusion_bytes=64 * MB,
                cycle=0.0)
    plain_worst, plain_best = scaling_model.step_seconds(0.3, 200 * MB, 16, **flat)
    worst, best = scaling_model.step_seconds(0.3, 200 * MB, 16, **flat, sharded=True)
    assert worst == pytest.approx(plain_worst)
    half = sum(scaling_model.ring_allreduce_seconds(size, 16, *network) / 2
               for size in [64 * MB] * 3 + [8 * MB])
    last_half = scaling_model.ring_allreduce_seconds(8 * MB, 16, *network) / 2
    assert best == pytest.approx(0.3 + max(half - 0.2, last_half) + half + 2 * 4 * 1e-5)
    assert best > plain_best


def test_curvature_traffic_follows_the_gradients_spread_over_its_steps():
    """K-FAC's factors allreduced every 2 updates and their eigenvectors broadcast every 10
    (each over a ring of 16): added whole, with and without overlap, each over its interval;
    nothing on one process."""
    network = (1e-5, 1e9)
    flat = dict(per_node=1, network=network, node_network=network, cycle=0.0)
    plain = scaling_model.step_seconds(0.3, 200 * MB, 16, **flat)
    kfac = scaling_model.Curvature(40 * MB, 2, 40 * MB, 10)
    extra = (scaling_model.ring_allreduce_seconds(40 * MB, 16, *network) / 2
             + (15 * 1e-5 + 40 * MB / 1e9) / 10)
    assert scaling_model.step_seconds(0.3, 200 * MB, 16, **flat, curvature=kfac) == \
        pytest.approx((plain[0] + extra, plain[1] + extra))
    assert scaling_model.step_seconds(0.3, 200 * MB, 1, **flat, curvature=kfac) == (0.3, 0.3)


def test_horovods_published_efficiencies_fall_inside_the_predicted_range(tmp_path):
    """Horovod's paper at 512 GPUs: inside the range; NVIDIA's ResNet-50 in one NVLink
    server: below the model, which counts only the allreduce there."""
    run([PYTHON, "-m", "app.studies.scaling_model", "--published", f"--out_dir={tmp_path}"])
    rows = json.loads((tmp_path / "scaling_model.json").read_text())["rows"]
    paper = [row for row in rows if row["model"].startswith("Horovod's paper")]
    assert [row["model"][17:] for row in paper] == ["Inception V3", "ResNet-101", "VGG-16"]
    for row in paper:
        assert row["predicted_no_overlap"] - 0.01 <= row["published"] <= \
            row["predicted_overlap"] + 0.01, row
    nvidia = [row for row in rows if row["model"].startswith("NVIDIA DLE")]
    assert len(nvidia) == 6 and {row["gpus"] for row in nvidia} == {8, 16}
    for row in nvidia:
        assert 0.8 < row["published"] < row["predicted_no_overlap"] <= 1, row


def test_the_table_says_where_efficiency_falls_below_90_and_80_percent(tmp_path):
    result = run([PYTHON, "-m", "app.studies.scaling_model", "--step_ms=100",
                  "--gradient_mb=100", "--batch=32", "--network=roce25",
                  "--processes_per_node=4", f"--out_dir={tmp_path}"])
    rows = json.loads((tmp_path / "scaling_model.json").read_text())["rows"]
    assert [row["processes"] for row in rows] == [2 ** k for k in range(11)]
    efficiencies = [row["efficiency_overlap"] for row in rows]
    assert efficiencies[0] == 1 and efficiencies == sorted(efficiencies, reverse=True)
    below_90 = scaling_model.first_below(rows, 0.9, "efficiency_no_overlap")
    assert f"Efficiency below 90%: from {below_90} processes without overlap" in result.stdout
    refused = run([PYTHON, "-m", "app.studies.scaling_model", "--step_ms=100"], check=False)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].endswith(
        "error: --results, or all of --step_ms, --gradient_mb and --batch")
