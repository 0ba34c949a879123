"""What a user watches: after a short run on 2 processes, a real TensorBoard (`make
tensorboard`) serves the run's scalars, the LR as applied, throughput, global batch and its
hparams entry; headless Chromium renders the scalars dashboard (screenshot kept in
test-artifacts/); the profiler traced the steps asked for."""
import glob
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.request

import psutil
import pytest

from app.studies.harness import free_port
from conftest import PYTHON, REPO, mpirun, read_log, run, train_command

ARTIFACTS = os.path.join(REPO, "test-artifacts")
STEPS_PER_EPOCH = 22  # the digits' 1437 training examples at a global batch of 64
EPOCHS, WARMUP_EPOCHS, SUMMARY_STEPS, REFERENCE_BATCH = 4, 2, 5, 32
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(TensorBoard's URL, the run's model_dir, the server's pid): digits_cnn on 2 processes
    (warmup from the LR at a reference batch of 32 to twice that, then cosine), its logdir
    served by `make tensorboard`."""
    logdir = tmp_path_factory.mktemp("logdir")
    model_dir = logdir / "run_a"
    run([*mpirun(2), *train_command(
        "--flagfile=configs/digits_cnn.cfg", f"--epochs={EPOCHS}",
        f"--warmup_epochs={WARMUP_EPOCHS}", f"--reference_batch_size={REFERENCE_BATCH}",
        f"--summary_steps={SUMMARY_STEPS}",
        "--profile_steps=3,5", f"--model_dir={model_dir}")])
    port = free_port()
    server = subprocess.Popen(["make", "-s", "tensorboard", f"LOGDIR={logdir}", f"PORT={port}"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url, deadline = f"http://localhost:{port}", time.monotonic() + 120
    try:
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "no TensorBoard"
            try:
                get(url, "/data/runs")
                break
            except OSError:
                time.sleep(0.5)
        yield url, model_dir, server.pid
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def get(url, path, body=None):
    """TensorBoard's JSON answer to GET `path`, or to POST `body` (JSON) to it."""
    request = urllib.request.Request(
        url + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


def scalars(url, run_name, tag):
    """{step: value} of one scalar series."""
    series = get(url, f"/data/plugin/scalars/scalars?run={run_name}&tag={tag}")
    return {step: value for _, step, value in series}


def scheduled_learning_rate(step, reference_lr=0.1, scaled_lr=0.2):
    """The LR of training step `step` (from 1): the warmup from the reference batch's LR to
    the one scaled to the global batch of 64 (counting the step as done, so that the warmup
    ends exactly at scaled_lr), then the cosine."""
    if step <= WARMUP_EPOCHS * STEPS_PER_EPOCH:
        done = step / STEPS_PER_EPOCH / WARMUP_EPOCHS
        return reference_lr + (scaled_lr - reference_lr) * done
    epoch = (step - 1) / STEPS_PER_EPOCH
    progress = (epoch - WARMUP_EPOCHS) / (EPOCHS - WARMUP_EPOCHS)
    return scaled_lr * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.distributed
def test_tensorboard_serves_the_runs_scalars_per_step_and_per_epoch(served):
    url, model_dir, _ = served
    assert set(get(url, "/data/runs")) == {"run_a/tensorboard", "run_a/tensorboard/train",
                                            "run_a/tensorboard/validation"}
    tags = get(url, "/data/plugin/scalars/tags")
    assert {"batch_loss", "batch_accuracy", "epoch_loss", "epoch_accuracy", "epoch_lr",
            "learning_rate", "images_per_sec", "epoch_images_per_sec",
            "global_batch_size"} <= set(tags["run_a/tensorboard/train"])
    assert {"epoch_loss", "epoch_accuracy"} <= set(tags["run_a/tensorboard/validation"])

    every_step = range(SUMMARY_STEPS, EPOCHS * STEPS_PER_EPOCH + 1, SUMMARY_STEPS)
    learning_rate = scalars(url, "run_a/tensorboard/train", "learning_rate")
    assert sorted(learning_rate) == list(every_step)
    for step, value in learning_rate.items():  # the LR each step ran with
        assert value == pytest.approx(scheduled_learning_rate(step), rel=1e-5), step
    assert set(scalars(url, "run_a/tensorboard/train", "global_batch_size").values()) == {64}
    images_per_sec = scalars(url, "run_a/tensorboard/train", "images_per_sec")
    assert len(images_per_sec) >= len(every_step) - 3 and min(images_per_sec.values()) > 0

    log = read_log(model_dir)  # the CSV log holds the same epochs
    for run_name, column in (("train", "accuracy"), ("validation", "val_accuracy")):
        epochs = scalars(url, f"run_a/tensorboard/{run_name}", "epoch_accuracy")
        assert [epochs[epoch] for epoch in range(EPOCHS)] == pytest.approx(
            [float(row[column]) for row in log], rel=1e-6)


@pytest.mark.distributed
def test_tensorboard_holds_the_runs_hparams_and_final_metrics(served):
    url, model_dir, _ = served
    experiment = get(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"batch_size", "learning_rate", "optimizer", "warmup_epochs", "adasum"} <= names
    groups = get(url, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"]})["sessionGroups"]
    assert len(groups) == 1
    hparams = groups[0]["hparams"]
    assert hparams["batch_size"] == 32 and hparams["optimizer"] == "momentum"
    assert hparams["model_dir"] == str(model_dir) and hparams["profile_steps"] == "3,5"
    metrics = {(m["name"]["group"], m["name"]["tag"]): m["value"]
               for m in groups[0]["metricValues"]}
    final = read_log(model_dir)[-1]
    assert metrics[("validation", "epoch_accuracy")] == pytest.approx(
        float(final["val_accuracy"]), rel=1e-6)
    assert metrics[("train", "epoch_loss")] == pytest.approx(float(final["loss"]), rel=1e-6)


@pytest.mark.distributed
def test_the_scalars_dashboard_renders_in_headless_chromium(served, tmp_path):
    """Chromium loads the dashboard filtered to the scalars this project adds, asks the
    server for their data (its network log says so) and leaves a screenshot."""
    url, _, _ = served
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it"
    screenshot, net_log = os.path.join(ARTIFACTS, "tensorboard-scalars.png"), tmp_path / "net.json"
    os.makedirs(ARTIFACTS, exist_ok=True)
    if os.path.exists(screenshot):
        os.remove(screenshot)
    run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1400,1000", "--virtual-time-budget=20000", f"--log-net-log={net_log}",
         f"--screenshot={screenshot}",
         f"{url}/#scalars&tagFilter=learning_rate%7Cimages_per_sec%7Cglobal_batch_size"],
        timeout=180)
    requested = net_log.read_text()
    for path in ("/data/runs", "/data/plugin/scalars/tags", "/data/plugin/scalars/scalars"):
        assert f"{url}{path}" in requested, path
    with open(screenshot, "rb") as png:
        header = png.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1400, 1000)


