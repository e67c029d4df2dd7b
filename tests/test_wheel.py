"""A built wheel works on its own: installed non-editably into a fresh venv, run from a folder that
is not the repository, `dictlearn synth` + `dictlearn fit --config topk` train and export with the
wheel's own code, recipes and package data.

Nothing is downloaded: the fresh venv sees this venv's site-packages (torch, Lightning, ...)
through a `.pth` line written *after* the wheel is installed, and a `.pth` line does not run the
`.pth` files inside the folder it adds, so this venv's editable dictlearn finder stays inactive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command[:3]}... exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _source_copy(dest: Path) -> Path:
    """What the wheel is built from, copied so that the build writes nothing into the repository."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("dictlearn", "analysis"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _site_packages(prefix: Path, kind: str = "purelib") -> Path:
    return Path(sysconfig.get_path(kind, vars={"base": str(prefix), "platbase": str(prefix)}))


def test_wheel_installs_and_trains_from_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(_source_copy(tmp_path / "src"))], tmp_path, env)
    (wheel,) = dist.glob("dictlearn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("dictlearn/recipes/topk.yaml", "dictlearn/recipes/base.yaml", "dictlearn/harvest/__init__.py",
                   "dictlearn/models/tiny_stdlib/model.safetensors", "dictlearn/models/tiny_stdlib/config.json"):
        assert member in names, f"{member} missing from {wheel.name}"

    prefix = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(prefix)
    python = prefix / "bin" / "python"
    # Installed before the .pth exists, so pip sees no other dictlearn and touches only this venv.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, env)
    parents = dict.fromkeys(str(_site_packages(Path(sys.prefix), kind)) for kind in ("purelib", "platlib"))
    (_site_packages(prefix) / "_parent_site_packages.pth").write_text("".join(f"{path}\n" for path in parents))

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(python), "-c", "import dictlearn, dictlearn.cli as c; print(dictlearn.__file__);"
                  " print(c.RECIPES_DIR)"], work, env).split()
    package, recipes = Path(where[0]).resolve(), Path(where[1]).resolve()
    assert not package.is_relative_to(REPO) and package.is_relative_to(prefix.resolve())
    assert recipes.is_relative_to(prefix.resolve()) and (recipes / "topk.yaml").is_file()

    command = prefix / "bin" / "dictlearn"
    _run([str(command), "synth", "--out", "synth.h5", "--rows", "4096", "--d", "16", "--features", "32"], work, env)
    _run([str(command), "fit", "--config", "topk", "--data.path", "synth.h5", "--data.input_key", "acts",
          "--model.d_sae", "32", "--model.k", "4", "--data.batch_size", "256", "--trainer.max_steps", "5",
          "--trainer.default_root_dir", "RUNS", "--trainer.enable_progress_bar", "false"], work, env)
    (cfg,) = (work / "RUNS").rglob("export/cfg.json")
    assert (cfg.parent / "sae_weights.safetensors").is_file()
    config = json.loads(cfg.read_text())
    assert (config["architecture"], config["d_in"], config["d_sae"], config["k"]) == ("topk", 16, 32, 4)
