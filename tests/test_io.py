"""Atomic writes leave files with the permissions a plain write would give, and nothing behind on failure."""

from __future__ import annotations

import io
import os
import stat
import sys

import pytest

from dictlearn.errors import ConfigError
from dictlearn.io import atomic_dir, atomic_path, atomic_write_text


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


def test_atomic_dir_replaces_only_empty_folders_and_previous_outputs(tmp_path):
    """A person's folder is never deleted by a write over it: refused before the body runs."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    ran = []
    with pytest.raises(ConfigError, match=r"mine: folder holds files this would delete \(notes.txt\)"):
        with atomic_dir(mine) as tmp:
            ran.append(tmp)
    assert ran == [] and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    # the writer's own earlier output (here: it holds only out.txt) is replaced whole
    with atomic_dir(mine, previous=lambda folder: (folder / "notes.txt").is_file()) as tmp:
        (tmp / "out.txt").write_text("new")
    assert [p.name for p in mine.iterdir()] == ["out.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no .old folder left
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ConfigError, match="a file is in the way"):
        with atomic_dir(tmp_path / "plain"):
            pass
    assert (tmp_path / "plain").read_text() == "x"


def test_atomic_path_refuses_a_folder_before_the_write(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        with atomic_path(tmp_path / "folder"):
            raise AssertionError("the body ran")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


@pytest.mark.parametrize("writer", ["file", "folder"])
def test_failed_writes_remove_the_parent_folders_they_made(tmp_path, writer):
    (tmp_path / "a").mkdir()
    final = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(RuntimeError):
        with (atomic_path(final) if writer == "file" else atomic_dir(final)):
            raise RuntimeError("write failed")
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["a"]  # a existed before


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_note_on_a_terminal_clears_the_progress_line_first(monkeypatch):
    """A progress line is drawn without its newline; a note printed after it must start a line of
    its own (the harvest's tokenize note used to be glued to the end of the bar)."""
    from dictlearn.errors import note

    terminal, log = _Terminal(), io.StringIO()
    terminal.write("harvest  42%|████      | 420k/1.0M")
    monkeypatch.setattr(sys, "stderr", terminal)
    note("3 of 530 Python files did not tokenize")
    assert terminal.getvalue().endswith("1.0M\r\033[Kdictlearn: note: 3 of 530 Python files did not tokenize\n")
    monkeypatch.setattr(sys, "stderr", log)
    note("x")
    assert log.getvalue() == "dictlearn: note: x\n"  # a log file gets no control characters
