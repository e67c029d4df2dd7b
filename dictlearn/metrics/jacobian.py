"""Transcoder faithfulness: how well a transcoder's local linear map matches the MLP it replaces.

Downstream loss says whether the spliced model still predicts tokens; it does not say whether the
transcoder computes the MLP's function or only its outputs on the data. The Jacobian says how the
output moves when the input moves. Per token x (an MLP input), with both maps in raw units:

    J_tc(x)  = W_decᵀ diag(a'(x)) W_encᵀ (+ W_skip)      [d_out, d_in], analytic
    J_mlp(x) = ∂ MLP(x) / ∂x                              [d_out, d_in], autograd (torch.func)
    jacobian_cos = mean over tokens of ⟨J_tc, J_mlp⟩_F / (‖J_tc‖_F ‖J_mlp‖_F)

a'(x) is the derivative of each latent with respect to its pre-activation: 1 on the active
latents and 0 elsewhere for every dictlearn mechanism (ReLU, TopK, BatchTopK, JumpReLU and
Matryoshka are the identity on their active entries, whose selection is locally constant; a gated
latent follows its magnitude path, whose weights are exp(r_mag) ⊙ W_gate). 1 means the same local
map up to a positive scale; 0 unrelated maps. The per-token Frobenius cosine follows the
"Jacobian correlation" idea of comparing a replacement's input-output derivatives with the
original component's (transcoders: Dunefsky, Chlenski, Nanda 2024; skip transcoders: Paulo,
Shabalin, Belrose 2025, whose W_skip is the linear part of J_tc); the exact formula is dictlearn's.

Cost: one vectorised reverse-mode Jacobian of the MLP (d_out backward rows per token) and one
[d_out, d_sae] x [d_sae, d_in] product per token, `JACOBIAN_TOKENS` tokens at most, in chunks
of `chunk` tokens so a [chunk, d_out, d_in] block bounds the memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

FAITHFULNESS_KEYS = ("jacobian_cos",)  # transcoders only; null for SAEs and without a model
#: tokens sampled per dictionary (evaluate, compare): held-out rows, evenly spaced
JACOBIAN_TOKENS = 256


def transcoder_jacobian(dictionary, x: Tensor) -> Tensor:
    """The dictionary's analytic Jacobian at raw inputs x [n, d_in] -> [n, d_out, d_in] (raw units).

    Reported latents z_i = a(π_i) · ls_i with π = (x · s_in − shift) W_enc + b_enc, and
    ŷ = Σ_i (z_i / ls_i) W_dec[i] / s_out: the latent scale ls cancels, leaving s_in / s_out.
    """
    active = (dictionary.encode(x) != 0).to(x.dtype)  # a'(x): [n, d_sae]
    encoder = dictionary.W_enc
    if hasattr(dictionary, "r_mag"):  # gated: the magnitude path's weights
        encoder = encoder * dictionary.r_mag.exp()
    ratio = dictionary.input_scale / dictionary.target_scale
    J = torch.einsum("io,ni,di->nod", dictionary.W_dec, active, encoder) * ratio
    if dictionary.W_skip is not None:
        J = J + dictionary.W_skip * ratio
    return J


def module_jacobian(module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Autograd Jacobian of a token-wise module (an MLP) at x [n, d_in] -> [n, d_out, d_in]."""

    def one(row: Tensor) -> Tensor:
        return module(row[None])[0]

    return torch.func.vmap(torch.func.jacrev(one))(x)


def frobenius_cosines(a: Tensor, b: Tensor) -> Tensor:
    """[n, d_out, d_in] x 2 -> [n]: per-token cosine of the flattened matrices (float64; 0 when
    either is all zero, e.g. a transcoder with no active latent and no skip)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(1) / norms.clamp_min(1e-300), 0.0)


@torch.no_grad()
def jacobian_cosines(dictionary, module: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 32) -> Tensor:
    """Per-token cosine between the dictionary's analytic Jacobian and the module's autograd one
    at raw inputs x [n, d_in] -> [n] float64, `chunk` tokens at a time."""
    parts = []
    for rows in x.split(chunk):
        with torch.enable_grad():
            J_mlp = module_jacobian(module, rows)
        parts.append(frobenius_cosines(transcoder_jacobian(dictionary, rows), J_mlp))
    return torch.cat(parts)


def sample_rows(n_rows: int, n: int = JACOBIAN_TOKENS) -> Tensor:
    """`n` evenly spaced row indices of `n_rows` (all when fewer): the token sample, the same for
    every dictionary of a file."""
    return torch.linspace(0, n_rows - 1, min(n, n_rows)).round().long().unique()
