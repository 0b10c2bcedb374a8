"""Every module of the repository imports: the package, the single-file Hub artefacts, the scripts, the evaluation,
example and benchmark recipes and the Space app. Cheap, so the quick tier (`-m "not slow"`) catches a broken import
in a module whose behaviour tests are all marked slow. Modules are found on disk, so new ones are covered unasked.
"""

import importlib
import importlib.util
import pkgutil
import sys

import pytest
from conftest import REPO_ROOT

import dinalrm


PACKAGE_MODULES = sorted(
    {name for _, name, _ in pkgutil.walk_packages(dinalrm.__path__, prefix="dinalrm.")} | {"dinalrm"}
)
SCRIPT_FOLDERS = ("", "scripts", "eval", "benchmarks", "space", *(f"examples/{p.name}" for p in (REPO_ROOT / "examples").iterdir() if p.is_dir()))  # fmt: skip
SCRIPT_FILES = sorted(
    str(path.relative_to(REPO_ROOT))
    for folder in SCRIPT_FOLDERS
    for path in (REPO_ROOT / folder).glob("*.py")
    if path.name != "conftest.py"
)


def test_every_module_is_found():
    assert "dinalrm.cli" in PACKAGE_MODULES and "modeling_dinalrm.py" in SCRIPT_FILES
    assert any(name.startswith("scripts/") for name in SCRIPT_FILES)


@pytest.mark.parametrize("name", PACKAGE_MODULES)
def test_package_module_imports(name):
    assert importlib.import_module(name).__name__ == name


@pytest.mark.parametrize("path", SCRIPT_FILES)
def test_script_module_imports(path):
    """Imported as a module (its `if __name__ == "__main__"` block does not run), with the folders conftest puts on
    sys.path, as a script started from its own folder would see them."""
    name = f"imported_{path.replace('/', '_')[:-3]}"
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pydantic look their module up there
    spec.loader.exec_module(module)
    assert module.__file__ == str(REPO_ROOT / path)
