"""What every argparse front-end shares: usage errors as one line, argument types that refuse what
cannot give a meaningful answer (empty paths, NaN, negative counts), and the checks every command
runs before any work: writable outputs that delete nothing of a person's, and a usable device.

Nothing here imports torch at module level: `dictlearn COMMAND --help` must stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from dictlearn.errors import ConfigError
from dictlearn.io import check_replaceable, check_writable_folder


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (argparse names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def count_or_all(text: str) -> int | str:
    """argparse type: a count > 0, written whole or as 2e5, or the word 'all'."""
    if text == "all":
        return text
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (200000, 2e5) or 'all', got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (seeds, counts where 0 means none)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def layer_list(text: str) -> str | list[int]:
    """argparse type: 'all' or comma-separated layer indices in increasing order ('0,2,3').

    Increasing order is required rather than sorted silently: the file's hooks, and a
    cross-layer transcoder's layers, are read in the order given.
    """
    if text.strip() == "all":
        return "all"
    try:
        layers = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or layer indices such as 0,1,3, got {text!r}") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0, got {text!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise argparse.ArgumentTypeError(f"layers must be given once each in increasing order (e.g. "
                                         f"{','.join(map(str, sorted(set(layers))))}), got {text!r}")
    return layers


def finite_float(text: str) -> float:
    """argparse type: a finite number; NaN and inf run but give NaN results."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def path_text(text: str) -> str:
    """argparse type: a non-empty path ('' would silently mean the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ConfigErrors (the CLI prints them, exit 2)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog.removeprefix('dictlearn ')}: {message}; see {self.prog} --help")


def check_output_folder(path: str | os.PathLike, flag: str, previous: Callable[[Path], bool] | None = None) -> None:
    """Before any work: a folder may be written at `path` (`dictlearn.io.check_replaceable`: new,
    empty or a previous output `previous` accepts) and its location is writable."""
    check_replaceable(path, previous, label=flag)
    check_writable_folder(Path(path).absolute().parent, flag, shown=path)


