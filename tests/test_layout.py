"""The architecture the folders show holds in the imports: the training core (app/) never
imports a study, models/ never imports Horovod, input_pipeline/ neither Horovod nor app/."""
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
