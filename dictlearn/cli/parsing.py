"""What every argparse front-end shares: usage errors as one line, and writable targets checked first."""

from __future__ import annotations

import argparse
import os
import tempfile
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


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """`check_writable_folder` for the folder a file will be written into."""
    check_writable_folder(Path(path).absolute().parent, flag, shown=path)
