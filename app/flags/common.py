"""What every concern's flags module uses: the flag values, a table's choices for a help text,
the FlagError of a flag's value, and the check of the flags a run cannot go without."""
import os
import tempfile

from absl import flags

from app.arithmetic import FlagError

FLAGS = flags.FLAGS


def choices(table):
    """A flag's help listing the choices of a table (name: entry with a description) with
    what each is."""
    return "; ".join(f"{name}: {table[name].description}" for name in sorted(table)) + "."


def invalid(name, reason):
    """The FlagError of --`name`'s value for `reason`."""
    return FlagError(name, FLAGS[name].value, reason)


def require(*names):
    """Raises FlagError for the first of the flags `names` that has no value."""
    for name in names:
        if FLAGS[name].value is None:
            raise invalid(name, "is required (the experiment sets no default)")


def writable(folder):
    """A run that could not save what it makes (its checkpoints, a data set's files) must
    not start: `folder`, or the nearest folder above it that exists, must take a file.
    Leaves nothing behind."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise flags.ValidationError(f"{existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise flags.ValidationError(
            f"{existing} is not writable ({error.strerror})") from None
    return True
