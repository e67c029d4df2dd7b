"""Sparse probes on a dictionary's top-k latents against linear probes on the raw activation.

The question (Kantamneni et al. 2025, "Are Sparse Autoencoders Useful? A Case Study in Sparse
Probing"; Karvonen et al. 2025, SAEBench; k-sparse probing: Gurnee et al. 2023, "Finding Neurons
in a Haystack"): for a known binary concept, how well does a logistic regression on the k
latents that best separate it do, next to one on the full activation?

    pool = ProbePool.draw("acts.h5", n_rows, HeldOutSplit(n_rows))    # once per file
    baseline = linear_baseline(x, pool)                                  # once per input key
    sparse = sparse_probes(z, pool)                                      # once per dictionary

**Rows** (`ProbePool`). Up to `ProbeOptions.pool_rows` rows as seeded whole blocks; only
labelled rows count. Only the rows some split uses, plus `coverage_rows` random ones for
coverage, are read and encoded (a few thousand per concept at most, whatever the file's size).
- A file that records held-out documents (`HeldOutSplit.kind == "documents"`, every harvested
  file): the blocks come from the training rows and the held-out rows; the **test side is the
  held-out documents' rows** and the training side the training documents' rows, so no document
  is on both and no test row was a dictionary's training row (source ``documents``).
- Otherwise (the tail split): the blocks come from the held-out tail, or from the whole file
  when the tail spans fewer than `min_documents` documents (the dictionaries never saw the
  labels, only the activations). Rows are grouped by document (`doc_index`; a file without one
  uses blocks of 512 rows): a seeded share of the documents (`test_fraction` of the rows) is the
  test side, the rest the training side, so no document is on both.

Per concept, positives and negatives are sampled in equal numbers on each
side (at most `per_class_train` / `per_class_test` each, Kantamneni et al.'s 1024 training
rows); a concept with fewer than `min_per_class` of either class on a side is skipped, with
the reason.

**Baseline** (`linear_baseline`): L2 logistic regression on the standardised activation; C
from `BASELINE_CS` by ROC-AUC on a single stratified hold-out of min(20 %, 100) training rows,
then refit on all of them (Kantamneni et al.'s `find_best_reg` for more than 128 rows).
**Sparse probes** (`sparse_probes`): latents ranked by |mean(positives) - mean(negatives)| on
the training rows (SAEBench; Kantamneni et al.), the top k standardised, L2 logistic regression
at C = 1 (SAEBench's fixed C; with k <= 16 features and ~1000 rows regularisation barely
matters, and a per-k search would cost a second per dictionary). Both report test ROC-AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from dictlearn.data.split import HeldOutSplit
from dictlearn.data.concepts import ConceptLabels, read_concept_labels
from dictlearn.metrics.bootstrap import BOOTSTRAP_SEED, N_BOOT, resample_counts

PROBE_KS = (1, 2, 4, 8, 16)
BASELINE_CS = tuple(float(c) for c in np.logspace(-3, 3, 7))
SPARSE_C = 1.0
PSEUDO_DOCUMENT_ROWS = 512  # rows per stand-in document in files without doc_index
MAX_ITER = 1000
NEWTON_FEATURES = 32  # probes on at most this many features are fitted by `newton_logistic`


@dataclass(frozen=True)
class ProbeOptions:
    """How many rows to probe on and how to split them (see the module docstring)."""

    pool_rows: int = 262144  # the whole default comparison file: rare concepts (`import`, 0.05 %) get rows
    coverage_rows: int = 16384
    per_class_train: int = 512
    per_class_test: int = 256
    min_per_class: int = 20
    test_fraction: float = 0.3
    min_documents: int = 6
    ks: tuple[int, ...] = PROBE_KS
    seed: int = 0


@dataclass
class ConceptSplit:
    """One concept's balanced rows: indices into the pool's rows and their labels."""

    train: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@dataclass
class ProbePool:
    """The rows of one file that probes and coverage use, and how they were drawn.

    rows: int [n] file rows (ascending) that some concept's split or the coverage sample uses;
    slices: the whole blocks they were drawn from (read block by block); documents: int [n];
    labels: the rows' concept labels; coverage: indices of the coverage sample (random labelled
    rows of the blocks, unbalanced); source: "documents", "heldout" or "all"; drawn_rows: labelled rows in
    the blocks; test_documents: the documents of the test side; splits/skipped: per concept, its
    balanced split or why it has none.
    """

    rows: np.ndarray
    slices: list[tuple[int, int]]
    documents: np.ndarray
    labels: ConceptLabels
    coverage: np.ndarray
    source: str
    drawn_rows: int
    test_documents: np.ndarray
    splits: dict[str, ConceptSplit] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def draw(cls, path: str | Path, split: HeldOutSplit, options: ProbeOptions = ProbeOptions()) -> ProbePool | None:
        """None when the file has no concept labels or fewer than 2 labelled documents."""
        if read_concept_labels(path, slice(0, 0)) is None:
            return None
        documents = _documents(path, split.n_rows)
        first, last = split.heldout
        source = "heldout"
        if split.kind == "documents":  # training rows, then the held-out documents' rows
            first, source = 0, "documents"
        elif len(np.unique(documents[first:last])) < options.min_documents:
            first, last, source = 0, split.n_rows, "all"
        slices = _blocks(first, last, options.pool_rows, options.seed)
        candidates = np.concatenate([np.arange(a, b) for a, b in slices])
        labels = read_concept_labels(path, candidates)
        candidates, values = candidates[labels.labelled], labels.values[labels.labelled]
        if len(np.unique(documents[candidates])) < 2:
            return None
        if source == "documents":
            is_test = candidates >= split.n_train
            if is_test.all() or not is_test.any():
                return None
            test_documents = np.unique(documents[candidates[is_test]])
        else:
            test_documents = _test_documents(documents[candidates], options.test_fraction, options.seed)
            is_test = np.isin(documents[candidates], test_documents)
        splits, skipped = {}, {}
        for j, name in enumerate(labels.names):
            outcome = _balanced(values[:, j], is_test, options, j)
            (skipped if isinstance(outcome, str) else splits)[name] = outcome
        rng = np.random.default_rng([options.seed, 16])
        coverage = np.sort(rng.permutation(len(candidates))[: options.coverage_rows])
        used = np.unique(np.concatenate([coverage, *[np.concatenate([s.train, s.test]) for s in splits.values()]]))
        for s in splits.values():  # indices into the used rows
            s.train, s.test = np.searchsorted(used, s.train), np.searchsorted(used, s.test)
        kept = ConceptLabels(labels.names, labels.parents, values[used], np.ones(len(used), bool), labels.attrs)
        return cls(candidates[used], slices, documents[candidates[used]], kept, np.searchsorted(used, coverage),
                   source, len(candidates), test_documents, splits, skipped)

    def read(self, array) -> np.ndarray:
        """float32 [n, d]: this pool's rows of an `H5Array`, read block by block."""
        parts = []
        for a, b in self.slices:
            inside = self.rows[(self.rows >= a) & (self.rows < b)]
            if len(inside):
                parts.append(array.read(a, b).numpy()[inside - a])
        return np.concatenate(parts)


