"""dictionary_learning checkpoints (saprmarks/dictionary_learning, checked with 0.1.0): a folder
with `ae.pt` (the dictionary's `state_dict`, saved with `torch.save` in raw activation units: the
trainer scales a normalised run's biases back before saving) and `config.json`
(`{"trainer": {"dict_class", "activation_dim", "dict_size", "k", "lm_name", "layer",
"submodule_name", ...}, "buffer": {...}}`).

The classes and their inference forward (`encode`'s defaults; x̄ = x − b_dec):

    AutoEncoder              z = ReLU(x̄ Wᵀ + b)                 encoder.weight [D, d], bias = b_dec
    AutoEncoderNew           z = ReLU(x Wᵀ + b), ŷ = z Dᵀ + c    no pre-encoder bias; decoder.bias
    AutoEncoderTopK          z = TopK_k(ReLU(x̄ Wᵀ + b))         forward uses TopK, not its threshold
    BatchTopKSAE             z = a · 1[a > θ], a = ReLU(x̄ Wᵀ + b)  θ a scalar (−1 until learned: z = a)
    MatryoshkaBatchTopKSAE   as BatchTopKSAE with W_enc [d, D] ; nested groups `group_sizes`
    JumpReluAutoEncoder      z = ReLU(π · 1[π > θ]), π = x W_enc + b_enc   θ [D]
    GatedAutoEncoder         1[x̄ Wᵀ + b_gate > 0] · ReLU(exp(r_mag) ⊙ x̄ Wᵀ + b_mag)

`AutoEncoder.from_pretrained` normalises the decoder rows by default (folding their norms into
the encoder; the output is unchanged, each latent is scaled by its row's norm): the reader does
the same, so the latents are those of dictionary_learning's own loader. The other classes load as
stored. nn.Linear weights are stored [out, in]; they are transposed into dictlearn's W_enc [d_in, d_sae]
and W_dec [d_sae, d_out]. `lm_name` is recorded as the model; `submodule_name` is the name the
training script gave the site, not a module path, so it is kept as `dictionary_learning_submodule`
and `dictlearn evaluate` needs `--hook`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dictlearn.dictionaries.readers.common import Outside, build, field_of, read_json, tensor
from dictlearn.errors import DataError

WEIGHTS_NAME, CFG_NAME = "ae.pt", "config.json"

# dict_class -> (mechanism, {dictlearn name: (file name, "linear" when stored [out, in])}, apply_b_dec)
_CLASSES = {
    "AutoEncoder": ("relu_l1", {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                                "W_dec": ("decoder.weight", True), "b_dec": ("bias", False)}, True),
    "AutoEncoderNew": ("relu_l1", {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                                   "W_dec": ("decoder.weight", True), "b_dec": ("decoder.bias", False)}, False),
    "AutoEncoderTopK": ("topk", {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                                 "W_dec": ("decoder.weight", True), "b_dec": ("b_dec", False)}, True),
    "BatchTopKSAE": ("batchtopk", {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                                   "W_dec": ("decoder.weight", True), "b_dec": ("b_dec", False)}, True),
    "MatryoshkaBatchTopKSAE": ("matryoshka", {"W_enc": ("W_enc", False), "b_enc": ("b_enc", False),
                                              "W_dec": ("W_dec", False), "b_dec": ("b_dec", False)}, True),
    "JumpReluAutoEncoder": ("jumprelu", {"W_enc": ("W_enc", False), "b_enc": ("b_enc", False),
                                         "W_dec": ("W_dec", False), "b_dec": ("b_dec", False),
                                         "threshold": ("threshold", False)}, False),
    "GatedAutoEncoder": ("gated", {"W_enc": ("encoder.weight", True), "b_gate": ("gate_bias", False),
                                   "r_mag": ("r_mag", False), "b_mag": ("mag_bias", False),
                                   "W_dec": ("decoder.weight", True), "b_dec": ("decoder_bias", False)}, True),
}  # fmt: skip


def is_dictionary_learning(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file()


def read(folder: Path) -> Outside:
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise DataError(f"{cfg_path}: no 'trainer' object; not a dictionary_learning config")
    name = field_of(trainer, "dict_class", cfg_path, str)
    if name not in _CLASSES:
        raise DataError(f"{cfg_path}: field 'trainer.dict_class' is {name!r}, which dictlearn does not read; "
                        f"it reads {', '.join(_CLASSES)}")
    mechanism, names, apply_b_dec = _CLASSES[name]
    d_in, d_sae = field_of(trainer, "activation_dim", cfg_path), field_of(trainer, "dict_size", cfg_path)
    state = _state_dict(weights_path)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    tensors = {}
    for ours, (theirs, linear) in names.items():
        shape = shapes.get(ours, (d_sae,))
        stored = tuple(reversed(shape)) if linear else shape
        value = tensor(state, theirs, stored, weights_path, f" ({name}, {'nn.Linear [out, in]' if linear else ours})")
        tensors[ours] = value.T.contiguous() if linear else value
    if name == "AutoEncoder":  # as its from_pretrained (normalize_decoder=True, the default) reads it
        norms = tensors["W_dec"].norm(dim=-1).clamp_min(1e-12)
        tensors |= {"W_enc": tensors["W_enc"] * norms, "b_enc": tensors["b_enc"] * norms,
                    "W_dec": tensors["W_dec"] / norms[:, None]}
    arguments = dict(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec)
    if mechanism == "jumprelu":
        arguments["apply_b_dec_to_input"] = bool(trainer.get("apply_b_dec_to_input", False))
    if mechanism in ("topk", "batchtopk", "matryoshka"):
        arguments["k"] = int(tensor(state, "k", (), weights_path, f" ({name})").item())
    if mechanism in ("batchtopk", "matryoshka"):
        tensors["threshold"] = tensor(state, "threshold", (), weights_path, f" ({name})").expand(d_sae).clone()
    if mechanism == "matryoshka":
        arguments["prefix_fractions"] = _prefix_fractions(state, d_sae, weights_path)
    metadata = {"source_architecture": name, "model_name": trainer.get("lm_name"),
                "dictionary_learning_submodule": trainer.get("submodule_name"),
                "dictionary_learning_layer": trainer.get("layer")}
    return Outside(build(mechanism, tensors, weights_path, **arguments), "dictionary_learning", folder,
                   {k: v for k, v in metadata.items() if v is not None})


def _state_dict(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing; the folder is not complete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, or not a torch file
        raise DataError(f"{path}: cannot read ({error}); the file is truncated or not a state_dict") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return state


def _prefix_fractions(state: dict, d_sae: int, where: Path) -> list[float]:
    """group_sizes [M] -> the cumulative fractions of d_sae (the nested prefixes)."""
    sizes = state.get("group_sizes")
    if sizes is None or sizes.dim() != 1 or int(sizes.sum()) != d_sae:
        raise DataError(f"{where}: tensor 'group_sizes' must be 1-D and sum to dict_size {d_sae}; got "
                        f"{None if sizes is None else sizes.tolist()}")
    return [float(w) / d_sae for w in sizes.cumsum(0).tolist()]
