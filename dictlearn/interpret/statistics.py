"""Per-latent statistics of a dictionary over rows of an activation file, streamed with bounded memory.

What a dashboard card shows about latent l, over the rows inspected:
- density: the fraction of rows where z_l ≠ 0; the mean and maximum of z_l where it fires;
- the `top` rows of largest z_l (a running top-k per latent);
- a histogram of its non-zero values over `bins` equal-width bins of (0, max_l];
- `per_interval` rows sampled uniformly from each of `intervals` equal-width intervals of
  (0, max_l] (SAEDashboard's interval samples; each interval is `bins / intervals` histogram bins,
  so "interval a–b holds p %" is read off the same histogram).

Two passes over the rows, because the histogram bins and intervals need max_l before the first
value is binned: pass 1 counts, sums and keeps the running top-k (whose first entry is max_l);
pass 2 bins every non-zero value and samples each interval. Memory is O(d_sae · (top + bins +
intervals · per_interval)), whatever the number of rows; each pass reads `chunk_rows` rows at a time.

Uniform sampling per interval is a bottom-k sketch: every entry gets an independent uniform key
and each interval keeps the `per_interval` entries of smallest key — a uniform sample without
replacement of the entries seen, the same distribution as reservoir sampling (Vitter 1985,
Algorithm R), and the same running top-k as the top rows, with the key −u instead of z_l.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: callables fed every chunk of pass 1: observer(first_row, z [n, d_sae]) (e.g. concept F1 counts)
Observer = Callable[[int, Tensor], None]


class GroupedTop:
    """Per group, the `k` entries of largest key seen so far, updated chunk by chunk.

    keys [groups, k] (−inf: an empty slot), rows [groups, k] (−1: empty), each group's entries
    in descending key order.
    """

    def __init__(self, groups: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.keys = torch.full((groups, k), float("-inf"), device=device)
        self.rows = torch.full((groups, k), -1, dtype=torch.int64, device=device)

    def update(self, group: Tensor, key: Tensor, row: Tensor) -> None:
        """Offer entries group [n] int64, key [n] float, row [n] int64."""
        if group.numel() == 0:
            return
        groups = self.keys.shape[0]
        # each group's new entries in descending key order, groups contiguous
        order = key.argsort(descending=True)
        order = order[group[order].argsort(stable=True)]
        group, key, row = group[order], key[order], row[order]
        counts = torch.bincount(group, minlength=groups)
        rank = torch.arange(group.numel(), device=group.device) - (counts.cumsum(0) - counts)[group]
        keep = rank < self.k  # at most k new candidates per group can enter
        new_keys = torch.full_like(self.keys, float("-inf"))
        new_rows = torch.full_like(self.rows, -1)
        new_keys[group[keep], rank[keep]] = key[keep].to(new_keys.dtype)
        new_rows[group[keep], rank[keep]] = row[keep]
        merged_keys = torch.cat([self.keys, new_keys], dim=1)
        best = merged_keys.topk(self.k, dim=1)
        self.keys, self.rows = best.values, torch.cat([self.rows, new_rows], dim=1).gather(1, best.indices)


@dataclass
class LatentStatistics:
    """The result of `latent_statistics` over `n_rows` rows starting at `first_row` (all on the CPU)."""

    first_row: int
    n_rows: int
    fire_count: Tensor  # [d_sae] int64
    value_sum: Tensor  # [d_sae] float64: Σ z_l over the rows where it fires
    top_values: Tensor  # [d_sae, top] descending; −inf in empty slots
    top_rows: Tensor  # [d_sae, top] absolute row numbers; −1 in empty slots
    histogram: Tensor  # [d_sae, bins] int64 over (0, max_l]
    sample_rows: Tensor  # [d_sae, intervals, per_interval] absolute rows; −1 in empty slots
    intervals: int

    @property
    def density(self) -> Tensor:
        """[d_sae] float64: fraction of the rows where the latent fires."""
        return self.fire_count.double() / max(1, self.n_rows)

    @property
    def max_activation(self) -> Tensor:
        """[d_sae]: the largest value (0 for a latent that never fired)."""
        return self.top_values[:, 0].clamp_min(0.0)

    @property
    def mean_activation(self) -> Tensor:
        """[d_sae] float64: mean value where the latent fires (0 when it never fired)."""
        return self.value_sum / self.fire_count.clamp_min(1)

    @property
    def alive(self) -> Tensor:
        """[d_sae] bool: fired at least once on these rows."""
        return self.fire_count > 0

    def interval_bounds(self, latent: int) -> list[tuple[float, float]]:
        """The equal-width intervals of (0, max_l] as (low, high) pairs, lowest first."""
        top = float(self.max_activation[latent])
        return [(top * j / self.intervals, top * (j + 1) / self.intervals) for j in range(self.intervals)]

    def interval_fractions(self, latent: int) -> list[float]:
        """Fraction of the latent's firing rows in each interval (lowest first), from the histogram."""
        counts = self.histogram[latent].reshape(self.intervals, -1).sum(1).double()
        return (counts / counts.sum().clamp_min(1)).tolist()


