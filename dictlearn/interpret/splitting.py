"""Feature splitting across dictionary sizes: match latents by decoder cosine, chunked.

Dictionaries of one architecture trained at geometric sizes on the same data (a `dictlearn
compare --d-sae 512,1024,2048,4096` sweep) are compared by their decoder rows, the directions
each latent writes (Bricken et al. 2023, "Towards Monosemanticity", feature splitting; Templeton
et al. 2024, "Scaling Monosemanticity", feature neighbourhoods):

- per size pair (small -> next larger): each small latent's best cosine with any large latent,
  its distribution, and its mean, MMCS(small -> large) (Sharkey, Braun, Millidge 2022): how much
  of the small dictionary the large one contains;
- a small latent's *family* in the larger dictionary: the large latents whose best match among
  the small latents is this one, with cosine >= `min_cos` ("children"): a broad feature split
  into finer ones, e.g. a keyword latent into `def`, `return`, ...

Every cosine matrix is computed in [chunk, chunk] blocks with a running top-k, so memory stays
O(chunk² + n·k) whatever the widths (never an n_small x n_large matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dictlearn.errors import ConfigError


def unit_rows(W: Tensor) -> Tensor:
    """Decoder rows [n, d] -> unit rows, float32 (a zero row stays zero)."""
    W = W.detach().float()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def top_cosines(queries: Tensor, keys: Tensor, k: int = 1, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """For each row of `queries` [n, d], its k largest cosines with the rows of `keys` [m, d]:
    (values [n, k] descending, indices [n, k]). [chunk, chunk] blocks, a running top-k."""
    if queries.shape[1] != keys.shape[1]:
        raise ConfigError(f"decoder rows of width {queries.shape[1]} and {keys.shape[1]}: compare dictionaries "
                          "trained on the same site")
    q, keys = unit_rows(queries), unit_rows(keys)
    k = min(k, len(keys))
    values, indices = [], []
    for start in range(0, len(q), chunk):
        best_v = q.new_full((min(chunk, len(q) - start), k), float("-inf"))
        best_i = torch.zeros_like(best_v, dtype=torch.long)
        for key_start in range(0, len(keys), chunk):
            block = q[start : start + chunk] @ keys[key_start : key_start + chunk].T
            top = block.topk(min(k, block.shape[1]), dim=1)
            merged_v = torch.cat([best_v, top.values], 1)
            merged_i = torch.cat([best_i, top.indices + key_start], 1)
            keep = merged_v.topk(k, dim=1)
            best_v, best_i = keep.values, merged_i.gather(1, keep.indices)
        values.append(best_v)
        indices.append(best_i)
    return torch.cat(values), torch.cat(indices)


@dataclass
class SizePair:
    """How a small dictionary's latents reappear in a larger one."""

    small: int  # d_sae of the small dictionary
    large: int
    max_cos: Tensor  # [small]: each small latent's best cosine in the large dictionary
    parent: Tensor  # [large]: each large latent's best-matching small latent
    parent_cos: Tensor  # [large]: that cosine

    @property
    def mmcs(self) -> float:
        """Mean over small latents of their best cosine in the large dictionary."""
        return float(self.max_cos.mean())

    def quantiles(self, q=(0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[float, float]:
        return {p: float(v) for p, v in zip(q, torch.quantile(self.max_cos, torch.tensor(q)))}

    def children(self, latent: int, min_cos: float = 0.5) -> list[tuple[int, float]]:
        """The large latents whose best small match is `latent`, with cosine >= min_cos, best first."""
        mine = ((self.parent == latent) & (self.parent_cos >= min_cos)).nonzero().squeeze(1)
        order = self.parent_cos[mine].argsort(descending=True)
        return [(int(i), float(self.parent_cos[i])) for i in mine[order]]

    def family_sizes(self, min_cos: float = 0.5) -> Tensor:
        """[small]: number of children of each small latent."""
        keep = self.parent_cos >= min_cos
        return torch.bincount(self.parent[keep], minlength=len(self.max_cos))

    def summary(self, min_cos: float = 0.5) -> dict:
        sizes = self.family_sizes(min_cos)
        return {"small": self.small, "large": self.large, "mmcs": self.mmcs,
                "max_cos_quantiles": {str(p): v for p, v in self.quantiles().items()},
                "split_fraction": float((sizes >= 2).float().mean()), "min_cos": min_cos}


def size_pair(small_W_dec: Tensor, large_W_dec: Tensor, chunk: int = 2048) -> SizePair:
    """Decoder rows of a small [n_s, d] and a larger [n_l, d] dictionary -> their `SizePair`."""
    max_cos, _ = top_cosines(small_W_dec, large_W_dec, 1, chunk)
    parent_cos, parent = top_cosines(large_W_dec, small_W_dec, 1, chunk)
    return SizePair(len(small_W_dec), len(large_W_dec), max_cos[:, 0], parent[:, 0], parent_cos[:, 0])


def size_ladder(decoders: dict[int, Tensor], chunk: int = 2048) -> list[SizePair]:
    """{d_sae: W_dec} of one architecture -> a SizePair for each size and the next larger one."""
    sizes = sorted(decoders)
    if len(sizes) < 2:
        raise ConfigError(f"feature splitting needs dictionaries of at least two sizes; got d_sae {sizes} "
                          "(run dictlearn compare --d-sae 512,1024,2048,4096)")
    return [size_pair(decoders[a], decoders[b], chunk) for a, b in zip(sizes, sizes[1:])]


def latent_concepts(fires: Tensor, labels: Tensor, names: list[str]) -> list[tuple[str, float]]:
    """fires [n, L] bool (latent active per token), labels [n, C] bool -> for each latent its
    best concept by F1 = 2·TP / (fired + labelled) and that F1."""
    f, lab = fires.float(), labels.float()
    tp = f.T @ lab  # [L, C]
    f1 = 2 * tp / (f.sum(0)[:, None] + lab.sum(0)[None, :]).clamp_min(1.0)
    best = f1.max(1)
    return [(names[int(c)], float(v)) for v, c in zip(best.values, best.indices)]
