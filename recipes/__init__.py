"""The recipes: base.yaml (trainer, logging, data defaults) and one small YAML per architecture.

This folder sits at the repository root so `--config recipes/topk.yaml` is a file a user can open,
and is installed as `dictlearn.recipes` (pyproject.toml `package-dir`) so an installed dictlearn
finds `--config topk` from any folder. No code: the package exists to carry the YAML files.
"""
