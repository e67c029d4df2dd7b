"""What a latent's decoder direction does: the tokens it promotes (logit lens) and its neighbours.

**Logit lens.** A latent writes α·d_l into the residual stream (an SAE on the residual stream
directly; a transcoder through the MLP's output, which the block adds to the residual stream).
Along the direct path to the logits it meets only the final norm and the unembedding:
logits = W_U · norm(x). A LayerNorm is γ ⊙ (x − mean x) / σ(x) + β, so the change that d_l
makes, to first order and up to the positive factor 1/σ common to every token, is
W_U (γ ⊙ (d_l − mean d_l)); β adds the same logits whatever the latent. That is what `lens`
returns: d_l centred (LayerNorm; an RMSNorm does not centre), scaled by the norm's weight γ, through
W_U — the weight folding of TransformerLens (`fold_ln`, `center_writing_weights`). It ignores
every later block's response to d_l (the direct path only, as nostalgebraist's logit lens and
SAE dashboards do).

**Neighbours.** Cosine similarity between decoder rows, computed for `chunk` latents at a time so
memory is [chunk, d_sae] whatever the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dictlearn.errors import ConfigError

# Paths of the final norm in the model families dictlearn names hooks for (models/hooks.py).
_FINAL_NORMS = ("transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm")


@dataclass
class Unembedding:
    """W_U [vocab, d] and the final norm's weight γ [d] (None: no norm found) and whether it centres."""

    W_U: Tensor
    gamma: Tensor | None
    centre: bool
    norm_path: str | None

    @property
    def description(self) -> str:
        if self.norm_path is None:
            return "decoder rows through the unembedding (no final norm found)"
        what = "centred, scaled by" if self.centre else "scaled by"
        return f"decoder rows {what} the final norm's weight ({self.norm_path}), through the unembedding"

    def lens(self, directions: Tensor) -> Tensor:
        """directions [n, d] -> logit changes [n, vocab] (float32, CPU)."""
        d = directions.detach().float().cpu()
        if d.shape[-1] != self.W_U.shape[1]:
            raise ConfigError(f"logit lens: decoder rows have width {d.shape[-1]} but the model's unembedding "
                              f"takes {self.W_U.shape[1]}; pass the --model the dictionary was trained on")
        if self.centre:
            d = d - d.mean(-1, keepdim=True)
        if self.gamma is not None:
            d = d * self.gamma
        return d @ self.W_U.T


def unembedding(model: nn.Module) -> Unembedding:
    """The model's output embedding and final norm (a Hugging Face causal LM)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ConfigError(f"{type(model).__name__} has no output embedding (get_output_embeddings); "
                          "the logit lens needs a causal LM")
    modules = dict(model.named_modules())
    path = next((p for p in _FINAL_NORMS if p in modules), None)
    norm = modules.get(path) if path else None
    weight = getattr(norm, "weight", None)
    gamma = weight.detach().float().cpu() if isinstance(weight, Tensor) else None
    centre = isinstance(norm, nn.LayerNorm)
    return Unembedding(head.weight.detach().float().cpu(), gamma, centre, path)


def decoder_direction(dictionary, latent: int) -> Tensor:
    """[1, d_out]: what one unit of the reported latent adds to the dictionary's raw output,
    decode(e_l) − decode(0) (W_dec[l] for a folded export; any linear decoder, in raw units)."""
    with torch.no_grad():
        z = torch.zeros(2, dictionary.d_sae, device=dictionary.device)
        z[0, latent] = 1.0
        # a skip transcoder's decode adds x W_skipᵀ: the same x in both rows, so it cancels
        x = torch.zeros(2, dictionary.d_in, device=dictionary.device) if dictionary.W_skip is not None else None
        out = dictionary.decode(z, x)
        return (out[0] - out[1]).unsqueeze(0)


def top_tokens(logits: Tensor, k: int, allowed: Tensor | None = None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """logits [vocab] -> (the k most promoted (token, logit), the k most suppressed), strongest
    first, among the `allowed` [vocab] bool tokens (None: all)."""
    if allowed is not None:
        k = min(k, int(allowed.sum()))
        up = logits.masked_fill(~allowed, float("-inf")).topk(k)
        down = (-logits).masked_fill(~allowed, float("-inf")).topk(k)
    else:
        k = min(k, logits.numel())
        up, down = logits.topk(k), (-logits).topk(k)
    return ([(int(i), float(v)) for v, i in zip(up.values, up.indices)],
            [(int(i), -float(v)) for v, i in zip(down.values, down.indices)])


def nearest_latents(W_dec: Tensor, latents: list[int], k: int = 6, chunk: int = 256) -> dict[int, list[tuple[int, float]]]:
    """For each latent, the k other latents whose decoder rows have the largest cosine similarity
    with its own: {latent: [(other, cos), ...]}, in chunks of `chunk` latents."""
    unit = W_dec.detach().float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = min(k, unit.shape[0] - 1)
    found: dict[int, list[tuple[int, float]]] = {}
    for i in range(0, len(latents), chunk):
        ids = torch.tensor(latents[i : i + chunk], dtype=torch.long, device=unit.device)
        cos = unit[ids] @ unit.T  # [chunk, d_sae]
        cos[torch.arange(len(ids)), ids] = float("-inf")
        best = cos.topk(k, dim=1)
        for latent, values, others in zip(ids.tolist(), best.values.tolist(), best.indices.tolist()):
            found[latent] = list(zip(others, values))
    return found
