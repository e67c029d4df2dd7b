"""The interpretation keys of one evaluate record: probes and concept coverage of a dictionary.

    cache = ProbeCache()                                   # one per comparison: pools and baselines
    keys = interpretation(dictionary, "acts.h5", "transformer.h.2", HeldOutSplit(n_rows), cache)

Keys (docs/evaluate.md): ``probe_auc_k1``, ``probe_auc_k16``, ``probe_auc_linear`` (means over
the probed concepts of the test ROC-AUC at k = 1, k = 16 and of the full-width baseline, on the
same splits), ``concept_coverage``, ``concept_f1_mean`` (`dictlearn.metrics.coverage`),
``probes`` (per concept: ``k1`` ... ``k16``, ``linear``, the top latents, row counts, or
``skipped`` with the reason), ``concepts`` (per concept: the best latent, its F1, how many latents
own it) and ``interpret`` (rows used and where from, seconds). All null when the file has no
concept labels.

The linear baseline and the rows are computed once per file and input key (`ProbeCache`) and
reused for every dictionary, so a comparison of N dictionaries pays for N sparse probes and one
baseline per input.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dictlearn.data.h5 import H5Array
from dictlearn.data.split import HeldOutSplit
from dictlearn.errors import note
from dictlearn.metrics.coverage import ConceptCoverage
from dictlearn.metrics import INTERPRETATION_NAMES
from dictlearn.metrics.probes import ProbeOptions, ProbePool, linear_baseline, sparse_probes

INTERPRETATION_KEYS = INTERPRETATION_NAMES
DETAIL_KEYS = ("probes", "concepts", "interpret")
ROWS_PER_ENCODE = 8192


class ProbeCache:
    """Per file: the probe pool; per file and input key: its activations and the linear baseline."""

    def __init__(self, options: ProbeOptions = ProbeOptions()) -> None:
        self.options = options
        self._pools: dict[tuple, ProbePool | None] = {}
        self._inputs: dict[tuple, np.ndarray] = {}
        self._baselines: dict[tuple, tuple[dict, float]] = {}
        self._noted: set[str] = set()

    def pool(self, path: str, split: HeldOutSplit) -> ProbePool | None:
        key = (str(Path(path).resolve()), split)
        if key not in self._pools:
            self._pools[key] = ProbePool.draw(path, split, self.options)
        return self._pools[key]

    def inputs(self, path: str, input_key: str, split: HeldOutSplit) -> np.ndarray:
        """float32 [pool rows, d]: the pool's rows of dataset `input_key`."""
        key = (str(Path(path).resolve()), split, input_key)
        if key not in self._inputs:
            pool = self.pool(path, split)
            array = H5Array(path, input_key)
            try:
                self._inputs[key] = pool.read(array)
            finally:
                array.close()
        return self._inputs[key]

    def baseline(self, path: str, input_key: str, split: HeldOutSplit) -> tuple[dict, float]:
        """({concept: {"auc", "C"}}, seconds it took) of the full-width probe on `input_key`."""
        key = (str(Path(path).resolve()), split, input_key)
        if key not in self._baselines:
            started = time.perf_counter()
            result = linear_baseline(self.inputs(path, input_key, split), self.pool(path, split), self.options.seed)
            self._baselines[key] = (result, time.perf_counter() - started)
        return self._baselines[key]

    def note_once(self, path: str, message: str) -> None:
        if path not in self._noted:
            self._noted.add(path)
            note(message)


def null_keys() -> dict:
    return {k: None for k in INTERPRETATION_KEYS + DETAIL_KEYS}


def encode_rows(dictionary, x: np.ndarray, device: str) -> np.ndarray:
    """x: [n, d_in] -> latents float32 [n, d_sae], ROWS_PER_ENCODE rows at a time."""
    out = np.empty((len(x), dictionary.d_sae), np.float32)  # written in place: no concatenated copy
    with torch.no_grad():
        for start in range(0, len(x), ROWS_PER_ENCODE):
            rows = torch.from_numpy(x[start:start + ROWS_PER_ENCODE]).to(device)
            torch.from_numpy(out[start:start + len(rows)]).copy_(dictionary.encode(rows))
    return out


def interpretation(dictionary, path: str, input_key: str, split: HeldOutSplit, cache: ProbeCache,
                   device: str = "cpu") -> dict:
    """The interpretation keys of one dictionary on one file (all null without labels)."""
    started = time.perf_counter()
    pool = cache.pool(path, split)
    if pool is None:
        cache.note_once(path, f"{path} has no concept labels (or fewer than 2 labelled documents); probe and "
                        "coverage keys are null (harvest a Python corpus to get them)")
        return null_keys()
    baseline, baseline_seconds = cache.baseline(path, input_key, split)
    z = encode_rows(dictionary, cache.inputs(path, input_key, split), device)
    sparse = sparse_probes(z, pool, cache.options.ks)
    coverage = ConceptCoverage(dictionary.d_sae, len(pool.labels.names))
    coverage.update(torch.from_numpy(z[pool.coverage] > 0), torch.from_numpy(pool.labels.values[pool.coverage]))
    result = coverage.compute()
    probes = _probe_details(pool, sparse, baseline)
    return {
        **_means(sparse, baseline),
        "concept_coverage": result.concept_coverage(), "concept_f1_mean": result.concept_f1_mean(),
        "probes": probes, "concepts": result.per_concept(pool.labels.names),
        "interpret": {
            "rows": int(len(pool.rows)), "rows_source": pool.source, "drawn_rows": pool.drawn_rows,
            "coverage_rows": int(len(pool.coverage)),
            "documents": int(len(np.unique(pool.documents))), "test_documents": int(len(pool.test_documents)),
            "probed_concepts": len(pool.splits), "seconds": round(time.perf_counter() - started, 3),
            "baseline_seconds": round(baseline_seconds, 3),
        },
    }  # fmt: skip


def _probe_details(pool: ProbePool, sparse: dict, baseline: dict) -> dict:
    out = {}
    for name in pool.labels.names:
        if name in pool.skipped:
            out[name] = {"skipped": pool.skipped[name]}
            continue
        split = pool.splits[name]
        out[name] = {**{k: v for k, v in sparse[name].items() if k != "latents"},
                     "linear": baseline[name]["auc"], "linear_C": baseline[name]["C"],
                     "linear_se": baseline[name].get("se"),
                     "latents": sparse[name]["latents"], "n_train": int(len(split.train)),
                     "n_test": int(len(split.test))}
    return out


def _means(sparse: dict, baseline: dict) -> dict:
    """Means over the probed concepts; a k missing (k > d_sae) gives null."""
    def mean(values):
        return float(np.mean(values)) if values and all(v is not None for v in values) else None

    names = list(sparse)
    return {
        "probe_auc_k1": mean([sparse[n].get("k1") for n in names]),
        "probe_auc_k16": mean([sparse[n].get("k16") for n in names]),
        "probe_auc_linear": mean([baseline[n]["auc"] for n in names]),
    }
