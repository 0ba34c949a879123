"""Every experiment is defined once: its defaults in the registry, and a flagfile that only
names it and says where its data and outputs are on this machine."""
import os

import pytest

from app.experiments import EXPERIMENTS
from conftest import REPO

CONFIGS = os.path.join(REPO, "configs")
MACHINE_FLAGS = {"data_dir", "model_dir"}


def flagfile(name):
    """{flag: value} of configs/NAME.cfg (comments and blank lines left out)."""
    with open(os.path.join(CONFIGS, f"{name}.cfg")) as lines:
        return dict(line.strip()[2:].split("=", 1) for line in lines
                    if line.strip() and not line.startswith("#"))


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_an_experiments_flagfile_names_it_and_sets_only_machine_paths(experiment):
    flags = flagfile(experiment)
    assert flags.pop("experiment") == experiment
    assert set(flags) <= MACHINE_FLAGS and "model_dir" in flags, flags


def test_every_flagfile_is_an_experiment_or_a_study():
    names = {name[:-4] for name in os.listdir(CONFIGS) if name.endswith(".cfg")}
    assert names - set(EXPERIMENTS) == {"gd_study"}
    assert flagfile("gd_study") == {"out_dir": "runs/gd_study"}
