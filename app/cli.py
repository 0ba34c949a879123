"""What every tool shares on its command line: the one-line error and warning under one
program name, the exit codes, the rank and size the launcher set, and argparse for the tools
that are not absl programs (the launcher, the studies). Light (no TensorFlow), so that the
launcher starts at once and a bad flag is refused before TensorFlow loads."""
import argparse
import os
import sys
import time

USAGE_ERROR = 2  # a flag or file that cannot run: refused before any work
RUN_ERROR = 1  # a run that failed on its way (damaged data, a full disk, divergence)
PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal, checkpointed; run again
# How a RUN_ERROR line of a diverged run begins (after "error: "): the studies tell it apart
DIVERGED = "the loss became"


def argument_parser(module, description, epilog=None):
    """Defaults shown in the help, and --helpfull, as absl programs have."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--helpfull", action="help", help="show this help and exit")
    return parser


def program():
    """The running tool as the user named it: `python -m`'s module, or the console script
    (hvd-train, ...)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec else os.path.basename(sys.argv[0])


def error_line(message):
    """`PROGRAM: error: MESSAGE`, the form of every error the tools print."""
    return f"{program()}: error: {message}"


SILENT_RANKS_WAIT_SECONDS = 2.0


def fail(message, code=USAGE_ERROR, this_rank_only=False):
    """Ends this process with `code` after one line on stderr, printed by rank 0 for what
    every rank finds alike, or by this rank for what only it met (`this_rank_only`). The
    other ranks exit a moment later: the launcher ends every rank when the first one exits,
    which must not be before rank 0 has said why."""
    if this_rank_only or rank_from_environment() == 0:
        print(error_line(message), file=sys.stderr, flush=True)
    elif world_size_from_environment() > 1:
        time.sleep(SILENT_RANKS_WAIT_SECONDS)
    sys.exit(code)


def warn(message):
    """`PROGRAM: warning: MESSAGE` on stderr (the caller decides which ranks warn)."""
    print(f"{program()}: warning: {message}", file=sys.stderr, flush=True)


def first_line(error):
    """An exception's first line: TensorFlow's and Horovod's messages go on for pages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def rank_from_environment():
    """This process's rank as the launcher set it (0 for a lone process)."""
    rank = _set_by_launcher("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    return 0 if rank is None else rank


def world_size_from_environment():
    """The number of processes the launcher started (mpirun, horovodrun, srun, MPICH's
    hydra), read from its environment so that flags are checked before Horovod starts."""
    slurm_step = ("SLURM_NTASKS",) if "SLURM_STEP_ID" in os.environ else ()
    size = _set_by_launcher("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", *slurm_step)
    return 1 if size is None else size


def gloo_from_environment():
    """Whether the launcher started this process under Horovod's Gloo controller
    (horovodrun's default) rather than MPI."""
    return "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ


def _set_by_launcher(*variables):
    """The first of the environment `variables` holding a whole number, None if none does."""
    for variable in variables:
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return None
