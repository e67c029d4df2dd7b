"""An export read as SAELens reads it, from `cfg.json` and the safetensors only (no dictlearn code).

Written from SAELens's encode/decode of each architecture (`StandardSAE`, `TopKSAE`, `JumpReLUSAE`,
`GatedSAE` and their transcoder variants), so that a test comparing it with `dictlearn.load` proves
the export means the same thing in both libraries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def sae_lens_forward(folder: str | Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [batch, d_in] raw activations -> (z: [batch, d_sae], y_hat: [batch, d_out])."""
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    w = load_file(str(Path(folder) / "sae_weights.safetensors"))
    # SAELens names the standard transcoder bare (`transcoder`, `skip_transcoder`), the others
    # `<architecture>_transcoder` / `<architecture>_skip_transcoder`
    base = cfg["architecture"].removesuffix("transcoder").removesuffix("skip_").removesuffix("_") or "standard"
    x_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", False) else x
    if base == "gated":
        gate = (x_in @ w["W_enc"] + w["b_gate"] > 0).to(x.dtype)
        z = gate * (x_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]).relu()
    else:
        pre = x_in @ w["W_enc"] + w["b_enc"]
        if base == "topk":
            values, indices = pre.topk(cfg["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        elif base == "jumprelu":
            z = pre.relu() * (pre > w["threshold"])
        elif base == "standard":
            z = pre.relu()
        else:
            raise AssertionError(f"no SAELens reference for architecture {cfg['architecture']!r}")
    y = z @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return z, y
