"""Shared helpers. Every process a test starts runs on Keras 3: TF_USE_LEGACY_KERAS is unset
here, before any test module loads TensorFlow."""
import atexit
import concurrent.futures
import csv
import ctypes
import functools
import itertools
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TF_USE_LEGACY_KERAS", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
HOROVODRUN = os.path.join(os.path.dirname(PYTHON), "horovodrun")
TIMEOUT = 600


@pytest.fixture(scope="session")
def digits_tfrecords(tmp_path_factory):
    """The digits written as 4 TFRecord shards per split in the ImageNet layout."""
    import input_pipeline
    from input_pipeline.shards import write_split
    folder = tmp_path_factory.mktemp("digits_tfrecords")
    for split in input_pipeline.SPLITS:
        write_split(input_pipeline.load("digits", split), split, str(folder), num_shards=4)
    return folder


@pytest.fixture
def float64():
    """Keras' variables and computations in float64 for the test (imports Keras)."""
    from app.horovod import keras
    keras.config.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.config.set_floatx("float32")


def run_concurrently(function, cases):
    """function(case) for each case, as many at a time as there are cores: much of a short
    run is importing TensorFlow and building the model, on one core."""
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(function, cases))


# The integrity runs: digits_cnn with its own schedule (16 epochs of one step: 2 of warmup,
# then cosine) at a global batch of 128, in float64 (rounding out of the way), on 1, 2 and 4
# processes (test_train.py), and on 2 nodes (test_multi_node.py).
INTEGRITY_FLAGS = ["--flagfile=configs/digits_cnn.cfg", "--global_batch_size=128",
                   "--deterministic", "--steps_per_epoch=1", "--validation_steps=1",
                   "--summary_steps=1", "--float64"]


@pytest.fixture(scope="session")
def integrity_runs(tmp_path_factory):
    """The model_dir of the integrity run on each number of processes (1, 2, 4), one host."""
    runs = {}
    for processes in (1, 2, 4):
        model_dir = tmp_path_factory.mktemp(f"integrity-np{processes}")
        command = train_command(*INTEGRITY_FLAGS, f"--model_dir={model_dir}")
        run([*mpirun(processes), *command] if processes > 1 else command)
        runs[processes] = model_dir
    return runs


CLUSTER = os.path.join(REPO, "scripts", "simulated_cluster.sh")
_running = {"distributed": True}  # whether the test being set up or run is marked distributed


def pytest_runtest_setup(item):
    """Notes the test's mark before its fixtures run (they start jobs too)."""
    _running["distributed"] = item.get_closest_marker("distributed") is not None


def _distributed_only(launcher):
    """`make test` runs the tests not marked distributed two at a time: one that starts an
    MPI, horovodrun or cluster job must be marked, or its ranks would share the cores."""
    if not _running["distributed"]:
        pytest.fail(f"{launcher}: starts a job in a test not marked distributed")


@functools.lru_cache(maxsize=None)
def _refusing_launchers():
    """A folder of mpirun, horovodrun, srun and sbatch that refuse to start: first on the
    PATH of the commands a test not marked distributed runs, so that a job started deeper
    (a study's app.launch) fails it too."""
    folder = tempfile.mkdtemp(prefix="not-distributed-")
    atexit.register(shutil.rmtree, folder, True)
    for launcher in ("mpirun", "horovodrun", "srun", "sbatch"):
        path = os.path.join(folder, launcher)
        with open(path, "w") as script:
            script.write(f"#!/bin/sh\necho '{launcher}: started by a test not marked "
                         f"distributed' >&2\nexit 97\n")
        os.chmod(path, 0o755)
    return folder


@pytest.fixture(scope="session")
def cluster():
    """A simulated cluster of hosts node1 and node2 (scripts/simulated_cluster.sh), removed
    at the end (also when a test fails)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and SSH servers need root (CI runs as root)")
    _distributed_only("the simulated cluster")
    run([CLUSTER, "start", "2"])
    try:
        yield
    finally:
        run([CLUSTER, "stop"])


@pytest.fixture(scope="session")
def horovod_here():
    """Horovod initialized in pytest's own process (an MPI singleton), for tests of its Keras
    layer on one process. MPI then puts its own variables (OMPI_*, PMIX_*) in the process's C
    environment, which Python's os.environ never sees and every child started without an
    explicit environment inherits: a child mpirun (a study's runs) then exits 1 without a
    word. They are taken out of it again once init() has read them."""
    from app.horovod import hvd
    hvd.init()
    environ = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    names = []
    for index in itertools.count():
        if environ[index] is None:
            break
        names.append(environ[index].decode(errors="replace").split("=", 1)[0])
    for name in names:
        if name.startswith(("OMPI_", "PMIX_")) and name not in os.environ:
            os.unsetenv(name)
    return hvd


def on_node1(*command):
    """`command` run on the simulated cluster's node1, as on a job's first node."""
    return [CLUSTER, "run", "node1", "--", *command]


def mpirun(num_processes):
    """mpirun's prefix for `num_processes` local processes, as root too."""
    _distributed_only("mpirun")
    command = ["mpirun", "-np", str(num_processes), "--oversubscribe", "--bind-to", "none",
               "--mca", "mpi_yield_when_idle", "1"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    return command


def horovodrun(num_processes):
    _distributed_only("horovodrun")
    return [HOROVODRUN, "-np", str(num_processes), "--gloo"]


def _environment(env=None):
    """This process's environment, with `env` added and the repository on the Python path
    (and, in a test not marked distributed, launchers that refuse first on the PATH)."""
    environment = {**os.environ, **(env or {}), "PYTHONPATH": REPO}
    if not _running["distributed"]:
        environment["PATH"] = f"{_refusing_launchers()}:{environment.get('PATH', '')}"
    return environment


def run(command, timeout=TIMEOUT, check=True, env=None):
    """Runs `command` from the repository root, with `env` added to the environment; fails
    the test with its output if it fails."""
    if "app.launch" in command:
        _distributed_only("app.launch")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=_environment(env))
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def terminal_output(command):
    """What `command`, run as `run` runs it, writes to its stdout when that is a terminal (a
    pseudo-terminal here); the test fails if the command fails."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, cwd=REPO, stdout=follower, stderr=subprocess.DEVNULL,
                               env=_environment())
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=TIMEOUT) == 0
    return b"".join(chunks).decode(errors="replace")


def run_study(out_dir, module, table, *args):
    """Runs the study `python -m module` with `args` into `out_dir`; (its stdout, the rows
    of the table it wrote there, OUT_DIR/TABLE)."""
    result = run([PYTHON, "-m", module, *args, f"--out_dir={out_dir}"])
    with open(os.path.join(out_dir, table)) as rows:
        return result.stdout, list(csv.DictReader(rows))


def error_lines(stderr, program="app.train"):
    """The `PROGRAM: error:` lines in `stderr` (a finished command's, or its text), without
    the `[rank]<stderr>:` prefix horovodrun puts before each rank's lines."""
    text = getattr(stderr, "stderr", stderr)
    lines = (re.sub(r"^\[\d+\]<stderr>:", "", line) for line in text.splitlines())
    return [line for line in lines if line.startswith(f"{program}: error:")]


def read_log(model_dir):
    """The rows of a run's training_log.csv (CSVLogger: one per epoch)."""
    with open(os.path.join(model_dir, "training_log.csv")) as log:
        return list(csv.DictReader(log))


def train_command(*flags):
    return [PYTHON, "-m", "app.train", *flags]
