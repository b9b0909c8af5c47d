"""Names a package exports but imports on first use, so that importing the package stays cheap (`import openalign`
loads no torch; the command line reads serve's limits without loading the server)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module-level __getattr__ for package: exports maps each public name to the module that defines it."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
