"""The command line of every tool: argparse for those that are not absl programs (the
launcher, the studies); light, so that the launcher starts at once."""
import argparse
import os
import sys


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
