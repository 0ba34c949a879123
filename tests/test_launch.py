"""app.launch's command lines: binding, MPI's yielding and Horovod's cycle time follow the
number of ranks per node and the number of nodes (the runs themselves are in test_train)."""
import pytest

from app import launch


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(launch, "usable_cores", lambda: 4)
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)


def joined(num_processes, hosts=None, launcher="mpirun"):
    return " ".join(launch.command(num_processes, launcher, hosts, ["--epochs=1"]))


def test_one_node_binds_each_rank_to_its_cores_and_spins_the_cycle(four_cores):
    line = joined(2)
    assert "--map-by slot:PE=2 --bind-to core --mca mpi_yield_when_idle 1" in line
    assert "-x HOROVOD_CYCLE_TIME=0.02 " in line and line.endswith("-m app.train --epochs=1")
    assert "--cycle-time-ms 0.02 " in joined(4, launcher="horovodrun")


def test_one_process_or_more_ranks_than_cores_keep_horovods_cycle(four_cores):
    assert "HOROVOD_CYCLE_TIME" not in joined(1)
    oversubscribed = joined(8)
    assert "--bind-to none" in oversubscribed and "HOROVOD_CYCLE_TIME" not in oversubscribed


def test_several_nodes_keep_horovods_cycle_and_give_up_on_a_silent_node(four_cores):
    line = joined(8, hosts="node1:4,node2:4")
    assert "-H node1:4,node2:4" in line and "--map-by slot:PE=1 --bind-to core" in line
    assert "HOROVOD_CYCLE_TIME" not in line
    assert ("--mca oob_tcp_keepalive_time 10 --mca oob_tcp_keepalive_intvl 5 "
            "--mca oob_tcp_keepalive_probes 3") in line
    assert "keepalive" not in joined(4, hosts="node1:4") and "keepalive" not in joined(2)
    assert "--cycle-time-ms" not in joined(8, "node1:4,node2:4", "horovodrun")


def test_the_network_interface_reaches_either_launcher(four_cores):
    mpirun = " ".join(launch.command(8, "mpirun", "node1:4,node2:4", [], network_interface="ib0"))
    assert "--mca btl_tcp_if_include ib0 --mca oob_tcp_if_include ib0" in mpirun
    horovodrun = " ".join(launch.command(8, "horovodrun", "node1:4,node2:4", [],
                                         network_interface="ib0"))
    assert " --gloo --network-interface ib0 -H node1:4,node2:4 " in horovodrun


def test_the_users_horovod_settings_win_and_reach_every_rank(four_cores, monkeypatch):
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "2")
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "0")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    line = joined(2)
    for name in ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "NCCL_DEBUG"):
        assert f" -x {name} " in line
    assert "HOROVOD_CYCLE_TIME=0.02" not in line


def test_elastic_runs_horovodrun_with_the_discovery_script_and_app_train_elastic(four_cores):
    line = " ".join(launch.command(2, "mpirun", None, ["--epochs=1"],
                                   elastic=(1, 4, "/jobs/hosts.sh"), network_interface="ib0"))
    assert ("horovodrun -np 2 --min-np 1 --max-np 4 --host-discovery-script /jobs/hosts.sh "
            "--network-interface ib0 ") in line
    assert line.endswith("-m app.train --epochs=1 --elastic")


@pytest.mark.parametrize("arguments, named", [
    (["--host_discovery_script=/bin/true", "--min_np=3"], "--min_np=3"),
    (["--max_np=4"], "--min_np/--max_np"),
    (["--host_discovery_script=/nonexistent.sh"], "--host_discovery_script=/nonexistent.sh"),
])
def test_bad_elastic_arguments_are_named(arguments, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        launch.main(["-np", "2", *arguments])
    assert stopped.value.code == 2 and named in capsys.readouterr().err
