"""The package as installed: the repository's top-level recipes/ and analysis/ land inside it as
dictlearn.recipes and dictlearn.analysis (never as a top-level `analysis`), in a wheel and in an
editable install; a built wheel installed into a fresh venv and run from a folder that is not the
repository trains and exports (`dictlearn synth` + `dictlearn fit --config topk`) with the wheel's
own code, recipes and package data.

Nothing is downloaded: the fresh venv sees this venv's site-packages (torch, Lightning, ...)
through a `.pth` line written *after* dictlearn is installed, and a `.pth` line does not run the
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
from setuptools import find_packages

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
#: the folders at the repository root that install inside the package
MAPPED = {"dictlearn.analysis": "analysis", "dictlearn.recipes": "recipes"}


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command[:3]}... exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _source_copy(dest: Path) -> Path:
    """What the wheel is built from, copied so that the build writes nothing into the repository."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("dictlearn", *MAPPED.values()):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _site_packages(prefix: Path, kind: str = "purelib") -> Path:
    return Path(sysconfig.get_path(kind, vars={"base": str(prefix), "platbase": str(prefix)}))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _venv_with(tmp_path: Path, install: list[str], env: dict[str, str]) -> Path:
    """A fresh venv with dictlearn installed by `pip install --no-deps --no-index *install`, then
    given this venv's site-packages for the dependencies; -> its python."""
    prefix = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(prefix)
    python = prefix / "bin" / "python"
    # Installed before the .pth exists, so pip sees no other dictlearn and touches only this venv.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          *install], tmp_path, env)
    parents = dict.fromkeys(str(_site_packages(Path(sys.prefix), kind)) for kind in ("purelib", "platlib"))
    (_site_packages(prefix) / "_parent_site_packages.pth").write_text("".join(f"{path}\n" for path in parents))
    return python


def _where(python: Path, work: Path, env: dict[str, str]) -> dict[str, Path]:
    """Where dictlearn, its two mapped folders and its recipes resolve from `work`; a top-level
    `analysis` or `recipes` that imports is a failure."""
    probe = ("import importlib.util, json, dictlearn, dictlearn.analysis.report, dictlearn.recipes, dictlearn.cli as c\n"
             "assert importlib.util.find_spec('analysis') is None, 'a top-level analysis is installed'\n"
             "assert importlib.util.find_spec('recipes') is None, 'a top-level recipes is installed'\n"
             "print(json.dumps({'dictlearn': dictlearn.__file__, 'analysis': dictlearn.analysis.report.__file__,"
             " 'recipes': dictlearn.recipes.__file__, 'RECIPES_DIR': str(c.RECIPES_DIR)}))")
    return {k: Path(v).resolve() for k, v in json.loads(_run([str(python), "-c", probe], work, env)).items()}


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python 3.11+")
def test_every_package_folder_is_listed():
    """pyproject.toml lists the packages by hand (a mapped folder cannot be found): a new
    subpackage of dictlearn/ that is not listed would be missing from every install."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == MAPPED
    found = set(find_packages(str(REPO), include=["dictlearn", "dictlearn.*"]))
    found |= {f"{package}.{sub}" for package, folder in MAPPED.items()
              for sub in find_packages(str(REPO / folder))}
    assert set(tool["packages"]) == found | set(MAPPED)


@pytest.mark.slow
def test_editable_install_maps_the_root_folders_into_the_package(tmp_path):
    env = _clean_env()
    source, dist = _source_copy(tmp_path / "src"), tmp_path / "dist"
    # the wheel `pip install -e` would build (PEP 660), built by this venv's setuptools
    _run([sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_editable(sys.argv[1])", str(dist)],
         source, env)
    (wheel,) = dist.glob("dictlearn-*.whl")
    python = _venv_with(tmp_path, [str(wheel)], env)
    work = tmp_path / "work"
    work.mkdir()
    where = _where(python, work, env)
    assert where["analysis"] == source / "analysis" / "report.py"
    assert where["recipes"] == where["RECIPES_DIR"] / "__init__.py" == source / "recipes" / "__init__.py"
    assert where["dictlearn"] == source / "dictlearn" / "__init__.py"


@pytest.mark.slow
def test_wheel_installs_and_trains_from_outside_the_repository(tmp_path):
    env = _clean_env()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(_source_copy(tmp_path / "src"))], tmp_path, env)
    (wheel,) = dist.glob("dictlearn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"dictlearn/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    shipped |= {f"dictlearn/analysis/{p.name}" for p in (REPO / "analysis").glob("*.py")}
    shipped |= {"dictlearn/harvest/__init__.py", "dictlearn/models/tiny_stdlib/model.safetensors",
                "dictlearn/models/tiny_stdlib/config.json"}
    assert {"dictlearn/recipes/topk.yaml", "dictlearn/analysis/report.py"} <= shipped
    assert not shipped - names, f"missing from {wheel.name}: {sorted(shipped - names)}"
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"dictlearn", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}

    python = _venv_with(tmp_path, [str(wheel)], env)
    prefix = python.parent.parent
    work = tmp_path / "work"
    work.mkdir()
    where = _where(python, work, env)
    for path in where.values():
        assert path.is_relative_to(prefix.resolve()) and not path.is_relative_to(REPO)
    assert (where["RECIPES_DIR"] / "topk.yaml").is_file()
    assert where["analysis"].parent == where["dictlearn"].parent / "analysis"

    command = prefix / "bin" / "dictlearn"
    _run([str(command), "synth", "--out", "synth.h5", "--rows", "4096", "--d", "16", "--features", "32"], work, env)
    _run([str(command), "fit", "--config", "topk", "--data.path", "synth.h5", "--data.input_key", "acts",
          "--model.d_sae", "32", "--model.k", "4", "--data.batch_size", "256", "--trainer.max_steps", "5",
          "--trainer.default_root_dir", "RUNS", "--trainer.enable_progress_bar", "false"], work, env)
    (cfg,) = (work / "RUNS").rglob("export/cfg.json")
    assert (cfg.parent / "sae_weights.safetensors").is_file()
    config = json.loads(cfg.read_text())
    assert (config["architecture"], config["d_in"], config["d_sae"], config["k"]) == ("topk", 16, 32, 4)
