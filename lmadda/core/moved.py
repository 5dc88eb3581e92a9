"""Modules that moved: importing an old name fails with the new place, not with a bare "No module named"."""

from __future__ import annotations

import importlib
import sys
from importlib.abc import MetaPathFinder
from typing import Callable, NoReturn


class MovedModuleFinder(MetaPathFinder):
    """Consulted last on `sys.meta_path`, so it only ever sees a module no file provides any more."""

    def __init__(self, moved: dict[str, str | tuple[str, ...]]):
        self.moved = moved

    def find_spec(self, fullname, path, target=None):
        if fullname in self.moved:
            new = self.moved[fullname]
            if isinstance(new, tuple):  # split in two by job: the name a user imports is in one of them
                raise ModuleNotFoundError(f"{fullname} moved to {' and '.join(new)}: import from the one that holds the name",
                                          name=fullname)
            raise ModuleNotFoundError(f"{fullname} moved to {new}: import from {new} instead", name=fullname)
        return None


def name_new_places(moved: dict[str, str | tuple[str, ...]]) -> None:
    """Register `moved` (old module -> new module, or the modules it was split into) once per process, however often
    the caller is re-imported."""
    if not any(isinstance(finder, MovedModuleFinder) and finder.moved == moved for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder(moved))


def names_moved_into(package: str, module: str) -> Callable[[str], NoReturn]:
    """The `__getattr__` of a package that was once the single module `module` is now part of: a name that module holds,
    imported from the package, fails with its new place; any other name is missing as usual."""
    def __getattr__(name: str) -> NoReturn:
        if not name.startswith("_") and hasattr(importlib.import_module(module), name):
            raise ImportError(f"{package}.{name} moved to {module}: from {module} import {name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
