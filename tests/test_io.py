"""Atomic writes leave files with the permissions a plain write would give, and nothing behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from dictlearn.io import atomic_dir, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_modes_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "folder") == 0o755


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
