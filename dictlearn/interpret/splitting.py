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

Only latents that fire take part (`rows_pass` finds them on a file's first rows): a dead latent
keeps (near) its random initial row, whose best cosine is chance, not a match. `rank_parents`
orders the families to show (the figure and the dashboards' family cards, families.py).

Every cosine matrix is computed in [chunk, chunk] blocks with a running top-k, so memory stays
O(chunk² + n·k) whatever the widths (never an n_small x n_large matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dictlearn.data.concepts import read_concept_labels
from dictlearn.data.h5 import H5Array
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
    max_cos: Tensor  # [small]: each small latent's best cosine in the large dictionary (NaN: dead)
    parent: Tensor  # [large]: each large latent's best-matching small latent (-1: dead)
    parent_cos: Tensor  # [large]: that cosine (NaN: dead)

    @property
    def matched_cos(self) -> Tensor:
        """The best cosines of the small latents that take part (alive), [n <= small]."""
        return self.max_cos[~self.max_cos.isnan()]

    @property
    def mmcs(self) -> float:
        """Mean over the (alive) small latents of their best cosine in the large dictionary."""
        return float(self.matched_cos.mean())

    def quantiles(self, q=(0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[float, float]:
        return {p: float(v) for p, v in zip(q, torch.quantile(self.matched_cos, torch.tensor(q)))}

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
                "split_fraction": float((sizes >= 2).float()[~self.max_cos.isnan()].mean()), "min_cos": min_cos,
                "alive_small": len(self.matched_cos), "alive_large": int((self.parent >= 0).sum())}


def size_pair(small_W_dec: Tensor, large_W_dec: Tensor, chunk: int = 2048, small_alive: Tensor | None = None,
              large_alive: Tensor | None = None) -> SizePair:
    """Decoder rows of a small [n_s, d] and a larger [n_l, d] dictionary -> their `SizePair`.

    small_alive, large_alive: bool [n] (None: all), the latents that fired on the data looked at.
    A dead latent keeps (near) its random initial decoder row; it takes part in no match, so its
    best cosine, at chance level (~0.3 in d_in 128), does not enter MMCS or a family."""
    s_ids, l_ids = (torch.arange(len(W)) if alive is None else alive.nonzero().squeeze(1)
                    for W, alive in ((small_W_dec, small_alive), (large_W_dec, large_alive)))
    max_cos = torch.full((len(small_W_dec),), float("nan"))
    parent, parent_cos = torch.full((len(large_W_dec),), -1), torch.full((len(large_W_dec),), float("nan"))
    if len(s_ids) and len(l_ids):
        best, _ = top_cosines(small_W_dec[s_ids], large_W_dec[l_ids], 1, chunk)
        back_cos, back = top_cosines(large_W_dec[l_ids], small_W_dec[s_ids], 1, chunk)
        max_cos[s_ids], parent[l_ids], parent_cos[l_ids] = best[:, 0], s_ids[back[:, 0]], back_cos[:, 0]
    return SizePair(len(small_W_dec), len(large_W_dec), max_cos, parent, parent_cos)


def size_ladder(decoders: dict[int, Tensor], chunk: int = 2048,
                alive: dict[int, Tensor] | None = None) -> list[SizePair]:
    """{d_sae: W_dec} of one architecture -> a SizePair for each size and the next larger one
    (alive: {d_sae: bool [d_sae]}, the latents that take part; None: all)."""
    sizes = sorted(decoders)
    if len(sizes) < 2:
        raise ConfigError(f"feature splitting needs dictionaries of at least two sizes; got d_sae {sizes} "
                          "(run dictlearn compare --d-sae 512,1024,2048,4096)")
    alive = alive or {}
    return [size_pair(decoders[a], decoders[b], chunk, alive.get(a), alive.get(b)) for a, b in zip(sizes, sizes[1:])]


def latent_concepts(fires: Tensor, labels: Tensor, names: list[str]) -> list[tuple[str, float]]:
    """fires [n, L] bool (latent active per token), labels [n, C] bool -> for each latent its
    best concept by F1 = 2·TP / (fired + labelled) and that F1."""
    f, lab = fires.float(), labels.float()
    tp = f.T @ lab  # [L, C]
    f1 = 2 * tp / (f.sum(0)[:, None] + lab.sum(0)[None, :]).clamp_min(1.0)
    best = f1.max(1)
    return [(names[int(c)], float(v)) for v, c in zip(best.values, best.indices)]


@dataclass
class RowsPass:
    """What a ladder's dictionaries do on the first rows of their file: which latents fire, and
    (when the file holds concept labels) each latent's best (concept, F1) on the labelled rows."""

    alive: dict[int, Tensor]  # {d_sae: bool [d_sae]}
    concepts: dict[int, list[tuple[str, float]]] | None


def rows_pass(dictionaries: dict, data: str, input_key: str, rows: int, device: str = "cpu") -> RowsPass:
    """{d_sae: Dictionary} encoded on rows [0, rows) of `data`['input_key'] -> their `RowsPass`
    (concepts by `latent_concepts`, the F1 a dashboard card shows; None without labels)."""
    array = H5Array(data, input_key)
    x = array.read(0, min(rows, array.n_rows))
    array.close()
    labels = read_concept_labels(data, slice(0, len(x)))
    if labels is not None and not labels.names:
        labels = None
    alive, concepts = {}, ({} if labels is not None else None)
    with torch.no_grad():
        for d_sae, dictionary in dictionaries.items():
            fires = torch.cat([(dictionary.encode(part.to(device)) != 0).cpu() for part in x.split(4096)])
            alive[d_sae] = fires.any(0)
            if labels is not None:
                known = torch.from_numpy(labels.labelled[: len(x)])
                concepts[d_sae] = latent_concepts(fires[known], torch.from_numpy(labels.values[: len(x)])[known],
                                                  labels.names)
    return RowsPass(alive, concepts)


def rank_parents(pair: SizePair, small: list[tuple[str, float]] | None = None,
                 large: list[tuple[str, float]] | None = None, min_cos: float = 0.5,
                 min_f1: float = 0.2) -> list[int]:
    """The small latents that have children in `pair`, the family best to show first. With concept
    labels (`small`, `large`: each latent's best (concept, F1)), first the families that the labels
    name: a parent with two or more children and F1 >= min_f1, by its F1 plus the F1s of its
    children labelled at >= min_f1; then (and without labels) by number of children."""
    sizes = pair.family_sizes(min_cos)
    named = torch.zeros(pair.small, dtype=torch.float64)
    if small is not None:
        parent_f1 = torch.tensor([v for _, v in small], dtype=torch.float64)
        named = parent_f1.clone()
        if large is not None:
            child_f1 = torch.tensor([v for _, v in large], dtype=torch.float64)
            keep = (pair.parent_cos >= min_cos) & (child_f1 >= min_f1)
            named.index_add_(0, pair.parent[keep], child_f1[keep])
        named = torch.where((sizes >= 2) & (parent_f1 >= min_f1), named, 0.0)
    score = named * (pair.large + 1) + sizes.double()  # by `named`, ties by number of children
    order = score.argsort(descending=True, stable=True)
    return [int(i) for i in order if sizes[i] > 0]
