"""The architecture the folders show holds in the imports: the training core (app/) never
imports a study, models/ never imports Horovod, input_pipeline/ neither Horovod, app/ nor
one of its commands (to_tfrecord)."""
import ast
import glob
import os

import pytest

from conftest import REPO


def imported_modules(path):
    """Every module a Python file imports, by its full dotted name."""
    with open(path) as source:
        tree = ast.parse(source.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(pattern):
    found = sorted(glob.glob(os.path.join(REPO, pattern)))
    assert found, pattern
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("app/*.py", ("app.studies",)),
    ("models/*.py", ("horovod", "app")),
    ("input_pipeline/*.py", ("horovod", "app")),
])
def test_no_folder_imports_what_it_must_not(folder, forbidden):
    for path in files(folder):
        wrong = {name for name in imported_modules(path)
                 if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)}
        assert not wrong, f"{os.path.relpath(path, REPO)} imports {sorted(wrong)}"


def test_the_studies_share_helpers_through_harness_not_through_each_other():
    studies = {os.path.basename(path)[:-3] for path in files("app/studies/*.py")}
    shared = {"harness", "figures", "__init__"}
    for path in files("app/studies/*.py"):
        others = {name.split(".")[2] for name in imported_modules(path)
                  if name.startswith("app.studies.") and name.split(".")[2] in studies}
        assert others <= shared, f"{os.path.relpath(path, REPO)} imports {sorted(others)}"


def test_no_module_of_input_pipeline_imports_one_of_its_commands():
    """A command (a module with a __main__ entry, such as to_tfrecord) may import the
    library; the library never imports a command (volumes took its shard writer from
    to_tfrecord, which imports volumes: a cycle)."""
    paths = files("input_pipeline/*.py")
    commands = set()
    for path in paths:
        with open(path) as source:
            if 'if __name__ == "__main__":' in source.read():
                commands.add(f"input_pipeline.{os.path.basename(path)[:-3]}")
    assert "input_pipeline.to_tfrecord" in commands
    for path in paths:
        wrong = imported_modules(path) & commands
        assert not wrong, f"{os.path.relpath(path, REPO)} imports {sorted(wrong)}"
