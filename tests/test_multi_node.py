"""More than one node: a simulated cluster of 2 hosts on this machine
(scripts/simulated_cluster.sh: network namespaces with their own hostnames, addresses and
SSH servers, sharing the file system), 2 ranks on each, launched from node1 as from a
job's first node."""
import csv
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import CLUSTER, INTEGRITY_FLAGS, PYTHON, REPO, error_lines, on_node1, read_log, run

HOSTS = "node1:2,node2:2"


def launch(*arguments):
    return [PYTHON, "-m", "app.launch", "-np", "4", *arguments]


def final_weights(model_dir):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", "epoch-16"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/")}


@pytest.fixture(scope="module")
def two_node_runs(cluster, tmp_path_factory):
    """The integrity run (conftest) on 2 nodes through app.launch's mpirun and horovodrun
    (Gloo): each one's (stdout, model_dir)."""
    cases = {
        "mpirun": on_node1(*launch(f"--hosts={HOSTS}", "--network_interface=cluster0")),
        "horovodrun": on_node1(*launch("--launcher=horovodrun", f"--hosts={HOSTS}",
                                       "--network_interface=cluster0")),
    }
    runs = {}
    for name, command in cases.items():
        model_dir = tmp_path_factory.mktemp(name)
        runs[name] = run([*command, *INTEGRITY_FLAGS, f"--model_dir={model_dir}"]).stdout, \
            model_dir
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_two_nodes_train_as_four_ranks_on_one_host(two_node_runs, integrity_runs, launcher):
    """The same global batch and --deterministic (in float64, as the integrity test): the
    same weights to 1e-10, though the allreduce runs over TCP between the nodes and over
    shared memory within one; each rank knows its node."""
    stdout, model_dir = two_node_runs[launcher]
    reference = final_weights(integrity_runs[4])
    weights = final_weights(model_dir)
    assert weights.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(weights[name], reference[name], rtol=0, atol=1e-10,
                                   err_msg=name)
    processes = json.loads((model_dir / "results.json").read_text())["processes"]
    assert [(p["rank"], p["host"], p["local_rank"], p["local_size"], p["cross_rank"],
             p["cross_size"]) for p in processes] == [
        (0, "node1", 0, 2, 0, 2), (1, "node1", 1, 2, 0, 2),
        (2, "node2", 0, 2, 1, 2), (3, "node2", 1, 2, 1, 2)]
    one_host = json.loads((integrity_runs[4] / "results.json").read_text())
    assert {(p["local_size"], p["cross_size"]) for p in one_host["processes"]} == {(4, 1)}

    # app.launch's settings are those of several nodes: the binding for 2 ranks on a node of
    # one core (each simulated node has one of this machine's 2), Horovod's own cycle time,
    # the cluster's interface.
    command = stdout.splitlines()[0]
    if launcher == "mpirun":
        assert command.startswith("mpirun -np 4 --bind-to none --map-by slot ")
        assert "--mca btl_tcp_if_include cluster0 --mca oob_tcp_if_include cluster0" in command
        assert "--mca oob_tcp_keepalive_time 10 " in command
        assert f" -H {HOSTS} " in command and "HOROVOD_CYCLE_TIME" not in command
    else:
        assert " --gloo --network-interface cluster0 -H node1:2,node2:2 " in command
        assert "--cycle-time-ms" not in command


@pytest.mark.distributed
def test_a_lost_node_ends_the_job_with_one_line_and_the_other_node_resumes(cluster,
                                                                           tmp_path):
    """node2's link goes down and its processes die, without a word to node1 (as a node
    whose power failed): mpirun notices within its keepalive, ends the job, and app.launch
    names the node in one line; the rerun on node1 alone resumes from the last checkpoint,
    at the run's global batch, without repeating an epoch."""
    epochs = 3
    flags = ["--flagfile=configs/digits_cnn.cfg", f"--epochs={epochs}",
             "--steps_per_epoch=60", "--warmup_epochs=1", "--validation_steps=2",
             f"--model_dir={tmp_path}"]
    job = subprocess.Popen(on_node1(*launch(f"--hosts={HOSTS}", *flags)), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "checkpoints" / "epoch-1.index").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
            time.sleep(0.1)
        run([CLUSTER, "down", "node2"])
        lost = time.monotonic()
        _, stderr = job.communicate(timeout=90)
        seconds = time.monotonic() - lost
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        run([CLUSTER, "start", "2"])  # node2 back, for the tests after this one
    assert job.returncode != 0 and seconds < 60, stderr[-3000:]
    assert error_lines(stderr, "app.launch") == [
        "app.launch: error: mpirun lost node node2 (no answer from it); the job was ended, "
        "and the same command on the nodes left resumes from the last checkpoint"]
    assert error_lines(stderr) == [] and not (tmp_path / "results.json").exists()

    result = run(on_node1(PYTHON, "-m", "app.launch", "-np", "2", "--hosts=node1:2", *flags))
    assert f"Epoch 2/{epochs}" in result.stdout and "Epoch 1/" not in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs_completed"] == epochs and results["global_batch_size"] == 128
    assert {p["host"] for p in results["processes"]} == {"node1"}
    assert [int(row["epoch"]) for row in read_log(tmp_path)] == list(range(epochs))


