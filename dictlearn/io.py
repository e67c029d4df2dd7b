"""Atomic file and folder writes: temp name in the same folder, fsync, `os.replace`.

Everything dictlearn writes for a user (checkpoints, exports, HDF5 files, results) goes through
here, so an interrupted write never leaves a file that looks whole under its final name.

Modes: what lands under the final name has the mode a plain `open`/`mkdir` would give under the
process umask (files 0666, folders 0777, less the umask), whatever the writer did: mkstemp and
mkdtemp create 0600/0700, and safetensors' `save_file` creates its files 0600.

What may be replaced: a file at the final name (the caller named it; `open(path, "w")` would
overwrite it too), a folder only when it is empty or the caller's `previous(folder)` says it is an
earlier output of the same writer (`check_replaceable`). Anything else (a folder in a file's place,
a folder holding a person's files) raises a one-line ConfigError before anything is written, and a
failed write also removes the parent folders it created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from dictlearn.errors import ConfigError


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entry table so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere set-and-restore, which for an
    instant leaves the umask at 0 for other threads."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool, umask: int | None = None) -> None:
    """Give `path` the mode a plain open/mkdir would have had (see the module docstring)."""
    umask = _umask() if umask is None else umask
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _finish_tree(root: Path) -> None:
    """Default modes for `root` and everything under it, then fsync it all, deepest first."""
    umask = _umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if path.is_symlink():  # chmod would change the link's target
                continue
            _chmod_default(path, directory=False, umask=umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _chmod_default(Path(folder), directory=True, umask=umask)
        fsync_dir(folder)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing ancestors. -> the ones created, deepest first (so a failed
    write can remove them and leave the disk as it found it)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; a folder someone wrote into meanwhile stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_replaceable(final: str | os.PathLike, previous: Callable[[Path], bool] | None = None,
                      label: str = "") -> None:
    """Raise a one-line ConfigError unless a folder may be written at `final`: nothing there, an
    empty folder, or a folder `previous` accepts as an earlier output of the same writer. `label`
    (a flag, e.g. "--out") starts the message."""
    final = Path(final)
    shown = f"{label} {final}" if label else str(final)
    if final == Path():  # "" and "." both: the working folder itself, never ours to replace
        raise ConfigError(f"{label or 'output folder'} {str(final)!r}: names the current folder itself; name a new "
                          "folder to write")
    if final.exists() and not final.is_dir():
        raise ConfigError(f"{shown}: a file is in the way of the folder; pass a new or empty folder, or remove it")
    if not final.is_dir() or not any(final.iterdir()) or (previous is not None and previous(final)):
        return
    names = sorted(p.name for p in final.iterdir())
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ConfigError(f"{shown}: folder holds files this would delete ({listed}) and is not a previous output of "
                      "this kind; pass a new or empty folder")


def _check_file_target(final: Path) -> None:
    if final.is_dir():
        raise ConfigError(f"{final}: is a folder; pass a file path (a new name, or one inside it)")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and move it into place.

    The caller writes a file at the yielded path by any means (h5py, torch.save, ...). On an
    exception the temporary file and any parent folder made for it are removed and `final` is
    left untouched. A folder at `final` is refused before anything is written.
    """
    final = Path(final)
    _check_file_target(final)
    made = _make_parents(final.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except BaseException:
        _remove_empty(made)
        raise
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _chmod_default(tmp, directory=False)  # after the write: a writer may have replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `final` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `final` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, previous: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success fsync its contents (subfolders too)
    and move it into place.

    An existing folder at `final` is replaced only once the new one is complete, and only when it
    is empty or `previous(folder)` accepts it as an earlier output of the same writer
    (`check_replaceable`, run before the caller writes anything and again before the swap).
    """
    final = Path(final)
    check_replaceable(final, previous)
    made = _make_parents(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield tmp
        _finish_tree(tmp)
        check_replaceable(final, previous)  # a person may have written into it meanwhile
        if final.exists():
            # a fresh name for the old folder: a fixed one could be a person's folder, and rename
            # onto an empty folder succeeds where onto a full one fails
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


# ----------------------------------------------------------------------------- before writing
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