def _documents(path: str | Path, n_rows: int) -> np.ndarray:
    """int [n_rows]: each row's document (`doc_index`), or its block of 512 rows without one."""
    with h5py.File(path, "r") as f:
        if "doc_index" in f and f["doc_index"].shape == (n_rows,):
            return f["doc_index"][()].astype(np.int64)
    return np.arange(n_rows, dtype=np.int64) // PSEUDO_DOCUMENT_ROWS


def _blocks(first: int, last: int, n_rows: int, seed: int, block: int = 512) -> list[tuple[int, int]]:
    """Up to `n_rows` rows of [first, last) as seeded whole blocks, in file order."""
    starts = np.arange(first, last, block)
    chosen = np.random.default_rng([seed, 13]).permutation(len(starts))[: math.ceil(n_rows / block)]
    return [(int(s), int(min(s + block, last))) for s in np.sort(starts[chosen])]


def _test_documents(documents: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The first documents of a seeded order whose share of the rows is closest to
    `test_fraction` (at least one document, never all)."""
    ids, counts = np.unique(documents, return_counts=True)
    order = np.random.default_rng([seed, 14]).permutation(len(ids))
    share = np.cumsum(counts[order])[:-1] / counts.sum()  # test = the first 1 .. len - 1 documents
    n_test = int(np.argmin(np.abs(share - test_fraction))) + 1
    return np.sort(ids[order[:n_test]])


def _balanced(y: np.ndarray, is_test: np.ndarray, options: ProbeOptions, stream: int) -> ConceptSplit | str:
    """Equal positives and negatives on each side, or the reason there are too few."""
    rng = np.random.default_rng([options.seed, 15, stream])
    sides = []
    for where, side, cap in (("training", ~is_test, options.per_class_train), ("test", is_test, options.per_class_test)):
        positives, negatives = np.flatnonzero(side & y), np.flatnonzero(side & ~y)
        n = min(len(positives), len(negatives), cap)
        if n < options.min_per_class:
            return (f"{len(positives)} positive and {len(negatives)} negative rows in the {where} documents, "
                    f"fewer than {options.min_per_class} of one class")
        chosen = np.concatenate([rng.choice(positives, n, replace=False), rng.choice(negatives, n, replace=False)])
        sides.append(np.sort(chosen))
    return ConceptSplit(sides[0], sides[1], y[sides[0]], y[sides[1]])


# ----------------------------------------------------------------------------- the regressions
def one_blas_thread():
    """BLAS on one thread for the regressions: their matrices are ~1000 x 128, too small to gain
    from threads, and OpenBLAS threads spinning on a loaded 2-core machine made the baseline
    12x slower (measured: 44 s against 3.6 s for 16 concepts)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, y)


