"""The package's layout: old flat module names still import (the same module) and warn with the new home; no import
circle among dinalrm's modules; every sub-package's exported names resolve."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dinalrm


PACKAGE = Path(dinalrm.__file__).resolve().parent


# Each old name imported in one new process (no old name imported before it; the new modules may be, as in a
# user's program): whether it is the new module, and the warnings its import gave.
FRESH_IMPORTS = """
import importlib, json, sys, warnings
results = {}
for old, new in json.loads(sys.argv[1]).items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    results[old] = {
        "same": module is importlib.import_module(new),
        "warnings": [f"{w.category.__name__}:{w.message}" for w in caught],
    }
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fresh_imports(warm_python) -> dict:
    done = subprocess.run(
        [warm_python, "-c", FRESH_IMPORTS, json.dumps(dinalrm.MOVED_MODULES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a new process imports every moved module: 5-20 s, outside the quick tier
@pytest.mark.parametrize("old,new", sorted(dinalrm.MOVED_MODULES.items()))
def test_old_module_name_warns_and_is_the_new_module(old, new, fresh_imports):
    assert fresh_imports[old]["same"]
    assert f"FutureWarning:`{old}` moved to `{new}`" in "|".join(fresh_imports[old]["warnings"])


def test_old_public_names_keep_working():
    from dinalrm.alignment.flow_sde import sde_step
    from dinalrm.alignment.rewards import flow_grpo_reward
    from dinalrm.data.preference import load_preference_dataset

    with pytest.warns(FutureWarning, match="dinalrm.alignment.rewards"):
        sys.modules.pop("dinalrm.rewards", None)
        from dinalrm.rewards import flow_grpo_reward as old_reward
    with pytest.warns(FutureWarning, match="dinalrm.alignment.flow_sde"):
        sys.modules.pop("dinalrm.flow_sde", None)
        from dinalrm.flow_sde import sde_step as old_step
    from dinalrm.data import load_preference_dataset as data_loader  # the data package: no warning, same function

    assert (old_reward, old_step, data_loader) == (flow_grpo_reward, sde_step, load_preference_dataset)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the dinalrm modules it imports anywhere in its body (function-level imports included: a circle
    hidden in a function is still a circle). A name imported from a sub-package resolves to the submodule that
    exports it, as the sub-package's lazy `__getattr__` does."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py") if not path.is_symlink()}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [(base, alias.name) for alias in node.names]
            else:
                continue
            for module, attribute in targets:
                if not module.startswith("dinalrm"):
                    continue
                candidate = f"{module}.{attribute}" if attribute else module
                if candidate in modules:
                    edges.add(candidate)
                elif module in modules and attribute and module != "dinalrm":
                    exported = importlib.import_module(module)
                    value = getattr(exported, attribute, None)
                    home = getattr(value, "__module__", None)
                    edges.add(home if home in modules else module)
                elif module in modules:
                    edges.add(module)
        edges.discard(name)
        edges.discard("dinalrm")  # the root only installs the old-name finder and holds constants
        graph[name] = {edge for edge in edges if edge != package or path.name != "__init__.py"}
    return graph


def test_no_import_circle_among_dinalrm_modules():
    graph = _import_graph()
    assert "dinalrm.serving.server" in graph and "dinalrm.alignment.sampling" in graph  # the walk found the package
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for edge in sorted(graph.get(module, ())):
            if state.get(edge) == "open":
                raise AssertionError(" -> ".join(path[path.index(edge) :] + [edge]))
            if edge not in state:
                visit(edge)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("package", ["data", "training", "alignment", "serving", "evaluation"])
def test_every_exported_name_resolves(package):
    module = importlib.import_module(f"dinalrm.{package}")
    missing = [name for name in module.__all__ if getattr(module, name, None) is None and name != "DEFAULT_MODEL"]
    assert not missing
