"""`dictlearn fit` under DDP on CPU (2 gloo ranks): a clean exit, and validation metrics equal to
those of the final checkpoint evaluated in one process over the same held-out rows.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import dictlearn
from dictlearn.cli import RECIPES_DIR
from dictlearn.data import write_synth_file
from dictlearn.metrics import RECONSTRUCTION_NAMES, SPARSITY_NAMES, ReconstructionMetrics, SparsityMetrics

SRC_ROOT = str(Path(dictlearn.__file__).resolve().parents[1])  # the subprocess imports this dictlearn
D, D_SAE, K, BATCH, VAL_ROWS, STEPS = 16, 64, 4, 256, 1024, 30


def _fit_on_two_ranks(tmp: Path, config: Path, *flags: str, timeout: int = 240):
    """`dictlearn fit --config CONFIG` on a fresh synthetic file under 2 gloo ranks, validated at its
    last step. -> (data file, run folder, completed process)."""
    data = tmp / "acts.h5"
    write_synth_file(data, n_rows=20_000, d=D, n_features=32, mean_active=3.0, seed=0)
    command = [
        sys.executable, "-m", "dictlearn.cli", "fit", "--config", str(config),
        "--data.path", str(data), "--data.batch_size", str(BATCH), "--data.val_rows", str(VAL_ROWS),
        "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", *flags,
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (SRC_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    return data, tmp / "runs" / "lightning_logs" / "version_0", done


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """-> (data file, run folder, completed process) of a 2-rank fit validated at its last step."""
    return _fit_on_two_ranks(tmp_path_factory.mktemp("ddp"), RECIPES_DIR / "topk.yaml",
                             "--model.d_sae", str(D_SAE), "--model.k", str(K))


def _logged_val_metrics(metrics_csv: Path) -> tuple[int, dict[str, float]]:
    """The one row of metrics.csv holding val/* values -> (its step, {metric: value})."""
    with open(metrics_csv, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/mse")]
    assert len(rows) == 1, rows
    return int(rows[0]["step"]), {k[4:]: float(v) for k, v in rows[0].items() if k.startswith("val/")}


def _single_process_val_metrics(model, data: Path) -> tuple[dict[str, float], int]:
    """The same held-out rows through the same metric classes, in one process. -> (metrics, tokens)."""
    datamodule = dictlearn.ActivationDataModule(str(data), input_key="acts", batch_size=BATCH, val_rows=VAL_ROWS)
    recon, sparsity = ReconstructionMetrics(D), SparsityMetrics(D_SAE)
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            z = model.encode(x)
            recon.update(y, model.decode(z, x))
            sparsity.update(z)
    return {k: float(v) for k, v in {**recon.compute(), **sparsity.compute()}.items()}, int(recon.n_tokens)


@pytest.mark.slow
def test_ddp_fit_exits_cleanly(ddp_run):
    _, run, done = ddp_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called without an active exception" not in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (run / "export" / "cfg.json").is_file() and (run / "export" / "sae_weights.safetensors").is_file()
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == STEPS


@pytest.mark.slow
def test_ddp_val_metrics_match_single_process(ddp_run):
    data, run, done = ddp_run
    assert done.returncode == 0, done.stderr[-3000:]
    step, logged = _logged_val_metrics(run / "metrics.csv")
    assert step == STEPS - 1  # validation ran after the last training step
    assert set(logged) == set(RECONSTRUCTION_NAMES) | set(SPARSITY_NAMES)
    model = dictlearn.load(run / "checkpoints" / "last.ckpt")

    single, n_tokens = _single_process_val_metrics(model, data)
    assert n_tokens == VAL_ROWS  # every held-out row once
    for name, value in single.items():  # metrics.csv holds float32 values
        assert logged[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    # An independent float64 reference for a few of them, straight from the file's tail rows.
    with h5py.File(data, "r") as f:
        x = torch.from_numpy(f["acts"][-VAL_ROWS:])
    with torch.no_grad():
        z = model.encode(x)
        error = (x - model.decode(z, x)).double()
    x64 = x.double()
    reference = {
        "mse": error.square().sum(-1).mean(),
        "fvu": error.square().sum() / (x64 - x64.mean(0)).square().sum(),
        "l0": (z != 0).sum(-1).double().mean(),
        "dead_fraction": ((z != 0).sum(0) == 0).double().mean(),
    }
    for name, value in reference.items():
        assert logged[name] == pytest.approx(float(value), rel=1e-5, abs=1e-6), name


# ------------------------------------------------------------------ a sweep under DDP
SWEEP = f"""
sweep:
  topk:
    dictionary: {{class_path: dictlearn.TopKSAE, init_args: {{d_sae: {D_SAE}, k: {K}}}}}
  relu:
    dictionary: {{class_path: dictlearn.ReLUL1SAE, init_args: {{d_sae: {D_SAE}, l1_coefficient: 0.5}}}}
    seed: 1
"""


@pytest.fixture(scope="module")
def ddp_sweep_run(tmp_path_factory):
    """-> (data file, run folder, completed process) of a 2-rank sweep of two members."""
    tmp = tmp_path_factory.mktemp("ddp_sweep")
    (tmp / "sweep.yaml").write_text(SWEEP)
    return _fit_on_two_ranks(tmp, tmp / "sweep.yaml")


@pytest.mark.slow
def test_ddp_sweep_logs_each_members_single_process_metrics(ddp_sweep_run):
    data, run, done = ddp_sweep_run
    assert done.returncode == 0, done.stderr[-3000:]
    with open(run / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("topk/val/mse")]
    assert len(rows) == 1
    for name in ("topk", "relu"):
        assert (run / "exports" / name / "cfg.json").is_file()
        single, _ = _single_process_val_metrics(dictlearn.load(run / "checkpoints" / "last.ckpt", member=name), data)
        for metric, value in single.items():
            assert float(rows[0][f"{name}/val/{metric}"]) == pytest.approx(value, rel=1e-5, abs=1e-6), (name, metric)