def _auc(model, x: np.ndarray, y: np.ndarray) -> float:
    return roc_auc(model.decision_function(x), y)


def newton_logistic(x: np.ndarray, y: np.ndarray, c: float, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """x [n, f] float64, y [n] bool -> [f + 1] (weights, intercept): the minimiser of
    scikit-learn's L2 logistic objective ½‖w‖² + C Σ log(1 + exp(−s_i (x_i·w + b))), s = ±1,
    the intercept unpenalised, by Newton's method (halving a step that does not lower it).

    For the sparse probes' few features an [f + 1]² Newton system is solved in microseconds,
    where scikit-learn's lbfgs paid ~12 ms of set-up per fit (80 fits per dictionary), and it
    converges further (to `tol` in the step, lbfgs stops at 1e-4)."""
    from scipy.special import expit, log_expit

    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.r_[np.full(x.shape[1], 1.0 / c), 0.0]  # the objective divided by C
    sign, target = np.where(y, 1.0, -1.0), y.astype(np.float64)
    objective = lambda theta: -log_expit(sign * (design @ theta)).sum() + 0.5 * (penalty * theta**2).sum()
    theta = np.zeros(x.shape[1] + 1)
    current = objective(theta)
    for _ in range(max_iter):
        p = expit(design @ theta)
        gradient = design.T @ (p - target) + penalty * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        for _ in range(30):  # a full Newton step almost always lowers it; halve when not
            candidate = objective(theta - step)
            if candidate <= current:
                break
            step = step / 2
        theta, current = theta - step, candidate
        if np.abs(step).max() < tol:
            break
    return theta


def auc_se(scores: np.ndarray, y: np.ndarray, documents: np.ndarray, n_boot: int = N_BOOT,
           seed: int = BOOTSTRAP_SEED) -> float:
    """Bootstrap standard error of `roc_auc(scores, y)` over whole documents: scores [n], y [n]
    bool, documents [n] ids; NaN with fewer than 2 documents.

    The AUC is the share of (positive, negative) pairs ordered right, a tie counting half. A
    resample draws document a c_a times, which weights each pair of documents (a, b) by c_a c_b:
    with wins[a, b] the pairs' credit between a's positives and b's negatives, the resample's AUC
    is cᵀ·wins·c / ((c·positives)(c·negatives)), one small matrix product for all resamples
    (dictlearn.metrics.bootstrap's counts)."""
    ids, doc = np.unique(documents, return_inverse=True)
    if len(ids) < 2:
        return float("nan")
    y = y.astype(bool)
    pos, neg = scores[y], scores[~y]
    credit = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [n_pos, n_neg]
    one_hot = np.eye(len(ids))[doc]  # [n, documents]
    wins = one_hot[y].T @ credit @ one_hot[~y]  # [documents, documents]
    counts = resample_counts(len(ids), n_boot, seed).astype(np.float64)  # [n_boot, documents]
    with np.errstate(divide="ignore", invalid="ignore"):
        aucs = ((counts @ wins) * counts).sum(1) / ((counts @ one_hot[y].sum(0)) * (counts @ one_hot[~y].sum(0)))
    aucs = aucs[np.isfinite(aucs)]  # a resample without one of the classes has no AUC
    return float(aucs.std(ddof=1)) if len(aucs) > 1 else float("nan")


def roc_auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic with average ranks for ties (what
    `sklearn.metrics.roc_auc_score` computes, without its ~20 ms of input checks per call)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def select_c(x: np.ndarray, y: np.ndarray, cs: tuple[float, ...], seed: int) -> float:
    """C of best ROC-AUC on a stratified hold-out of min(20 %, 100) rows (Kantamneni et al.)."""
    from sklearn.model_selection import train_test_split

    n_val = max(2, min(int(0.2 * len(y)), 100))
    fit_x, val_x, fit_y, val_y = train_test_split(x, y, test_size=n_val, stratify=y, random_state=seed)
    scores = [_auc(_fit(fit_x, fit_y, c), val_x, val_y) for c in cs]
    return cs[int(np.argmax(scores))]


def probe_auc(features: np.ndarray, split: ConceptSplit, cs: tuple[float, ...], seed: int = 0,
              documents: np.ndarray | None = None) -> tuple[float, float, float | None]:
    """Test ROC-AUC of a logistic probe on `features` [pool rows, f] -> (auc, C used, its
    standard error over the test rows' documents, `documents` [pool rows]; None without them)."""
    train, test = _standardise(features[split.train].astype(np.float64), features[split.test].astype(np.float64))
    c = cs[0] if len(cs) == 1 else select_c(train, split.y_train, cs, seed)
    if train.shape[1] <= NEWTON_FEATURES:
        theta = newton_logistic(train, split.y_train, c)
        scores = test @ theta[:-1] + theta[-1]
    else:
        scores = _fit(train, split.y_train, c).decision_function(test)
    se = None if documents is None else auc_se(scores, split.y_test, documents[split.test])
    return roc_auc(scores, split.y_test), c, None if se is None or math.isnan(se) else se


def linear_baseline(x: np.ndarray, pool: ProbePool, seed: int = 0) -> dict[str, dict]:
    """x: [pool rows, d] raw activations -> {concept: {"auc", "C"}} of the full-width probe."""
    out = {}
    with one_blas_thread():
        for name, split in pool.splits.items():
            auc, c, se = probe_auc(x, split, BASELINE_CS, seed, pool.documents)
            out[name] = {"auc": auc, "C": c, "se": se}
    return out


def rank_latents(z: np.ndarray, split: ConceptSplit) -> np.ndarray:
    """Latents by |mean(positives) - mean(negatives)| on the training rows, largest first."""
    train, y = z[split.train], split.y_train
    difference = np.abs(train[y].mean(0) - train[~y].mean(0))
    return np.argsort(-difference, kind="stable")


def sparse_probes(z: np.ndarray, pool: ProbePool, ks: tuple[int, ...] = PROBE_KS) -> dict[str, dict]:
    """z: [pool rows, d_sae] latents -> {concept: {"k1": auc, ..., "latents": top max(k) ids}}.
    k larger than d_sae is left out."""
    ks = tuple(k for k in ks if k <= z.shape[1])
    out = {}
    with one_blas_thread():
        for name, split in pool.splits.items():
            order = rank_latents(z, split)[: max(ks)]
            rows = np.concatenate([split.train, split.test])  # only this concept's rows, top latents
            local = ConceptSplit(np.arange(len(split.train)), np.arange(len(split.train), len(rows)),
                                 split.y_train, split.y_test)
            features, documents = z[rows][:, order], pool.documents[rows]
            out[name] = {}
            for k in ks:
                auc, _, se = probe_auc(features[:, :k], local, (SPARSE_C,), documents=documents)
                out[name] |= {f"k{k}": auc, f"k{k}_se": se}
            out[name]["latents"] = order.tolist()
    return out
