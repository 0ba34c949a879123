"""Every flag of app.train, how they are resolved and how they are checked. Each concern's flags
and their checks sit in a module of their own, each group defined by its own
define_*_flags() (as in the TF Model Garden, so that a tool defines only the groups it uses):
experiment (what trains on what, where its outputs go), recipe (batch, learning rate,
optimizer), data, distributed (Horovod and the kinds of parallelism), performance
(precision, threads, benchmark, monitoring) and stopping. This module puts them together.

Resolution follows the TF Model Garden: the experiment's registry defaults, then the
flagfile, then the command line (absl expands --flagfile in place, so a later command-line
flag overrides it). Everything is checked before Horovod starts or any data is read, but
what only the data or the built model shows, which app.train checks once they are there,
before any training; a bad value ends the process with one line naming the flag and the
reason, and exit code 2. Every rank parses the same arguments, so every rank exits the same
way and nothing hangs; only rank 0 prints the line. The arithmetic the flags feed is
app.arithmetic's.
"""
from app import horovod  # noqa: F401 (first: it sets TF_XLA_FLAGS)

from absl import flags

from app import cli
from app.arithmetic import FlagError
from app.flags import data, distributed, experiment, performance, recipe, stopping
from app.flags.common import FLAGS
from app.flags.data import load_options
from app.flags.experiment import check_extents
from app.flags.recipe import (batch_request, decay_epochs, preconditioner_settings,
                              scaled_learning_rate)

# In the order of the reference page and of the checks.
CONCERNS = (experiment, recipe, data, distributed, performance, stopping)
_GROUPS = {}  # each define_*_flags() docstring's first sentence: the flags it defines


def define_training_flags():
    """Every flag of app.train; the tools that take app.train's arguments (the reference
    runs, the pipeline check) define them all. Each group registers absl validators for the
    checks of its single flags."""
    if "experiment" in FLAGS:  # defined already in this process
        return
    for concern in CONCERNS:
        for define in concern.DEFINES:
            before = set(FLAGS)
            define()
            _GROUPS[" ".join(define.__doc__.split("\n\n")[0].split()).rstrip(".")] = sorted(
                set(FLAGS) - before)


def parser(check):
    """An absl flags_parser for app.run: parses, then calls `check(argv)`, which raises
    FlagError for a value that cannot run; any error ends the process with one line."""
    def parse(argv):
        try:
            remaining = FLAGS(argv)
            if FLAGS["verbosity"].using_default_value:  # else absl.app makes it INFO, and
                FLAGS.verbosity = -1  # TensorFlow logs each checkpoint's sharding on rank 0
            if len(remaining) > 1:
                raise flags.Error(f"unexpected arguments: {' '.join(remaining[1:])}")
            check(argv)
        except (flags.Error, FlagError) as error:
            cli.fail(error)
        return remaining
    return parse


def _check_training_flags(argv):
    """app.train's: the experiment's defaults where nothing else was given, then validate."""
    experiment.prefer_command_line_batch_flag(argv)
    experiment.apply_experiment_defaults()
    validate(cli.world_size_from_environment())


parse = parser(_check_training_flags)


def validate(world_size):
    """Raises FlagError for the first flag that cannot run with `world_size` processes (what
    depends on several flags, the experiment or the number of processes; the validators of
    each group check the single flags): each concern's checks in turn."""
    for concern in CONCERNS:
        concern.check(world_size)


def _training_flags():
    return [flag for concern in CONCERNS for flag in FLAGS.get_flags_for_module(concern)]


def resolved_flagfile():
    """A flagfile of every app.train flag that has a value: it reproduces the run."""
    lines = [flag.serialize() for flag in _training_flags()
             if flag.value is not None and flag.serialize()]
    return "\n".join(sorted(lines)) + "\n"


def values():
    """{name: value} of every app.train flag."""
    return {flag.name: flag.value for flag in _training_flags()}


def reference_page():
    """docs/flags.md: every flag of app.train by group, with the help and default that
    --helpfull prints (a test compares the two; `make flags-page` writes it)."""
    define_training_flags()
    lines = ["# Flags of app.train", "",
             "Generated from `app/flags/` by `make flags-page`; a test fails when this page "
             "and `python -m app.train --helpfull` disagree. Flags resolve as the TF Model "
             "Garden's do: the experiment's defaults (app/experiments.py), then the flagfile, "
             "then the command line. What the flags that matter at scale mean: "
             "[experiments.md](experiments.md).", ""]
    for group, names in _GROUPS.items():
        lines += [f"## {group}", "", "| flag | default | what it does |", "|---|---|---|"]
        for name in names:
            flag = FLAGS[name]
            default = "" if flag.default is None else f"`{flag.default_as_str}`"
            lines.append(f"| `--{name}` | {default} | {_cell(flag.help)} |")
        lines.append("")
    return "\n".join(lines)


def _cell(text):
    return " ".join(text.split()).replace("|", "\\|")


__all__ = ["FLAGS", "batch_request", "check_extents", "decay_epochs",
           "define_training_flags", "load_options", "parse", "parser",
           "preconditioner_settings", "reference_page", "resolved_flagfile",
           "scaled_learning_rate", "validate", "values"]
