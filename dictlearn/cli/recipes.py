"""Where recipes live (package data, so an installed dictlearn has them) and how `--config` finds one."""

from __future__ import annotations

from pathlib import Path

import dictlearn.recipes

# the repository's recipes/ folder, installed as dictlearn.recipes (pyproject.toml package-dir)
RECIPES_DIR = Path(dictlearn.recipes.__file__).resolve().parent
BASE_RECIPE = RECIPES_DIR / "base.yaml"


def resolve_config(value: str) -> str:
    """A `--config` value -> a file path: an existing file as given; else a recipe by name
    (`topk`, `topk.yaml`) or by its documented path (`recipes/topk.yaml`) from the package."""
    if Path(value).is_file():
        return value
    name = Path(value).name
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    documented = Path(value).parent in (Path("."), Path("recipes"))
    if documented and (RECIPES_DIR / name).is_file():
        return str(RECIPES_DIR / name)
    from dictlearn.errors import ConfigError

    known = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base"))
    raise ConfigError(f"--config {value}: no such file or recipe; recipes (by name or file): {known} in {RECIPES_DIR}")
