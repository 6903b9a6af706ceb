"""Import paths that moved keep working: ``adaptive_depth.demo`` is ``adaptive_depth.experiments.demo``, etc.

A meta path finder, consulted after the normal ones, answers an old name with the module at its new place
(the same module object, so attributes and monkeypatches are shared).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {f"adaptive_depth.{name}": f"adaptive_depth.experiments.{name}"
         for name in ("bench", "cli", "data", "demo", "paper", "train", "wrap_demo")}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
