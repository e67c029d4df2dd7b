"""SIGTERM/SIGINT during `dictlearn fit`: exit 128 + signal, an `interrupted-step=N.ckpt` that loads,
and a resume from it that finishes and exports (Lightning alone exits 0: docs/conventions.md#reliability).
Ctrl-C before the run starts (while torch and Lightning import) exits 130 without a traceback.

The runs keep the progress display on, as users get it: SIGINT's run draws its bar on a
pseudo-terminal, SIGTERM's writes plain progress lines to a file (a progress callback with a
wrong hook signature once turned both signals into a TypeError traceback and exit 1).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

import dictlearn
from dictlearn.cli import RECIPES_DIR
from dictlearn.data import write_synth_file

# The subprocess imports the same dictlearn as this test (a checkout or the installed one).
SRC_ROOT = str(Path(dictlearn.__file__).resolve().parents[1])


def _fit_command(data: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dictlearn.cli", "fit", "--config", str(RECIPES_DIR / "topk.yaml"),
        "--data.path", str(data), "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", str(root),
        "--model.d_sae", "64", "--model.k", "4", "--data.batch_size", "256",
        "--trainer.log_every_n_steps", "1", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _wait_for_rows(proc: subprocess.Popen, metrics_csv: Path, stderr_path: Path) -> None:
    """Block until the fit has flushed logged training steps (CSVLogger: every 100 steps)."""
    deadline = time.monotonic() + 90
    while not (metrics_csv.is_file() and len(metrics_csv.read_text().splitlines()) > 1):
        assert proc.poll() is None, f"fit ended early ({proc.returncode}): {stderr_path.read_text()}"
        assert time.monotonic() < deadline, "training did not start within 90 s"
        time.sleep(0.2)


class _Terminal:
    """A pseudo-terminal (120 columns) for a child's stderr, drained into `path` by a thread
    (a full pty buffer would stall the child)."""

    def __init__(self, path: Path) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.path, self.chunks = path, []
        self.thread = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            self.chunks.append(chunk)

    def started(self) -> None:
        os.close(self.slave)  # the child holds its copy; EOF reaches the thread when it exits
        self.thread.start()

    def close(self) -> None:
        self.thread.join(timeout=10)
        os.close(self.master)
        self.path.write_bytes(b"".join(self.chunks))


def _run_all(commands: dict, cwd: Path, signal_when_logged: dict | None = None, terminal: tuple = ()) -> dict:
    """Run the commands concurrently (2 cores: halves the wall time); each stderr goes to a file, not
    a pipe, which could fill and stall a run, or for the names in `terminal` to a pseudo-terminal.
    `signal_when_logged[name] = (signum, metrics_csv)` sends `signum` once that run has logged steps.
    -> {name: (exit code, stderr)}."""
    procs, stderr_paths, terminals = {}, {}, {}
    try:
        for name, command in commands.items():
            stderr_paths[name] = cwd / f"{name}.stderr"
            if name in terminal:
                terminals[name] = _Terminal(stderr_paths[name])
                procs[name] = subprocess.Popen(
                    command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=terminals[name].slave
                )
                terminals[name].started()
                continue
            with open(stderr_paths[name], "w") as stderr:
                procs[name] = subprocess.Popen(
                    command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr
                )
        for name, (signum, metrics_csv) in (signal_when_logged or {}).items():
            _wait_for_rows(procs[name], metrics_csv, stderr_paths[name])
            procs[name].send_signal(signum)
        codes = {name: proc.wait(timeout=120) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for term in terminals.values():
            term.close()
    return {name: (codes[name], stderr_paths[name].read_text(errors="replace")) for name in procs}


def _logged_steps(metrics_csv: Path) -> list[int]:
    """The steps of the training rows (the final validation of a finished run logs one more row)."""
    lines = metrics_csv.read_text().splitlines()
    header = lines[0].split(",")
    step, loss = header.index("step"), header.index("train/loss")
    return [int(fields[step]) for fields in (line.split(",") for line in lines[1:]) if fields[loss]]


def _temp_files(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.endswith(".tmp")]


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    """Per signal: a fit stopped by it, then resumed from its checkpoint for 5 more steps.

    -> (folder, {signal name: (interrupted exit code, its stderr, checkpoint, resumed exit code, its stderr)}).
    """
    tmp = tmp_path_factory.mktemp("signals")
    data = tmp / "acts.h5"
    write_synth_file(data, n_rows=20_000, d=16, n_features=32, mean_active=3.0, seed=0)
    runs = {name: tmp / name / "lightning_logs" for name in SIGNALS}
    first = _run_all(
        {name: _fit_command(data, tmp / name, 100_000) for name in SIGNALS},
        tmp,
        {name: (signum, runs[name] / "version_0" / "metrics.csv") for name, signum in SIGNALS.items()},
        terminal=("SIGINT",),
    )
    checkpoints = {}
    for name in SIGNALS:
        found = sorted((runs[name] / "version_0" / "checkpoints").glob("interrupted-step=*.ckpt"))
        assert len(found) == 1, (name, found, first[name][1])
        checkpoints[name] = found[0]
    resume = {}
    for name, ckpt in checkpoints.items():
        step = int(re.fullmatch(r"interrupted-step=(\d+)\.ckpt", ckpt.name).group(1))
        resume[name] = _fit_command(data, tmp / name, step + 5, "--ckpt_path", str(ckpt))
    second = _run_all(resume, tmp)
    return tmp, {name: (*first[name], checkpoints[name], *second[name]) for name in SIGNALS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIGNALS))
def test_signal_checkpoints_and_resumes(interrupted_and_resumed, name):
    tmp, results = interrupted_and_resumed
    code, err, checkpoint, resumed_code, resumed_err = results[name]
    signum = SIGNALS[name]
    first, resumed = checkpoint.parents[1], checkpoint.parents[2] / "version_1"

    assert code == 128 + signum, err
    assert f"exiting {128 + signum}" in err and "Traceback" not in err, err
    if name == "SIGINT":  # the bar was on the terminal, and closed before the last line
        assert "dictlearn fit:" in err and "step/s" in err, err
        assert err.rstrip().splitlines()[-1] == "dictlearn: stopped by signal; checkpoint saved, exiting 130"
    step = int(re.fullmatch(r"interrupted-step=(\d+)\.ckpt", checkpoint.name).group(1))
    assert step > 0
    assert not (first / "export").exists()  # an interrupted run is not exported
    # Stopped at the end of a whole step: the checkpoint's step is the one in its name and the last
    # step logged was the one before it.
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == step
    assert max(_logged_steps(first / "metrics.csv")) == step - 1
    model = dictlearn.load(checkpoint)
    assert isinstance(model, dictlearn.TopKSAE) and (model.d_in, model.d_sae, model.k) == (16, 64, 4)
    assert bool(model.data_initialised) and all(torch.isfinite(p).all() for p in model.parameters())

    assert resumed_code == 0, resumed_err
    # went on from the checkpoint rather than restarting (a validation row may repeat a step)
    assert sorted(set(_logged_steps(resumed / "metrics.csv"))) == list(range(step, step + 5))
    last = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == step + 5
    exported = dictlearn.load(resumed / "export")
    x = torch.randn(8, 16)
    assert ((exported.encode(x) != 0).sum(-1) <= 4).all()
    assert _temp_files(tmp) == []


def test_ctrl_c_while_importing_exits_130_in_one_line():
    """SIGINT while Lightning is still importing (seconds on a small machine): `-X importtime`
    reports each import as it finishes, so the signal is sent once torch has imported and
    before the command could have started."""
    command = [sys.executable, "-X", "importtime", "-m", "dictlearn.cli", "fit", "--config", "topk", "--help"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if re.search(r"\|\s+torch$", line.rstrip()):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[1]
    err = [line for line in (*lines, *rest.splitlines()) if not line.startswith("import time:")]
    assert proc.returncode == 130, "".join(err)
    assert not any("Traceback" in line for line in err), "".join(err)
    assert [line.strip() for line in err if line.strip()] == ["dictlearn: interrupted; fit did not finish"]


def test_ctrl_c_in_any_command_before_it_handles_signals(monkeypatch, capsys):
    from dictlearn import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["harvest", "--out", "x.h5"]) == 130
    assert capsys.readouterr().err == "dictlearn: interrupted; harvest did not finish\n"
