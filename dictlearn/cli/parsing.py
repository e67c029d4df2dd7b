"""What every argparse front-end shares: usage errors as one line, argument types that refuse what
cannot give a meaningful answer (empty paths, NaN, negative counts), and the checks every command
runs before any work: writable outputs that delete nothing of a person's, and a usable device.

Nothing here imports torch at module level: `dictlearn COMMAND --help` must stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dictlearn.errors import ConfigError


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


def check_writable_folder(folder: str | os.PathLike, flag: str, shown: str | os.PathLike | None = None) -> None:
    """Raise a one-line ConfigError, before any work, when `folder` (or the nearest ancestor that
    exists, where it would be created) cannot take a new file; the message names `shown` (the
    flag's value) or the folder."""
    folder_shown = folder if shown is None else shown
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {folder_shown}: {existing} is a file, not a folder; pick another location")
    try:  # a real write: os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"{flag} {folder_shown}: cannot write in {existing} ({error.strerror}); pick a writable location") from None


def check_writable_file(path: str | os.PathLike, flag: str, example: str = "out") -> None:
    """`check_writable_folder` for the folder a file will be written into, after refusing an empty
    path and a folder at `path` (overwriting a file the user named is what they asked for;
    a folder is never replaced by a file). `example`: a file name to suggest inside that folder."""
    if not str(path).strip():
        raise ConfigError(f"{flag}: empty path; pass a file path such as {example}")
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; pass a file path such as {Path(path) / example}")
    check_writable_folder(Path(path).absolute().parent, flag, shown=path)


def check_output_folder(path: str | os.PathLike, flag: str, previous: Callable[[Path], bool] | None = None) -> None:
    """Before any work: a folder may be written at `path` (`dictlearn.io.check_replaceable`: new,
    empty or a previous output `previous` accepts) and its location is writable."""
    from dictlearn.io import check_replaceable

    check_replaceable(path, previous, label=flag)
    check_writable_folder(Path(path).absolute().parent, flag, shown=path)


def check_device(device: str, flag: str = "--device", allow_auto: bool = False) -> None:
    """Before any work: `device` names a torch device this machine has ("auto" where `allow_auto`).
    Imports torch, so call it after parsing."""
    if allow_auto and device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        choices = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
        raise ConfigError(f"{flag} {device!r}: not a torch device; use {choices}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{flag} {device}: no CUDA GPU is available here (torch {torch.__version__}"
                              f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{flag} {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{flag} {device}: dictlearn runs on cpu, cuda or mps; use one of them")
