"""Import machinery shared by the package: lazy sub-package exports and the deprecated flat module names.

Sub-packages export their public names lazily (`lazy_exports`), so `import dinalrm.data` costs nothing until a
name is used and `dinalrm.cli --help` stays instant. The flat modules of release 0.1 (`dinalrm.rewards`,
`dinalrm.serve`, ...) moved into sub-packages; `MovedModules` keeps their old names importable for one release,
warning once with the new home. It is a meta-path finder rather than one shim file per old name, so no file is left
at an old path and every moved file keeps its history (git follows a rename only when the old path is gone).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]) -> tuple[Callable, Callable, list[str]]:
    """`(__getattr__, __dir__, __all__)` for `package` whose public names live in its submodules.

    `exports` maps a submodule name (relative to `package`) to the names it exports; a name is imported from its
    submodule on first access (PEP 562) and cached on the package.
    """
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__, sorted(home)


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds each old module name of `moves` (old -> new dotted name) as the new module, with a `FutureWarning`."""

    def __init__(self, moves: Mapping[str, str]):
        self.moves = dict(moves)

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in self.moves:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder module; `exec_module` puts the new module in its place

    def exec_module(self, module) -> None:
        old, new = module.__name__, self.moves[module.__name__]
        warnings.warn(
            f"`{old}` moved to `{new}`; import from there (the old name is removed in the next release).",
            FutureWarning,
            stacklevel=2,  # the importing line: `warnings` skips importlib's own frames
        )
        # The import system returns what sys.modules holds after exec_module, so the old name *is* the new module
        # (same objects, and monkeypatching either name patches both).
        sys.modules[old] = importlib.import_module(new)


def install_moved_modules(moves: Mapping[str, str]) -> None:
    """Registers `moves` once per interpreter (a reload of `dinalrm` does not stack finders)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules(moves))  # before editable-install finders that map old paths
