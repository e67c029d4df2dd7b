"""Cross-layer transcoders (CLTs): one encoder per layer, decoders to every later layer's MLP output.

Following Ameisen et al. 2025 ("Circuit Tracing", transformer-circuits.pub), for L layers of MLP
input width d_in and output width d_out, with m latents per layer:

    a_ℓ   = σ(x_ℓ W_enc^ℓ + b_enc^ℓ)                  x_ℓ [batch, d_in], W_enc^ℓ [d_in, m]
    ŷ_ℓ'  = Σ_{ℓ ≤ ℓ'} a_ℓ W_dec^{ℓ→ℓ'} + b_dec^{ℓ'}    W_dec^{ℓ→ℓ'} [m, d_out]

so a feature computed once at layer ℓ writes to the MLP output of ℓ and of every later layer.

**Written as a mapping.** A CLT is a transcoder on the layers side by side: input
X = [x_0 … x_{L-1}] [batch, L·d_in] (a comma-separated `--data.input_key`, `dictlearn.data.h5`),
target Y = [y_0 … y_{L-1}], d_sae = L·m, with W_enc [L·d_in, L·m] block-diagonal (block ℓ is
W_enc^ℓ) and W_dec [L·m, L·d_out] block-upper-triangular (block (ℓ, ℓ') is W_dec^{ℓ→ℓ'}, zero
for ℓ' < ℓ). The zero blocks stay exactly zero: they start at zero, their gradients are masked
before each step and they are masked again after it. Everything else — the mechanism's
activation and loss terms, the optimiser, schedules, dead latents, calibration, metrics, export
and exact resume — is the shared `Dictionary` machinery, so a CLT trains in the same sweep as
per-layer transcoders. The dense matrices cost L× the FLOPs of per-layer blocks (the embedded
model's 4 layers: negligible; a large model would want block storage).

**Sparsity per layer.** TopK keeps the `k` largest pre-activations *of each layer* (k per layer,
L·k per token in all), as Goreg12345/crosslayer-transcoder's per-layer TopK; JumpReLU is
elementwise, and its L0 penalty sums over every layer's latents. Anthropic train JumpReLU CLTs
with a tanh penalty λ Σ tanh(c · a_i ‖W_dec,i‖) over the concatenated decoder norms; dictlearn's
JumpReLU keeps its own L0 (straight-through) penalty (Rajamanoharan et al. 2024), and its TopK
CLT matches crosslayer-transcoder's and sparsify's `clt` branch, which use TopK.

**Loss.** The mechanism's reconstruction loss on Y: a *sum* over output layers of squared errors
(TopK: divided by the total variance of Y, i.e. the FVU of all layers at once), so each layer
counts by its variance — as the true model's residual stream sums them. Decoder rows are
unit-norm over all the layers they write (‖[W_dec^{ℓ→ℓ} … W_dec^{ℓ→L-1}]‖ = 1), the norm
Anthropic's penalty reads.

`encode_layer` / `decode_layer` are the replacement model's calls (dictlearn.replacement).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.latents import Selection
from dictlearn.dictionaries.model import Dictionary
from dictlearn.dictionaries.sparse import topk_indices
from dictlearn.dictionaries.topk import TopKSAE
from dictlearn.errors import ConfigError


def block_masks(n_layers: int, d_in: int, d_sae: int, d_out: int) -> tuple[Tensor, Tensor]:
    """(encoder mask [d_in, d_sae]: block-diagonal, decoder mask [d_sae, d_out]: latents of layer
    ℓ write to layers ℓ' ≥ ℓ), bool, for concatenated widths divisible by n_layers."""
    layer_in = torch.arange(d_in) // (d_in // n_layers)
    layer_latent = torch.arange(d_sae) // (d_sae // n_layers)
    layer_out = torch.arange(d_out) // (d_out // n_layers)
    return layer_in[:, None] == layer_latent[None, :], layer_latent[:, None] <= layer_out[None, :]


class CrossLayer(Dictionary):
    """The cross-layer mapping, mixed into a mechanism class before it
    (``class CrossLayerTopK(CrossLayer, TopKSAE)``). d_in, d_out and d_sae are the concatenated
    widths (L·d_in, L·d_out, L·m)."""

    #: the mechanism's selection is per token and per latent, or per layer: a layer's latents
    #: depend on its own input only (what `encode_layer` relies on)
    n_layers: int

    def __init__(self, n_layers: int = 2, transcoder: bool = True, **kwargs):
        """
        Args:
            n_layers: layers L side by side in the input and the target (>= 2).
            transcoder: always true (in the signature so that the recorded arguments say so).
            **kwargs: the mechanism's and `Dictionary`'s arguments.
        """
        if not (isinstance(n_layers, int) and n_layers >= 2):
            raise ConfigError(f"--model.n_layers must be a whole number >= 2 for a cross-layer transcoder, "
                              f"got {n_layers}")
        if kwargs.get("skip_connection") or not transcoder:
            raise ConfigError("a cross-layer transcoder is a transcoder without a skip connection; drop "
                              "--model.transcoder false / --model.skip_connection")
        object.__setattr__(self, "n_layers", n_layers)  # read by _initial_weights, before nn.Module's init
        d_in, d_sae = kwargs.get("d_in", 0), kwargs.get("d_sae", 4096)
        d_out = kwargs.get("d_out") or d_in
        for name, value in (("d_in", d_in), ("d_out", d_out), ("d_sae", d_sae)):
            if value and value % n_layers:
                raise ConfigError(f"--model.{name} {value}: a cross-layer transcoder over {n_layers} layers needs a "
                                  f"multiple of {n_layers} (the layers side by side, of equal widths)")
        super().__init__(transcoder=True, **kwargs)

    # ----------------------------------------------------------------- the masked mapping
    def _masks(self) -> tuple[Tensor, Tensor]:
        enc, dec = block_masks(self.n_layers, self.d_in, self.d_sae, self.d_out)
        return enc.to(self.W_enc.device if hasattr(self, "W_enc") else "cpu"), \
            dec.to(self.W_dec.device if hasattr(self, "W_dec") else "cpu")

    def _initial_weights(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The mechanism's initial weights with the zero blocks zeroed and each decoder row
        rescaled to the initial norm over the layers it writes."""
        W_enc, W_dec = super()._initial_weights(generator)
        enc, dec = block_masks(self.n_layers, self.d_in, self.d_sae, self.d_out)
        W_dec = W_dec * dec
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12) * self.decoder_init_norm
        W_enc = W_enc * enc
        W_enc = W_enc / W_enc.norm(dim=0, keepdim=True).clamp_min(1e-12)
        return W_enc.contiguous(), W_dec.contiguous()

    @torch.no_grad()
    def constrain_gradient(self) -> None:
        """The zero blocks get no gradient (Adam then leaves them at zero)."""
        enc, dec = self._masks()
        for parameter, mask in ((self.W_enc, enc), (self.W_dec, dec)):
            if parameter.grad is not None:
                parameter.grad.mul_(mask)
        super().constrain_gradient()

    @torch.no_grad()
    def constrain_parameters(self) -> None:
        enc, dec = self._masks()
        self.W_enc.data.mul_(enc)
        self.W_dec.data.mul_(dec)
        super().constrain_parameters()

    def export_fields(self) -> dict:
        return super().export_fields() | {"n_layers": self.n_layers}

    # ----------------------------------------------------------------- one layer at a time
    def layer_slice(self, layer: int, width: int) -> slice:
        """Columns of `layer` in a concatenated [.., L·width] tensor."""
        return slice(layer * width, (layer + 1) * width)

    def encode_layer(self, i: int, x: Tensor) -> Tensor:
        """Layer i's raw MLP input x [n, d_in / L] -> its latents a_i [n, d_sae / L] (reported
        units). A layer's latents depend on its own input only, so the other layers' inputs are
        left at zero."""
        width, m = self.d_in // self.n_layers, self.d_sae // self.n_layers
        full = x.new_zeros(x.shape[0], self.d_in)
        full[:, self.layer_slice(i, width)] = x
        return self.encode(full)[:, self.layer_slice(i, m)]

    def decode_layer(self, i: int, latents: Sequence[Tensor], inputs: Sequence[Tensor] = ()) -> Tensor:
        """Layers 0..i's latents [n, d_sae / L] each -> layer i's raw MLP output [n, d_out / L]:
        Σ_{ℓ ≤ i} a_ℓ W_dec^{ℓ→i} + b_dec^i."""
        m, width = self.d_sae // self.n_layers, self.d_out // self.n_layers
        z = latents[0].new_zeros(latents[0].shape[0], self.d_sae)
        for layer in range(i + 1):
            z[:, self.layer_slice(layer, m)] = latents[layer]
        return self.decode(z)[:, self.layer_slice(i, width)]


class CrossLayerTopK(CrossLayer, TopKSAE):
    """A TopK CLT: the k largest pre-activations of each layer (k per layer, n_layers·k per token)."""

    def select(self, pre: Tensor, training: bool) -> Selection:
        batch, m = pre.shape[0], self.d_sae // self.n_layers
        per_layer = topk_indices(pre.reshape(batch * self.n_layers, m), self.k).view(batch, self.n_layers, self.k)
        offsets = torch.arange(self.n_layers, device=pre.device).view(1, -1, 1) * m
        return Selection.of_rows((per_layer + offsets).reshape(batch, self.n_layers * self.k))

    def sparse_l0(self) -> float:
        return self.n_layers * self.k

    def export_fields(self) -> dict:
        return super().export_fields() | {"k_per_layer": self.k}


class CrossLayerJumpReLU(CrossLayer, JumpReLUSAE):
    """A JumpReLU CLT: a threshold per latent, the L0 penalty summed over all layers' latents."""
