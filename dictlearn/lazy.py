"""Public names that load on first use (PEP 562), so importing a package costs nothing until a
name is used: `dictlearn --help` needs neither torch nor Lightning."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(package: str, public: dict[str, str]) -> tuple[Callable, Callable]:
    """-> (`__getattr__`, `__dir__`) for `package`, whose names `public` maps to their modules."""

    def __getattr__(name: str):
        if name in public:
            value = getattr(importlib.import_module(public[name]), name)
            setattr(sys.modules[package], name, value)  # the next access skips __getattr__
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