def _chunks(first: int, stop: int, size: int):
    for start in range(first, stop, size):
        yield start, min(start + size, stop)


def _bins(values: Tensor, top: Tensor, bins: int) -> Tensor:
    """values [n] in (0, top], top [n] > 0 -> bin index [n] in 0..bins-1 (top itself in the last)."""
    return (values / top * bins).floor().long().clamp_(0, bins - 1)


@torch.no_grad()
def latent_statistics(
    encode: Callable[[Tensor], Tensor],
    read: Callable[[int, int], Tensor],
    d_sae: int,
    first_row: int,
    n_rows: int,
    *,
    top: int = 10,
    bins: int = 40,
    intervals: int = 5,
    per_interval: int = 4,
    chunk_rows: int = 4096,
    seed: int = 0,
    device: str = "cpu",
    observers: Sequence[Observer] = (),
) -> LatentStatistics:
    """Statistics of the latents `encode(x [n, d_in]) -> z [n, d_sae]` over rows
    [first_row, first_row + n_rows) that `read(start, stop) -> x [stop - start, d_in]` gives.

    `bins` must be a multiple of `intervals`. Latent values are taken as non-negative (every
    dictlearn mechanism's are); a latent fires where z_l ≠ 0. `seed` fixes the interval samples.
    """
    if bins % intervals:
        raise ValueError(f"bins ({bins}) must be a multiple of intervals ({intervals})")
    stop = first_row + n_rows
    count = torch.zeros(d_sae, dtype=torch.int64, device=device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=device)
    best = GroupedTop(d_sae, top, device)
    for start, end in _chunks(first_row, stop, chunk_rows):
        z = encode(read(start, end).to(device))
        for observer in observers:
            observer(start, z)
        row, latent = z.nonzero(as_tuple=True)
        value = z[row, latent]
        count += torch.bincount(latent, minlength=d_sae)
        total.index_add_(0, latent, value.double())
        best.update(latent, value, row + start)
    top_value = best.keys[:, 0]
    histogram = torch.zeros(d_sae * bins, dtype=torch.int64, device=device)
    samples = GroupedTop(d_sae * intervals, per_interval, device)
    generator = torch.Generator().manual_seed(seed)
    for start, end in _chunks(first_row, stop, chunk_rows):
        z = encode(read(start, end).to(device))
        row, latent = z.nonzero(as_tuple=True)
        b = _bins(z[row, latent], top_value[latent], bins)
        histogram += torch.bincount(latent * bins + b, minlength=d_sae * bins)
        priority = -torch.rand(row.numel(), generator=generator).to(device)  # bottom-k of uniform keys
        samples.update(latent * intervals + b // (bins // intervals), priority, row + start)
    return LatentStatistics(
        first_row, n_rows, count.cpu(), total.cpu(), best.keys.cpu(), best.rows.cpu(),
        histogram.reshape(d_sae, bins).cpu(), samples.rows.reshape(d_sae, intervals, per_interval).cpu(), intervals,
    )  # fmt: skip
