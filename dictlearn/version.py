"""The installed dictlearn version, recorded in every file dictlearn writes (HDF5 attributes, cfg.json)."""

from __future__ import annotations

import importlib.metadata


def dictlearn_version() -> str:
    """The installed dictlearn version, or "0+unknown" when running from a source tree."""
    try:
        return importlib.metadata.version("dictlearn")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