@pytest.mark.distributed
def test_elastic_training_goes_from_two_nodes_to_one_and_back(cluster, tmp_path):
    """horovodrun's elastic mode with a host discovery script on the cluster: a worker on
    each node, then the script offers node1 only, then both again. The job follows (global
    batch and LR with the workers) and finishes, every epoch logged once."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node1:1\nnode2:1\n")
    discovery = tmp_path / "discover_hosts.sh"
    discovery.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discovery.chmod(0o755)
    model_dir, epochs = tmp_path / "run", 24
    command = on_node1(PYTHON, "-m", "app.launch", "-np", "2", "--min_np=1", "--max_np=2",
                       f"--host_discovery_script={discovery}", "--network_interface=cluster0",
                       "--flagfile=configs/digits_cnn.cfg", f"--epochs={epochs}",
                       "--warmup_epochs=0", "--lr_schedule=constant", "--validation_steps=2",
                       f"--model_dir={model_dir}")
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": REPO})

    def wait_for_epoch(epoch):
        deadline = time.monotonic() + 240
        while not (model_dir / "checkpoints" / f"epoch-{epoch}.index").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
            time.sleep(0.1)
    try:
        wait_for_epoch(2)
        hosts.write_text("node1:1\n")
        wait_for_epoch(8)
        hosts.write_text("node1:1\nnode2:1\n")
        stdout, stderr = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr[-4000:]
    sizes = [(int(size), int(epoch)) for size, epoch in
             re.findall(r"elastic: world size (\d) from epoch (\d+)", stdout)]
    assert [size for size, _ in sizes] == [2, 1, 2], stdout[-3000:]
    assert sizes[0][1] == 1 and 3 <= sizes[1][1] <= 8 < sizes[2][1] <= epochs
    results = json.loads((model_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_completed"] == epochs
    assert {p["host"] for p in results["processes"]} == {"node1", "node2"}
    log = read_log(model_dir)
    assert [int(row["epoch"]) for row in log] == list(range(epochs))
    rates = {float(row["lr"]) for row in log}
    assert len(rates) == 2 and max(rates) == pytest.approx(2 * min(rates))


@pytest.mark.distributed
def test_the_scaling_study_places_its_horovod_runs_on_the_hosts(cluster, tmp_path):
    """app.studies.throughput_scaling --hosts at its smallest: Horovod at np=1 on node1 and
    np=2 on node1 and node2 (horovodrun), plain Keras on node1, the table from their
    results, and no run that would measure one host alone."""
    run(on_node1(PYTHON, "-m", "app.studies.throughput_scaling", "--hosts=node1:1,node2:1",
                 "--launcher=horovodrun", "--repeats=1", "--flagfile=configs/digits_cnn.cfg",
                 "--steps_per_epoch=25", "--warmup_steps=5", f"--out_dir={tmp_path}"))
    with open(tmp_path / "scaling.csv") as table:
        rows = list(csv.DictReader(table))
    assert [(row["kind"], row["processes"]) for row in rows] == [
        ("reference", "1"), ("weak", "1"), ("weak", "2"), ("strong", "1"), ("strong", "2")]
    for row, name, hosts in ((rows[1], "run1-weak-np1-r0", ["node1"]),
                             (rows[2], "run2-weak-np2-r0", ["node1", "node2"])):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert [process["host"] for process in results["processes"]] == hosts
        assert float(row["images_per_sec"]) == pytest.approx(results["images_per_sec"])
    speedup = float(rows[2]["images_per_sec"]) / float(rows[1]["images_per_sec"])
    markdown = (tmp_path / "scaling.md").read_text()
    assert "hosts node1:1,node2:1" in markdown
    assert f"Horovod np=2 / np=1: {speedup:.2f}x" in markdown
    assert "independent" not in markdown
