"""Atomic file and folder writes: temp name in the same folder, fsync, `os.replace`.

Everything dictlearn writes for a user (checkpoints, exports, HDF5 files, results) goes through
here, so an interrupted write never leaves a file that looks whole under its final name.

Modes: what lands under the final name has the mode a plain `open`/`mkdir` would give under the
process umask (files 0666, folders 0777, less the umask), whatever the writer did: mkstemp and
mkdtemp create 0600/0700, and safetensors' `save_file` creates its files 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and move it into place.

    The caller writes a file at the yielded path by any means (h5py, torch.save, ...). On an
    exception the temporary file is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
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
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `final` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `final` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success fsync its contents (subfolders too)
    and move it into place.

    An existing folder at `final` is replaced only once the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
