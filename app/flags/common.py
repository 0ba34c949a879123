"""What every concern's flags module uses: the flag values, a table's choices for a help text,
the FlagError of a flag's value, and the check of the flags a run cannot go without."""
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
