"""Interpretation: what a dictionary's latents mean, for a person reading them.

The concept labels come from harvest (dictlearn.harvest.labels, per-byte labels of Python source
from the stdlib `tokenize`) and are read from the file (dictlearn.data.concepts); the concept
metrics that `dictlearn evaluate` reports (sparse probes, coverage) are in dictlearn.metrics
(probes.py, coverage.py, concepts.py).

- `dashboard`, `steer`, `splitting` and their helpers: feature dashboards, steering and feature
  splitting (`dictlearn inspect`, `dictlearn steer`); `families`: a size sweep's dashboards, one
  page per width, each card with its parent and children across sizes; see their docstrings.

Nothing is imported here, so importing one module stays light (no scikit-learn for the dashboards).
"""