@pytest.mark.distributed
def test_tensorboard_listens_on_this_machine_only(served):
    """`make tensorboard` serves on the loopback interface: nobody else on the cluster's
    network can read the runs (they reach it through an ssh tunnel)."""
    url, _, pid = served
    port = int(url.rsplit(":", 1)[1])
    addresses = {connection.laddr.ip
                 for process in psutil.Process(pid).children(recursive=True)
                 for connection in process.net_connections("inet")
                 if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port}
    assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses


@pytest.mark.distributed
def test_profile_steps_trace_exactly_those_steps(served):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    _, model_dir, _ = served
    traces = glob.glob(str(model_dir / "tensorboard" / "train" / "plugins" / "profile" / "*" /
                           "*.xplane.pb"))
    assert len(traces) == 1
    space = xplane_pb2.XSpace()
    with open(traces[0], "rb") as trace:
        space.ParseFromString(trace.read())
    host = next(plane for plane in space.planes if plane.name == "/host:CPU")
    steps = [event for line in host.lines for event in line.events
             if host.event_metadata[event.metadata_id].name == "Profiled batch"]  # Keras' mark
    assert len(steps) == 3  # steps 3, 4 and 5


@pytest.mark.distributed
def test_plot_draws_several_runs_from_their_logs(served, tmp_path):
    """app.studies.plot_runs reads the run's per-step LR from its TensorBoard events, a run
    without events its CSV's per-epoch LR, and draws both side by side."""
    from app.studies import plot_runs as plot

    url, model_dir, _ = served
    csv_only = tmp_path / "csv_only"
    csv_only.mkdir()
    shutil.copy(model_dir / "training_log.csv", csv_only)
    out = tmp_path / "comparison.png"
    result = run([PYTHON, "-m", "app.studies.plot_runs", str(model_dir), str(csv_only),
                  f"--out={out}"])
    assert result.stdout.strip() == f"wrote {out}"
    with open(out, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"

    with_events, without = plot.read_run(model_dir), plot.read_run(csv_only)
    per_step = scalars(url, "run_a/tensorboard/train", "learning_rate")
    assert list(with_events["lr"][0]) == [step / STEPS_PER_EPOCH for step in sorted(per_step)]
    assert list(with_events["lr"][1]) == pytest.approx([per_step[s] for s in sorted(per_step)])
    log = read_log(model_dir)
    assert without["lr"] == ([1, 2, 3, 4], [float(row["lr"]) for row in log])
    assert with_events["epochs"]["val_accuracy"] == [float(row["val_accuracy"]) for row in log]

    missing = run([PYTHON, "-m", "app.studies.plot_runs", str(model_dir), str(tmp_path / "nope")],
                  check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"app.studies.plot_runs: error: {tmp_path / 'nope'}: no training_log.csv (not an app.train "
        f"MODEL_DIR)")
