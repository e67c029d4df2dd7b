"""Metrics shared by training logs, evaluation output and plots; `METRIC_NAMES` is the key contract."""

from dictlearn.metrics.downstream import DownstreamMetrics
from dictlearn.metrics.recovery import max_cosine, mmcs, recovered_fraction
from dictlearn.metrics.reconstruction import ReconstructionMetrics
from dictlearn.metrics.sparsity import SparsityMetrics

RECONSTRUCTION_NAMES = ("mse", "fvu", "explained_variance", "cos_sim", "l2_ratio", "rel_reconstruction_bias")
SPARSITY_NAMES = ("l0", "l1", "dead_fraction", "dense_fraction")
RECOVERY_NAMES = ("mmcs",)
# Spliced-model (SPEC §3.8; `ce_loss_recovered_mean` is the mean-ablation variant) and
# interpretability (SPEC §5) metrics.
DOWNSTREAM_NAMES = (
    "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "ce_loss_recovered",
    "ce_loss_recovered_mean", "kl_div", "delta_ce",
    "probe_auc_k1", "probe_auc_k16", "probe_auc_linear", "concept_coverage",
)  # fmt: skip
METRIC_NAMES = RECONSTRUCTION_NAMES + SPARSITY_NAMES + RECOVERY_NAMES + DOWNSTREAM_NAMES

__all__ = [
    "DOWNSTREAM_NAMES",
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
