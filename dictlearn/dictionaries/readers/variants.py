"""The mechanism classes as another library runs them at inference: what a reader builds.

dictlearn reports a latent as its activation times its decoder row's norm (docs/conventions.md,
reported latents), so its exports have unit decoder rows. A dictionary trained elsewhere keeps the
latents its own library computes: SAELens, sparsify and dictionary_learning encode to the
activation itself, whatever the decoder norms. Folding the norms in would change the latents a
TopK keeps (it ranks the pre-activations, not their products with the norms) and every value
`encode` returns. So each class here is a shipped mechanism whose `latent_scale` is 1: `encode`
returns the peer's latents and `decode` the peer's output, on raw activations.

The classes declare no `mechanism` of their own: they inherit their parent's (the registry, the
analysis' colours and L0-by-k treat them alike) without becoming second registry entries.

JumpReLU: SAELens and dictionary_learning compute ReLU(π) · 1[π > θ] with θ stored as such (it may be
≤ 0 in a downloaded file); dictlearn's JumpReLU stores log θ and computes π · 1[π > θ], the
same for every θ > 0. `OutsideJumpReLUSAE` keeps θ as the file holds it and applies the ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.crosslayer import CrossLayer, CrossLayerJumpReLU
from dictlearn.dictionaries.gated import GatedSAE
from dictlearn.dictionaries.jumprelu import JumpReLUFunction, JumpReLUSAE
from dictlearn.dictionaries.matryoshka import MatryoshkaBatchTopKSAE
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.dictionaries.topk import TopKSAE


class _AsTheirLibrary:
    """Latents as the library that trained the dictionary reports them: no decoder-norm factor."""

    #: read by `dictlearn.export` (cfg.json's `decoder_rows_unit_norm`) and by evaluate's records
    latents_as_recorded = True

    def latent_scale(self) -> Tensor:
        """[d_sae] ones: reported latents are the activations themselves (module docstring)."""
        return torch.ones_like(self.b_enc)


class OutsideReLUSAE(_AsTheirLibrary, ReLUL1SAE):
    """z = ReLU((x − b_dec·a) W_enc + b_enc): SAELens `standard`/`transcoder`, dictionary_learning
    `AutoEncoder`."""


class OutsideTopKSAE(_AsTheirLibrary, TopKSAE):
    """z = ReLU(TopK_k(π)): SAELens `topk`, sparsify, dictionary_learning `AutoEncoderTopK`."""


class OutsideGatedSAE(_AsTheirLibrary, GatedSAE):
    """SAELens `gated`, dictionary_learning `GatedAutoEncoder`."""


class OutsideBatchTopKSAE(_AsTheirLibrary, BatchTopKSAE):
    """dictionary_learning `BatchTopKSAE` at inference: ReLU(π) · 1[π > θ], one θ for all latents."""


class OutsideMatryoshkaSAE(_AsTheirLibrary, MatryoshkaBatchTopKSAE):
    """dictionary_learning `MatryoshkaBatchTopKSAE` at inference: BatchTopK's threshold rule."""


class _StoredThreshold:
    """θ [d_sae] kept as stored, any sign, not learnt (the outside libraries' thresholds may be
    negative, which `log_threshold` cannot hold). Without more, the activation is π · 1[π > θ] and
    latents may be negative where θ < 0: circuit-tracer's `JumpReLU`
    (transcoder/activation_functions.py)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log_threshold.requires_grad_(False)  # unused: θ is the buffer below
        self.register_buffer("stored_threshold", torch.zeros(self.d_sae))

    @property
    def threshold(self) -> Tensor:
        return self.stored_threshold

    @torch.no_grad()
    def load_folded(self, tensors: dict[str, Tensor]) -> None:
        tensors, threshold = self.pop_threshold(tensors)
        super(JumpReLUSAE, self).load_folded(tensors)
        self.stored_threshold.copy_(threshold)


class OutsideJumpReLUSAE(_AsTheirLibrary, _StoredThreshold, JumpReLUSAE):
    """z = ReLU(π) · 1[π > θ] with θ [d_sae] as stored (any sign): SAELens `jumprelu` (and the
    BatchTopK/Matryoshka SAEs it saves as one), `jumprelu_transcoder`, dictionary_learning
    `JumpReluAutoEncoder`."""

    def activate_entries(self, entries, training: bool) -> Tensor:
        return JumpReLUFunction.apply(entries.pre, entries.at(self.threshold), self.bandwidth).relu()


class CircuitTracerJumpReLUSAE(_AsTheirLibrary, _StoredThreshold, JumpReLUSAE):
    """A circuit-tracer per-layer JumpReLU transcoder (`SingleLayerTranscoder` with a threshold)."""


class CircuitTracerCrossLayerJumpReLU(_AsTheirLibrary, _StoredThreshold, CrossLayerJumpReLU):
    """A circuit-tracer JumpReLU `CrossLayerTranscoder`: per-layer encoders, decoders to every
    later layer, θ per latent as stored."""


class CircuitTracerCrossLayerReLU(_AsTheirLibrary, CrossLayer, ReLUL1SAE):
    """A circuit-tracer ReLU `CrossLayerTranscoder` (no threshold stored)."""


#: the class a reader builds for each mechanism name
OUTSIDE_CLASSES = {
    "relu_l1": OutsideReLUSAE, "topk": OutsideTopKSAE, "gated": OutsideGatedSAE, "jumprelu": OutsideJumpReLUSAE,
    "batchtopk": OutsideBatchTopKSAE, "matryoshka": OutsideMatryoshkaSAE,
    "circuit_tracer_jumprelu": CircuitTracerJumpReLUSAE, "circuit_tracer_clt_jumprelu": CircuitTracerCrossLayerJumpReLU,
    "circuit_tracer_clt_relu": CircuitTracerCrossLayerReLU,
}  # fmt: skip
