"""The command line of the tools that are not absl programs (the launcher, the studies,
app.plot); light, so that the launcher starts at once."""
import argparse


def argument_parser(module, description, epilog=None):
    """Defaults shown in the help, and --helpfull, as absl programs have."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--helpfull", action="help", help="show this help and exit")
    return parser
