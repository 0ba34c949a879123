"""`pip install -e .` (which `make` runs) gives a console script for every tool, and each
one's --helpfull documents every flag it takes."""
import configparser
import os
import re

import pytest

from app import flags as app_flags
from conftest import PYTHON, REPO, run

ABSL_PROGRAMS = {"hvd-train", "hvd-pipeline-check", "hvd-gd-study", "hvd-to-tfrecord",
                 "hvd-predict"}
PROJECT_MODULES = ("app.", "input_pipeline.")


def console_scripts():
    """{script: "module:function"} as setup.cfg declares them."""
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def absl_flags(help_text):
    """{module: {flag: help}} from absl's --helpfull output."""
    sections, module = {}, None
    for line in help_text.splitlines():
        if re.fullmatch(r"\S+:", line):
            module = sections.setdefault(line[:-1], {})
        elif module is not None and (match := re.match(r"  (?:-\S+,)?--(?:\[no\])?(\w+): ?(.*)",
                                                         line)):
            module[match[1]] = match[2]
    return sections


def argparse_options(help_text):
    """{option: help} from argparse's help: an option's help follows it on its line or
    on the more indented lines after it."""
    options, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            spec, _, text = line.strip().partition("  ")
            current = spec.split(",")[-1].split()[0]  # --help of "-h, --help"
            options[current] = text.strip()
        elif current and line.startswith("    ") and line.strip():
            options[current] += " " + line.strip()
    return options


def test_every_tool_has_a_console_script():
    scripts = console_scripts()
    assert set(scripts) == {"hvd-train", "hvd-launch", "hvd-to-tfrecord", "hvd-plot",
                            "hvd-scaling", "hvd-pipeline-check", "hvd-gd-study",
                            "hvd-batch-study", "hvd-scale-study", "hvd-imagenet-pipeline",
                            "hvd-predict"}
    for script in scripts:
        assert os.access(os.path.join(os.path.dirname(PYTHON), script), os.X_OK), script


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_helpfull_documents_every_flag(script):
    result = run([os.path.join(os.path.dirname(PYTHON), script), "--helpfull"], check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]  # absl's help exits with 1
    if script in ABSL_PROGRAMS:
        sections = absl_flags(result.stdout)
        own = {name: text for module, flags in sections.items()
               if module.startswith(PROJECT_MODULES) for name, text in flags.items()}
        assert own and all(text.strip() for text in own.values()), own
        if script == "hvd-train":
            app_flags.define_training_flags()
            assert set().union(*(flags for module, flags in sections.items()
                                 if module.startswith("app.flags."))) == set(app_flags.values())
    else:
        options = argparse_options(result.stdout)
        assert "--helpfull" in options and len(options) > 2, result.stdout
        assert all(text.strip() for text in options.values()), options
