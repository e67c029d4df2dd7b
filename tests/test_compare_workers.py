"""`dictlearn compare --workers N`: the same files as one process, resume after a stop whatever N,
signals, a worker's one-line error, and no process left behind on any exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_cli_error

import dictlearn
from dictlearn.cli import main
from dictlearn.cli.compare import config_from_args
from dictlearn.compare import plan as plan_module
from dictlearn.compare.plan import CompareConfig

SRC_ROOT = str(Path(dictlearn.__file__).resolve().parents[1])
# The embedded model, harvested (so each worker builds its own downstream and probe caches): 2 seeds
# x 3 architectures x 2 L0 targets, 120 steps of 256 tokens (long enough to stop in the middle).
TINY = ["--tokens", "12000", "--train-tokens", "30720", "--batch-size", "256", "--d-sae", "32", "--l0", "4,8",
        "--seeds", "0,1", "--contexts", "2", "--architectures", "topk,relu_l1,topk_transcoder"]
# what may differ between two run folders holding the same comparison: paths and wall-clock seconds
PER_RUN = {"export", "source", "train_seconds", "log_dir"}


def _env() -> dict:
    pythonpath = os.pathsep.join(p for p in (SRC_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}  # one thread: bitwise comparable


# ------------------------------------------------------------------ the flag
def test_default_workers_one_per_seed_on_a_cpu(monkeypatch):
    monkeypatch.setattr(plan_module.os, "cpu_count", lambda: 2)
    assert CompareConfig(device="cpu").resolved().workers == 3  # three seeds, at most two per core
    assert CompareConfig(device="cpu", seeds=[0, 1, 2, 3, 4]).resolved().workers == 4
    assert CompareConfig(device="cuda").resolved().workers == 1
    assert CompareConfig(device="cpu", workers=1).resolved().workers == 1
    monkeypatch.setattr(plan_module.os, "cpu_count", lambda: 1)
    assert CompareConfig(device="cpu").resolved().workers == 1
    # a runtime setting: a run folder resumes with any number of workers
    assert CompareConfig(device="cpu", workers=3).resolved().identity() == CompareConfig(
        device="cpu", workers=1).resolved().identity()


@pytest.mark.parametrize("flags, words", [
    (["--workers", "0"], ["--workers 0", "positive"]),
    (["--workers", "2", "--devices", "2"], ["--workers 2", "--devices 2", "drop"]),
])  # fmt: skip
def test_bad_workers_is_one_line(small_file, tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    code = main(["compare", "--out", str(out), "--data", small_file, "--input-key", "acts", "--quiet", *flags])
    assert_one_line_cli_error(code, capsys, words, untouched=out)


# ------------------------------------------------------------------ end to end
def _children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found |= {int(p) for p in task.read_text().split()}
        except OSError:
            pass
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _Run:
    """`dictlearn compare --out OUT TINY ...` in a session of its own; remembers every child it had."""

    def __init__(self, out: Path, *flags: str) -> None:
        self.stderr_path = out.parent / f"{out.name}.{time.monotonic_ns()}.stderr"
        command = [sys.executable, "-m", "dictlearn.cli", "compare", "--out", str(out), *TINY, *flags]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                            start_new_session=True)
        self.children: set[int] = set()

    def wait_for(self, predicate, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.children |= _children(self.process.pid)
            assert self.process.poll() is None, f"ended early ({self.process.returncode}): {self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
        self.children |= _children(self.process.pid)

    def finish(self, timeout: float = 400.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            self.children |= _children(self.process.pid)
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
        deadline = time.monotonic() + 10  # the resource tracker ends once it reads the parent's exit
        while any(map(_running, self.children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in self.children if _running(p)], "a worker outlived the run"
        return self.process.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _checkpoint_steps(out: Path, label: str) -> list[int]:
    steps = []
    for path in (out / "train" / label / "checkpoints").glob("*.ckpt"):
        try:
            steps.append(int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]))
        except Exception:  # noqa: BLE001 - being renamed into place
            pass
    return steps


def _export_bytes(out: Path) -> dict[str, bytes]:
    """Every file of DIR/exports, the run folder's own path (the activation file's, in cfg.json) as DIR."""
    folder = out / "exports"
    return {str(p.relative_to(folder)): p.read_bytes().replace(str(out).encode(), b"DIR")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(out: Path) -> list[dict]:
    """results.jsonl without PER_RUN's keys and wall-clock seconds, the run folder's path as DIR."""

    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if not k.endswith("seconds")}
        return value

    lines = (out / "results.jsonl").read_text().replace(str(out), "DIR").splitlines()
    return [timeless({k: v for k, v in json.loads(line).items() if k not in PER_RUN}) for line in lines]


def _copy_start(one: Path, to: Path) -> None:
    """A run folder holding `one`'s comparison and its harvest, nothing trained."""
    to.mkdir()
    shutil.copy(one / "compare.yaml", to / "compare.yaml")
    shutil.copy(one / "activations.h5", to / "activations.h5")


