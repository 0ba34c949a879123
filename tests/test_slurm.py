"""The SLURM recipes on a real SLURM cluster of two nodes (Debian's slurm-wlm and munge,
which `make test` installs): the controller on node1 of the simulated cluster
(scripts/simulated_cluster.sh) and a slurmd on each of its 2 nodes. Both sbatch scripts
train the default experiment on 2 nodes, through srun with PMIx and through app.launch's
mpirun; a job signalled ahead of its time limit is requeued and resumes; app.launch reads
the allocation's hosts."""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import CLUSTER, REPO, on_node1, run

DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("node1", "node2")


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    """The environment of a running two-node SLURM cluster (SLURM_CONF), stopped afterwards;
    its commands run on node1 (`on_node1`), where the controller listens."""
    missing = [daemon for daemon in DAEMONS if not shutil.which(daemon)]
    assert not missing, f"{missing} missing: `make test` installs slurm-wlm and munge"
    home = tmp_path_factory.mktemp("slurm")
    conf = home / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=test", "SlurmctldHost=node1(10.210.0.1)", "SlurmUser=root",
        "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
        "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
        "AuthInfo=cred_expire=20",  # how long a requeued job waits (120 s by default)
        f"SlurmctldPidFile={home}/slurmctld.pid", f"SlurmdPidFile={home}/slurmd-%n.pid",
        f"SlurmdSpoolDir={home}/spool-%n", f"StateSaveLocation={home}/state",
        f"TmpFS={home}/tmp-%n",  # node-local, as a cluster's /tmp (PMIx's files go there)
        f"SlurmctldLogFile={home}/slurmctld.log", f"SlurmdLogFile={home}/slurmd-%n.log",
        *(f"NodeName={node} NodeAddr=10.210.0.{k} CPUs={os.cpu_count()} State=UNKNOWN"
          for k, node in enumerate(NODES, 1)),
        f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP "
        f"OverSubscribe=YES", ""]))
    for node in NODES:
        (home / f"tmp-{node}").mkdir()
    env = {"SLURM_CONF": str(conf)}
    started_munge = subprocess.run(["munge", "-n"], capture_output=True).returncode != 0
    if started_munge:  # not answering yet (its socket, in /run, serves every node)
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run(["munged", "--force"], check=True)
    run(on_node1("slurmctld"), env=env)
    for node in NODES:
        run([CLUSTER, "run", node, "--", "slurmd", "-N", node], env=env)
    try:
        deadline = time.monotonic() + 60
        while run(on_node1("sinfo", "-h", "-o", "%t"), env=env,
                  check=False).stdout.split() != ["idle"]:
            assert time.monotonic() < deadline, (home / "slurmctld.log").read_text()[-3000:]
            time.sleep(1)
        yield env
    finally:
        run(on_node1("scontrol", "shutdown"), env=env, check=False)
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"])


def submit(env, script, model_dir, out, *flags):
    """Submits a recipe on a task on each of the 2 nodes, training the default experiment
    with `flags`; its job id."""
    return run(on_node1("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                        f"--output={out}", "--open-mode=append", f"--chdir={REPO}", script,
                        "--flagfile=configs/digits_cnn.cfg", f"--model_dir={model_dir}",
                        *flags), env=env).stdout.strip()


def wait_for_the_end(env, job, out):
    """Waits for `job` to end, requeued runs included; its output file's text and its
    `scontrol show job` line. (Polls the job itself: sbatch --wait notices the end only up
    to half a minute late.)"""
    deadline = time.monotonic() + 600
    while True:
        state = run(on_node1("scontrol", "show", "job", "-o", job), env=env).stdout
        job_state = re.search(r"JobState=(\S+)", state)[1]
        if job_state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
            break
        assert time.monotonic() < deadline, state
        time.sleep(1)
    output = out.read_text() if out.exists() else ""
    assert job_state == "COMPLETED", f"{state}\n--- job output\n{output[-4000:]}"
    return output, state


@pytest.mark.distributed
def test_the_srun_recipe_trains_on_two_nodes(slurm, tmp_path):
    """(The mpirun recipe's run: the requeue test below.)"""
    job = submit(slurm, "scripts/slurm/train_srun.sbatch", tmp_path / "run",
                 tmp_path / "job.out", "--epochs=3")
    output, _ = wait_for_the_end(slurm, job, tmp_path / "job.out")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_completed"] == 3, output[-3000:]
    assert results["val_accuracy"] > 0.9
    assert [(p["host"], p["cross_size"]) for p in results["processes"]] == [
        ("node1", 2), ("node2", 2)]


@pytest.mark.distributed  # its cluster's (the fixture's)
def test_launch_reads_the_hosts_of_an_allocation(slurm, monkeypatch):
    from app import launch

    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])  # for scontrol's node list
    assert launch.slurm_hosts({"SLURM_JOB_NODELIST": "gpu[07-09]",
                               "SLURM_TASKS_PER_NODE": "4(x2),2"}) == "gpu07:4,gpu08:4,gpu09:2"
    assert launch.slurm_hosts({"SLURM_TASKS_PER_NODE": "4"}) is None


@pytest.mark.distributed
def test_a_signalled_job_is_requeued_and_resumes_at_the_step_it_stopped(slurm, tmp_path):
    """USR1 as `--signal` sends it ahead of the time limit (to the batch script, which the
    mpirun recipe traps and passes on): the ranks checkpoint the step and exit 75, the
    recipe requeues the job, and the requeued job finishes from that step, on the hosts
    app.launch took from the allocation."""
    model_dir, out, epochs = tmp_path / "run", tmp_path / "job.out", 2
    job = submit(slurm, "scripts/slurm/train_mpirun.sbatch", model_dir, out, f"--epochs={epochs}",
                 "--warmup_epochs=1", "--steps_per_epoch=150", "--validation_steps=2")
    deadline = time.monotonic() + 300
    while not (model_dir / "checkpoints" / "epoch-1.index").exists():
        state = run(on_node1("scontrol", "show", "job", "-o", job), env=slurm).stdout
        output = out.read_text()[-3000:] if out.exists() else ""
        assert "JobState=RUNNING" in state or "JobState=PENDING" in state, f"{state}\n{output}"
        assert time.monotonic() < deadline, output
        time.sleep(0.2)
    run(on_node1("scancel", "--batch", "--signal=USR1", job), env=slurm)
    output, state = wait_for_the_end(slurm, job, out)
    assert "Restarts=1 " in state, state
    stopped = re.search(r"stopped by SIGUSR1 at epoch (\d+), step (\d+): saved", output)
    assert stopped, output[-4000:]
    epoch, step = int(stopped[1]), int(stopped[2])
    assert epoch >= 2 and 0 < step < 150
    resumed = output[stopped.end():]
    assert f"Epoch {epoch}/{epochs}" in resumed and "Epoch 1/" not in resumed, resumed[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_completed"] == epochs
    assert results["val_accuracy"] > 0.9
    assert " -H node1:1,node2:1 " in output.splitlines()[0], output[:2000]
    assert {p["host"] for p in results["processes"]} == set(NODES)
