"""Public names that load on first use (PEP 562), so importing a package costs nothing until a
name is used: `dictlearn --help` needs neither torch nor Lightning."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, public: dict[str, str],
                    more: Callable[[], Mapping[str, object]] | None = None) -> tuple[Callable, Callable]:
    """-> (`__getattr__`, `__dir__`) for `package`, whose names `public` maps to their modules.

    `more()` gives further classes by name, ones a registry knows (which no static table should
    repeat); it is called only for a capitalised name outside `public`, for `__all__` and for
    `dir()`, so `from package import submodule` never loads the registry."""

    def __getattr__(name: str):
        if name in public:
            value = getattr(importlib.import_module(public[name]), name)
        elif more is not None and name == "__all__":
            return sorted({*public, *more()})
        elif more is not None and name[:1].isupper() and name in (extra := more()):
            value = extra[name]
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # the next access skips __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public) | set(more() if more is not None else ()))

    return __getattr__, __dir__