@pytest.mark.slow
def test_two_workers_stopped_twice_and_resumed_equal_one_process(tmp_path):
    """One process against two workers killed by SIGTERM (the parent alone), resumed, stopped by
    Ctrl-C (SIGINT to the whole process group, as a terminal sends it), resumed again: the same
    exports, byte for byte, and the same results lines; no worker outlives any of the runs."""
    one, two = tmp_path / "one", tmp_path / "two"
    alone = _Run(one, "--workers", "1", "--quiet")
    alone.wait_for(lambda: (one / "activations.h5").is_file())
    _copy_start(one, two)

    first = _Run(two, "--workers", "2", "--quiet")
    first.wait_for(lambda: all(_checkpoint_steps(two, f"seed{s}") for s in (0, 1)))
    assert len(first.children) >= 2
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 143, first.stderr()[-3000:]
    assert "Traceback" not in first.stderr(), first.stderr()[-3000:]
    stopped = {s: max(_checkpoint_steps(two, f"seed{s}")) for s in (0, 1)}
    for s in (0, 1):
        assert list((two / "train" / f"seed{s}" / "checkpoints").glob("interrupted-step=*.ckpt")), s
    assert not (two / "exports").exists() or not list((two / "exports").iterdir())

    second = _Run(two, "--workers", "2")
    second.wait_for(lambda: all(max(_checkpoint_steps(two, f"seed{s}")) > stopped[s] for s in (0, 1)))
    os.killpg(second.process.pid, signal.SIGINT)
    assert second.finish() == 130, second.stderr()[-3000:]
    assert "Traceback" not in second.stderr(), second.stderr()[-3000:]
    for s in (0, 1):
        assert f"seed{s}: resuming from interrupted-step={stopped[s]}.ckpt" in second.stderr()

    # one seed's sweep may have ended before the Ctrl-C (the workers start unevenly): then the last
    # run has one sweep left to train and starts one worker for it (plan_workers)
    ended = {s for s in (0, 1) if list((two / "exports").glob(f"*_s{s}/cfg.json"))}
    last = _Run(two, "--workers", "2", "--quiet")
    assert last.finish() == 0, last.stderr()[-3000:]
    assert alone.finish() == 0, alone.stderr()[-3000:]
    assert _export_bytes(two) == _export_bytes(one)
    assert _records(two) == _records(one)
    timings = json.loads((two / "timings.json").read_text())["machine"]
    assert (timings["workers"], timings["threads_per_worker"]) == (1 if len(ended) == 1 else 2, 1)


@pytest.mark.slow
def test_a_workers_data_error_is_one_line_and_stops_the_others(tmp_path):
    """A checkpoint of another sweep in seed1's folder: that worker's DataError is the run's one
    line (exit 2), the other worker stops with its checkpoint, no worker is left."""
    data = tmp_path / "acts.h5"
    dictlearn.data.write_synth_file(data, n_rows=60_000, d=16, n_features=64, mean_active=4.0, seed=0)
    common = ["--data", str(data), "--input-key", "acts", "--architectures", "topk", "--l0", "4", "--d-sae", "32",
              "--batch-size", "256", "--no-downstream", "--no-interpret", "--quiet"]
    other, out = tmp_path / "other", tmp_path / "run"
    assert main(["compare", "--out", str(other), *common, "--seeds", "5", "--train-tokens", "2560"]) == 0
    flags = [*common, "--seeds", "0,1", "--train-tokens", "256000", "--workers", "2"]
    (out / "train" / "seed1" / "checkpoints").mkdir(parents=True)
    (out / "compare.yaml").write_text(config_from_args(["--out", str(out), *flags]).resolved().to_yaml())
    shutil.copy(other / "train" / "seed5" / "final.ckpt", out / "train" / "seed1" / "checkpoints" / "last.ckpt")
    command = [sys.executable, "-m", "dictlearn.cli", "compare", "--out", str(out), *flags]
    run = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = set()
    while run.poll() is None:
        children |= _children(run.pid)
        time.sleep(0.05)
    error = run.stderr.read().strip()
    assert run.returncode == 2, error[-3000:]
    assert len(error.splitlines()) == 1 and error.startswith("dictlearn: error: "), error[-3000:]
    assert "checkpoint holds dictionaries ['topk_l0-4_s5']" in error, error
    deadline = time.monotonic() + 10
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) >= 2 and not [p for p in children if _running(p)]
    assert not (out / "exports").exists() or not list((out / "exports").iterdir())
