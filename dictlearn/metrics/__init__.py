"""Metrics shared by training logs, evaluation output and plots; `METRIC_NAMES` is the key contract."""

from dictlearn.metrics.decoder_projection import L0_PROXY_KEYS
from dictlearn.metrics.downstream import DOWNSTREAM_KEYS, DownstreamMetrics
from dictlearn.metrics.jacobian import FAITHFULNESS_KEYS
from dictlearn.metrics.recovery import max_cosine, mmcs, recovered_fraction
from dictlearn.metrics.reconstruction import ReconstructionMetrics
from dictlearn.metrics.sparsity import SparsityMetrics

RECONSTRUCTION_NAMES = ("mse", "fvu", "explained_variance", "cos_sim", "l2_ratio", "rel_reconstruction_bias")
SPARSITY_NAMES = ("l0", "l1", "dead_fraction", "dense_fraction")
RECOVERY_NAMES = ("mmcs",)
# The L0 diagnostic of Chanin & Garriga-Alonso 2025 (decoder_projection.py): decoder + held-out rows.
L0_PROXY_NAMES = L0_PROXY_KEYS
DOWNSTREAM_NAMES = DOWNSTREAM_KEYS  # what `DownstreamMetrics.compute` returns
# The interpretability stage's keys (dictlearn.metrics.concepts: concept probes, coverage); null
# when the activation file carries no concept labels.
INTERPRETATION_NAMES = ("probe_auc_k1", "probe_auc_k16", "probe_auc_linear", "concept_coverage", "concept_f1_mean")
# Transcoder faithfulness (dictlearn.metrics.jacobian): null for SAEs and without a model.
FAITHFULNESS_NAMES = FAITHFULNESS_KEYS
METRIC_NAMES = (RECONSTRUCTION_NAMES + SPARSITY_NAMES + RECOVERY_NAMES + L0_PROXY_NAMES + DOWNSTREAM_NAMES
                + FAITHFULNESS_NAMES + INTERPRETATION_NAMES)

__all__ = [
    "DOWNSTREAM_NAMES",
    "FAITHFULNESS_NAMES",
    "INTERPRETATION_NAMES",
    "L0_PROXY_NAMES",
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
