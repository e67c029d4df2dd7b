"""SIGTERM/SIGINT during `dictlearn fit`: exit 128 + signal, an `interrupted-step=N.ckpt` that loads,
and a resume from it that finishes and exports (Lightning alone exits 0: docs/conventions.md#reliability).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", *extra,
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


def _run_all(commands: dict, cwd: Path, signal_when_logged: dict | None = None) -> dict:
    """Run the commands concurrently (2 cores: halves the wall time); each stderr goes to a file, not
    a pipe, which could fill and stall a run. `signal_when_logged[name] = (signum, metrics_csv)`
    sends `signum` once that run has logged steps. -> {name: (exit code, stderr)}."""
    procs, stderr_paths = {}, {}
    try:
        for name, command in commands.items():
            stderr_paths[name] = cwd / f"{name}.stderr"
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
    return {name: (codes[name], stderr_paths[name].read_text()) for name in procs}


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
