"""Bad inputs to `dictlearn fit`: exit code 2, one `dictlearn: error:` line naming the culprit,
no traceback, and nothing left on disk (docs/conventions.md#reliability).

Each test writes its input file first, snapshots every path under `tmp_path`, runs the CLI
in-process with the working directory and `--trainer.default_root_dir` inside `tmp_path` (the
root does not exist yet, so the run must also remove the folders it made), then compares.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dictlearn.cli import RECIPES_DIR, main
from dictlearn.data import write_synth_file

ROWS, D = 20_000, 16
BLOCK = 512  # the datamodule's default block size


def _all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _write_h5(path: Path, array: np.ndarray, key: str = "acts") -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=array)
    return path


def _synth(path: Path) -> Path:
    write_synth_file(path, n_rows=ROWS, d=D, n_features=32, mean_active=3.0, seed=0)
    return path


def _fit_args(tmp_path: Path, data: Path, *extra: str, recipe: str = "topk.yaml", key: str = "acts") -> list[str]:
    args = [
        "fit", "--config", str(RECIPES_DIR / recipe), "--data.path", str(data), "--data.input_key", key,
        "--trainer.max_steps", "5", "--trainer.default_root_dir", str(tmp_path / "runs" / "one"),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--model.d_sae", "64", "--data.batch_size", "256",
    ]  # fmt: skip
    if recipe == "topk.yaml":
        args += ["--model.k", "4"]
    return args + list(extra)


def _run_expecting_error(tmp_path: Path, capsys, monkeypatch, args: list[str]) -> str:
    """Run the CLI; assert exit 2, one error line, no traceback, no new path. -> the message."""
    monkeypatch.chdir(tmp_path)  # anything written to the working directory is caught too
    before = _all_paths(tmp_path)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("dictlearn: error:")]
    assert code == 2, err
    assert len(error_lines) == 1, err
    assert "Traceback" not in err, err
    assert _all_paths(tmp_path) == before, f"left behind: {sorted(_all_paths(tmp_path) - before)}"
    return error_lines[0]


def test_d_in_disagreeing_with_file(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data, "--model.d_in", "7"))
    assert "--model.d_in" in line and "7" in line and f"width {D}" in line and "acts.h5" in line


@pytest.mark.parametrize("normalize", ["mean_norm_sqrt_d", "none"])
def test_nan_rows(tmp_path, capsys, monkeypatch, normalize):
    # One NaN row in every training block, so the first batch of any block order holds one (the
    # validation tail, the last block, stays clean).
    x = np.random.default_rng(0).standard_normal((ROWS, D)).astype(np.float32)
    x[7 : ROWS - BLOCK : BLOCK] = np.nan
    data = _write_h5(tmp_path / "nan_acts.h5", x)
    args = _fit_args(tmp_path, data, "--data.normalize", normalize)
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args).lower()
    # Caught on the sampled rows (data scale, b_dec init) before any step; the per-batch check
    # that guards later steps is tested in test_dictionaries.py.
    assert "nan" in line and "nan_acts.h5" in line and "'acts'" in line


def test_empty_dataset(tmp_path, capsys, monkeypatch):
    data = _write_h5(tmp_path / "empty.h5", np.zeros((0, D), np.float32))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "empty.h5" in line and "'acts'" in line and "(0, 16)" in line


def test_fewer_rows_than_one_batch(tmp_path, capsys, monkeypatch):
    data = _write_h5(tmp_path / "few.h5", np.ones((100, D), np.float32))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "few.h5" in line and "100 rows" in line and "--data.batch_size 256" in line


def test_truncated_file(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "cut.h5")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "cut.h5" in line and "truncated" in line


def test_missing_key_lists_available_keys(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data, key="resid"))
    assert "acts.h5" in line and "'resid'" in line and "'acts'" in line and "'features'" in line


def test_integer_data(tmp_path, capsys, monkeypatch):
    data = _write_h5(tmp_path / "ints.h5", np.arange(ROWS * D, dtype=np.int32).reshape(ROWS, D))
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, _fit_args(tmp_path, data))
    assert "ints.h5" in line and "'acts'" in line and "int32" in line


@pytest.mark.parametrize(
    ("recipe", "flag", "value"),
    [
        ("topk.yaml", "--model.k", "65"),  # > d_sae = 64
        ("topk.yaml", "--model.k", "0"),
        ("topk.yaml", "--model.auxk_alpha", "-0.5"),
        ("relu_l1.yaml", "--model.l1_coefficient", "-1.0"),
    ],
)
def test_model_argument_out_of_range(tmp_path, capsys, monkeypatch, recipe, flag, value):
    data = _synth(tmp_path / "acts.h5")
    args = _fit_args(tmp_path, data, flag, value, recipe=recipe)
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert line.startswith(f"dictlearn: error: {flag} ") and value in line
    assert "Union" not in line and "Namespace" not in line  # not jsonargparse's wrapper


def test_unknown_recipe(tmp_path, capsys, monkeypatch):
    data = _synth(tmp_path / "acts.h5")
    args = _fit_args(tmp_path, data)
    args[args.index("--config") + 1] = "recipes/nope.yaml"
    line = _run_expecting_error(tmp_path, capsys, monkeypatch, args)
    assert "--config recipes/nope.yaml" in line and "topk.yaml" in line and "relu_l1.yaml" in line
