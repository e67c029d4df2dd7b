"""Resampling of dead latents (Bricken et al. 2023, "Towards Monosemanticity", appendix): every
`resample_every_steps` steps, each dead latent is pointed at an input the dictionary reconstructs
badly (drawn with p ∝ loss²), its encoder column scaled to `resample_encoder_scale` × the mean
alive column norm, its encoder bias zeroed, and Adam's moments of the touched rows reset.

It runs at the start of a step, not the end: a checkpoint saved at the end of the previous step
then resumes into the same resampling, on the same batch (exact resume).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.model import Dictionary


@torch.no_grad()
def resample_dead_latents(dictionary: Dictionary, x_raw: Tensor, y_raw: Tensor, dead_mask: Tensor, step: int,
                          encoder_scale: float = 0.2, optimizer_state: dict | None = None, broadcast=None) -> int:
    """Point the latents of `dead_mask` [d_sae] at the inputs of the raw batch x_raw [batch, d_in],
    y_raw [batch, d_out] the dictionary reconstructs worst. -> how many.

    `optimizer_state`: Adam's state by parameter, whose moments of the touched latents are
    zeroed; `broadcast(t)`: rank 0's copy of `t` under DDP (every rank must write the same rows).
    The draw is seeded by `step`, so a resumed run draws the same."""
    d = dictionary
    dead = dead_mask.nonzero().flatten()
    x, y = x_raw * d.input_scale, y_raw * d.target_scale
    loss = (y - d.decode_scaled(d.activate(d.pre_acts(x)), x)).pow(2).sum(-1)
    generator = torch.Generator(device=x.device).manual_seed(step)
    picks = torch.multinomial(loss.pow(2) + 1e-12, len(dead), replacement=True, generator=generator)
    picks = broadcast(picks) if broadcast is not None else picks
    x_pick, y_pick = x[picks], y[picks]
    alive = ~dead_mask
    enc_norm = d.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    d.W_dec.data[dead] = y_pick / y_pick.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x_unit = x_pick / x_pick.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d.W_enc.data[:, dead] = (x_unit * encoder_scale * enc_norm).T
    d.b_enc.data[dead] = 0.0
    _reset_adam_rows(d, dead, optimizer_state or {})
    return len(dead)


def _reset_adam_rows(d: Dictionary, latents: Tensor, state: dict) -> None:
    """Zero Adam's moments for the touched latents, or they re-kill them (Bricken et al. 2023)."""
    for param, index in ((d.W_dec, (latents,)), (d.W_enc, (slice(None), latents)), (d.b_enc, (latents,))):
        for key in ("exp_avg", "exp_avg_sq"):
            if param in state and key in state[param]:
                state[param][key][index] = 0.0
