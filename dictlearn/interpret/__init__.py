"""Interpretation: what a dictionary's latents mean, measured against known concepts.

The concept labels they use are made at harvest (dictlearn.harvest.labels: per-byte labels of
Python source from the stdlib `tokenize`) and read from the file (dictlearn.data.concepts).

- `probes`: sparse probes on a dictionary's top-k latents against logistic-regression probes on
  the raw activation (Kantamneni et al. 2025; Karvonen et al. 2025, SAEBench).
- `coverage`: a streaming count of "latent fires" against each label, giving every latent's best
  concept by F1 and `concept_coverage` / `concept_f1_mean`.
- `record`: the probe and coverage keys of one `dictlearn evaluate` record, with `ProbeCache`
  (the rows and the linear baseline, once per file and input).
- `dashboard`, `steer`, `splitting` and their helpers: feature dashboards, steering and feature
  splitting (`dictlearn inspect`, `dictlearn steer`); `families`: a size sweep's dashboards, one
  page per width, each card with its parent and children across sizes; see their docstrings.

Nothing is imported here, so importing one module stays light (no scikit-learn for the dashboards).
"""
