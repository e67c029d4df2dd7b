"""Metrics shared by training logs, evaluation output and plots; `METRIC_NAMES` is the key contract."""

from dictlearn.metrics.downstream import DOWNSTREAM_KEYS, DownstreamMetrics
from dictlearn.metrics.recovery import max_cosine, mmcs, recovered_fraction
from dictlearn.metrics.reconstruction import ReconstructionMetrics
from dictlearn.metrics.sparsity import SparsityMetrics

RECONSTRUCTION_NAMES = ("mse", "fvu", "explained_variance", "cos_sim", "l2_ratio", "rel_reconstruction_bias")
SPARSITY_NAMES = ("l0", "l1", "dead_fraction", "dense_fraction")
RECOVERY_NAMES = ("mmcs",)
DOWNSTREAM_NAMES = DOWNSTREAM_KEYS  # what `DownstreamMetrics.compute` returns
# Keys reserved for the interpretability stage (concept probes, coverage): part of the results-key
# contract, but nothing in dictlearn computes them yet, so no results line holds them.
INTERPRETATION_NAMES = ("probe_auc_k1", "probe_auc_k16", "probe_auc_linear", "concept_coverage")
METRIC_NAMES = RECONSTRUCTION_NAMES + SPARSITY_NAMES + RECOVERY_NAMES + DOWNSTREAM_NAMES + INTERPRETATION_NAMES

__all__ = [
    "DOWNSTREAM_NAMES",
    "INTERPRETATION_NAMES",
    "METRIC_NAMES",
    "RECONSTRUCTION_NAMES",
    "RECOVERY_NAMES",
    "SPARSITY_NAMES",
    "DownstreamMetrics",
    "ReconstructionMetrics",
    "SparsityMetrics",
    "max_cosine",
    "mmcs",
    "recovered_fraction",
]
