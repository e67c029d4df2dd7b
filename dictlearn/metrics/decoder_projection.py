"""The L0 diagnostic of Chanin & Garriga-Alonso 2025 ("Sparse but Wrong: Incorrect L0 Leads to
Incorrect Features in Sparse Autoencoders", arXiv 2508.16560; docs/metrics.md, "Which L0?").

The paper's argument: below the data's true L0 a dictionary hedges, mixing components of frequent
correlated features into many latents, so an input projects onto decoder directions of latents
that should stay silent; near the true L0 those projections are small. Its proxy, the **nth
decoder projection score** s_n^dec, reads that off the decoder and held-out activations:

    P = (y − b_dec) Ŵ_decᵀ        y: [B, d_out] held-out rows, Ŵ_dec: [d_sae, d_out] decoder rows
    s_n^dec = the (n·B)-th largest of the B·d_sae entries of P (counting from 0)

so that on average n projections per row lie above it. Definition as in the authors' reference
code (github.com/chanind/sparse-but-wrong-paper, `nth_decoder_projection`: flatten, sort
descending, index n·B; averaged over batches of 4096 tokens).

Our choices where the code leaves freedom (docs/metrics.md):
- Ŵ_dec has unit rows: the authors' SAEs keep unit-norm decoders, and an export with the input
  normalisation folded in does not; a row's norm must not decide its rank.
- y is what the decoder writes: the input for an SAE, the target for a transcoder, and the target
  minus the affine skip x W_skipᵀ for a skip transcoder.
- blocks of at most `BLOCK_ROWS` = 4096 rows (the authors' batch); the score is the mean over
  blocks weighted by their rows.
- n = round(d_sae / 4) by default (`default_n`), recorded as `nth_decoder_projection`; beside it,
  from the same projections, n = round(d_sae / 8) and round(d_sae / 2)
  (`nth_decoder_projection_eighth`, `nth_decoder_projection_half`), because the reading depends on
  n (below) and a scan should show whether it does on its data. The authors use n = 12,000 for d_sae = 32,768
  on Gemma ("anything less than ~d_sae/2 seems to work") and, in their toy model (d_sae 50, true
  L0 11, BatchTopK at every integer k, five seeds), plot n = 12 ... 25 (0.24 ... 0.5 of d_sae) and
  read the minimum by eye. A quarter is the low end of that range and is fitted to our synthetic
  ground truth (tests/test_l0_ground_truth.py): there BatchTopK's minimum falls at or near the
  smallest k for n >= 5/16 d_sae and at or near the largest for n <= d_sae / 6, on three seeds
  (docs/metrics.md, "How n decides"); on the authors' own toy data rebuilt, d_sae / 4 = 12 reads
  11.4 against a true 10.95 ("At three n"). It has to stay fixed across the L0s compared.
- The three n cost one projection and, per rank, two comparison passes and a selection among the
  few values between brackets placed by a sorted sample (`_order_statistic`: the exact order
  statistic, 3.4x faster than one `np.partition` with the three ranks, itself 1.3-1.5x one rank,
  where `torch.topk` of the largest d_sae/2 or three `kthvalue`s cost 1.9-2.8x;
  benchmarks/l0_proxy_cost.py, under load).

Also `decoder_pairwise_cosine`, the mean |cos| over pairs of decoder rows, which the same
repository computes as an alternative ("Decoder Pairwise Cosine Similarity"; no data needed).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_ROWS = 4096
N_FRACTION = 1 / 4
#: the other n read from the same projections: result key -> fraction of d_sae (additions of
#: 2026-12-07; older results lack them)
OTHER_N = {"nth_decoder_projection_eighth": 1 / 8, "nth_decoder_projection_half": 1 / 2}
L0_PROXY_KEYS = ("nth_decoder_projection", "nth_decoder_projection_n", "decoder_pairwise_cosine", *OTHER_N)


def default_n(d_sae: int, fraction: float = N_FRACTION) -> int:
    """n of s_n^dec for a dictionary of d_sae latents: round(fraction · d_sae), at least 1, below d_sae."""
    return max(1, min(d_sae - 1, round(fraction * d_sae)))


def nth_projections(residual: Tensor, unit_decoder: Tensor, ns: list[int]) -> list[float]:
    """residual: [B, d_out] (y − b_dec), unit_decoder: [d_sae, d_out] -> for each n of `ns` the
    (n·B)-th largest of the B·d_sae projections (0-based), i.e. the B·(d_sae − n)-th smallest
    (1-based); one projection, one sorted sample and one bracketed selection per rank."""
    projections = (residual @ unit_decoder.T).flatten().float().cpu().numpy()
    rows, d_sae = len(residual), unit_decoder.shape[0]
    ks = [rows * (d_sae - n) - 1 for n in ns]  # 0-based
    sample = _sorted_sample(projections)
    found = {k: _order_statistic(projections, k, sample) for k in set(ks)}
    return [float(found[k]) for k in ks]


SAMPLE = 16384  # sorted values that place each rank's bracket


def _sorted_sample(values: np.ndarray) -> np.ndarray:
    """`SAMPLE` of `values` [N] at seeded random positions, sorted. Not a stride: the values are a
    flattened [rows, d_sae] block, and a stride that divides d_sae sees only a few latents."""
    if values.size <= SAMPLE:
        return np.sort(values)
    return np.sort(values[np.random.default_rng(0).integers(0, values.size, SAMPLE)])


def _order_statistic(values: np.ndarray, k: int, sample: np.ndarray) -> np.floating:
    """values: [N] -> its k-th smallest (0-based), exactly `np.partition(values, k)[k]` (NaN counts
    as largest): from the values between two brackets around it (`_bracketed`), else from a
    partition of them all. A [4096, 512] block's three ranks: 9 ms against 31 ms for one
    `np.partition` with three ranks (introselect over all 2 M values; one thread, AMD EPYC)."""
    found = _bracketed(values, k, sample)
    return np.partition(values, k)[k] if found is None else found


def _bracketed(values: np.ndarray, k: int, sample: np.ndarray) -> np.floating | None:
    """The k-th smallest of `values` when it lies between the brackets: `sample` (sorted) at k's
    quantile ± 4 standard deviations of a sample quantile; one count below the lower bracket, one
    selection among the values inside. None when it lies outside (about 1 in 15,000 for a random
    sample, or NaN)."""
    n, m = values.size, sample.size
    q = (k + 0.5) / n
    margin = int(4 * np.sqrt(m * q * (1 - q))) + 2
    i = int(q * m)
    lo, hi = sample[max(0, i - margin)], sample[min(m - 1, i + margin)]
    below = int(np.count_nonzero(values < lo))
    inside = values[(values >= lo) & (values <= hi)]
    r = k - below
    return np.partition(inside, r)[r] if 0 <= r < inside.size else None


def nth_projection(residual: Tensor, unit_decoder: Tensor, n: int) -> float:
    """`nth_projections` at one n."""
    return nth_projections(residual, unit_decoder, [n])[0]


class NthDecoderProjection:
    """s_n^dec accumulated over held-out rows read in chunks (`update`), then `compute`: at `n`
    (default d_sae / 4) and, unless `n` is given, at the `OTHER_N` fractions of d_sae too.

    W_dec: [d_sae, d_out], the decoder whose row directions are projected on."""

    def __init__(self, W_dec: Tensor, n: int | None = None, block_rows: int = BLOCK_ROWS) -> None:
        d_sae = W_dec.shape[0]
        self.n = default_n(d_sae) if n is None else n
        if not 0 <= self.n < d_sae:
            raise ValueError(f"nth_decoder_projection: n must be in [0, d_sae={d_sae}) (got {self.n})")
        # key -> n; a chosen n is read alone (the other fractions are relative to the default)
        self.ns = {"nth_decoder_projection": self.n}
        if n is None:
            self.ns |= {key: default_n(d_sae, fraction) for key, fraction in OTHER_N.items()}
        self.unit = F.normalize(W_dec.detach().float(), dim=-1)
        self.block_rows = block_rows
        self.totals, self.rows = dict.fromkeys(self.ns, 0.0), 0

    def update(self, residual: Tensor) -> None:
        """residual: [rows, d_out], what the latents must write: y − b_dec (− x W_skipᵀ), i.e. the
        target minus the dictionary's output at z = 0."""
        residual = residual.float()
        for start in range(0, len(residual), self.block_rows):
            block = residual[start : start + self.block_rows]
            for key, value in zip(self.ns, nth_projections(block, self.unit, list(self.ns.values()))):
                self.totals[key] += value * len(block)
            self.rows += len(block)

    def compute(self) -> dict[str, float | int | None]:
        """{nth_decoder_projection, nth_decoder_projection_n} and the `OTHER_N` keys where read;
        the scores are None without rows."""
        scores = {key: total / self.rows if self.rows else None for key, total in self.totals.items()}
        return {"nth_decoder_projection": scores.pop("nth_decoder_projection"), "nth_decoder_projection_n": self.n,
                **scores}


def decoder_pairwise_cosine(W_dec: Tensor, chunk: int = 4096) -> float:
    """W_dec: [d_sae, d_out] -> mean over pairs i < j of |cos(W_dec[i], W_dec[j])| (float64 sums),
    in blocks of at most [chunk, d_sae] so the d_sae × d_sae matrix is never held at once."""
    unit = F.normalize(W_dec.detach().float(), dim=-1)
    d_sae = len(unit)
    if d_sae < 2:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, d_sae, chunk):
        total += (unit[start : start + chunk] @ unit.T).abs().sum(dtype=torch.float64)
    diagonal = unit.square().sum(-1).sum(dtype=torch.float64)  # |cos(i, i)| = 1 for every non-zero row
    return float((total - diagonal) / (d_sae * (d_sae - 1)))
