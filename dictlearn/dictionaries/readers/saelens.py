"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (SAELens 6.x; checked with 6.54).

Tensors, SAELens' names and layout: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out],
b_dec [d_out]; `jumprelu` adds threshold [d_sae]; `gated` has b_gate, r_mag, b_mag instead of
b_enc; skip transcoders add W_skip [d_out, d_in]. SAELens' inference forward (saes/*.py):

    x' = x · s − b_dec · a          s: the normalisation scale, a: `apply_b_dec_to_input`
    π  = x' W_enc + b_enc
    z  = ReLU(π)                    standard, transcoder, skip_transcoder
         ReLU(TopK_k(π))            topk (π ⊙ ‖W_dec‖ ranked and kept with `rescale_acts_by_decoder_norm`)
         ReLU(π) · 1[π > θ]         jumprelu, jumprelu_transcoder (BatchTopK and Matryoshka save as this)
         gated: 1[x'W_enc + b_gate > 0] · ReLU(x' (exp(r_mag) ⊙ W_enc) + b_mag)
    ŷ  = (z W_dec + b_dec) / s  (+ x W_skipᵀ)  (z ⊘ ‖W_dec‖ first with the rescale)

The scale s (`normalize_activations: expected_average_only_in`) and the decoder-norm rescale are
folded into the weights on reading, as SAELens' own `fold_activation_norm_scaling_factor` and
`fold_W_dec_norm` do, so the dictionary takes raw activations and returns SAELens' latents.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.dictionaries.readers.common import Outside, build, field_of, read_json, read_safetensors, tensor
from dictlearn.errors import DataError

CFG_NAME, WEIGHTS_NAME = "cfg.json", "sae_weights.safetensors"
SCALER_NAME = "activation_scaler.json"  # SAELens' record of the normalisation scale (training checkpoints)

# architecture -> (mechanism, transcoder, skip)
ARCHITECTURES = {
    "standard": ("relu_l1", False, False), "gated": ("gated", False, False), "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False), "transcoder": ("relu_l1", True, False),
    "skip_transcoder": ("relu_l1", True, True), "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}  # fmt: skip
METADATA_KEYS = ("model_name", "hook_name", "hook_name_out", "context_size")


def is_saelens(folder: Path) -> bool:
    return (folder / CFG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def read(folder: Path) -> Outside:
    """A SAELens folder -> the Dictionary with SAELens' forward, and its recorded metadata."""
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    cfg = read_json(cfg_path)
    architecture = field_of(cfg, "architecture", cfg_path, str, "standard")
    if architecture not in ARCHITECTURES:
        training = architecture in ("batchtopk", "matryoshka_batchtopk")  # SAELens loads neither for inference
        raise DataError(f"{cfg_path}: field 'architecture' is {architecture!r}, which dictlearn does not read; "
                        + ("a training checkpoint: save it with SAELens' save_inference_model (a jumprelu)"
                           if training else f"it reads {', '.join(ARCHITECTURES)}"))
    mechanism, transcoder, skip = ARCHITECTURES[architecture]
    d_in, d_sae = field_of(cfg, "d_in", cfg_path), field_of(cfg, "d_sae", cfg_path)
    d_out = field_of(cfg, "d_out", cfg_path, int, d_in)
    raw = read_safetensors(weights_path)
    W_dec = tensor(raw, "W_dec", (d_sae, d_out), weights_path)
    tensors = {"W_enc": tensor(raw, "W_enc", (d_in, d_sae), weights_path), "W_dec": W_dec,
               "b_dec": tensor(raw, "b_dec", (d_out,), weights_path)}
    if mechanism == "gated":
        tensors |= {name: tensor(raw, name, (d_sae,), weights_path) for name in ("b_gate", "r_mag", "b_mag")}
    else:
        tensors["b_enc"] = tensor(raw, "b_enc", (d_sae,), weights_path)
    if mechanism == "jumprelu":
        tensors["threshold"] = tensor(raw, "threshold", (d_sae,), weights_path, f" (architecture {architecture})")
    if skip:
        tensors["W_skip"] = tensor(raw, "W_skip", (d_out, d_in), weights_path, f" (architecture {architecture})")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder
    arguments = dict(d_in=d_in, d_sae=d_sae, d_out=d_out, transcoder=transcoder, skip_connection=skip,
                     apply_b_dec_to_input=apply_b_dec)
    if mechanism == "topk":
        arguments["k"] = field_of(cfg, "k", cfg_path)
        if cfg.get("rescale_acts_by_decoder_norm", False):
            _fold_decoder_norm(tensors)
    _fold_scale(tensors, _normalisation_scale(cfg, folder), transcoder)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg  # before 6.0: top level
    recorded = {k: metadata[k] for k in METADATA_KEYS if metadata.get(k) is not None}
    return Outside(build(mechanism, tensors, weights_path, **arguments), "saelens", folder,
                   recorded | {"source_architecture": architecture})


def _normalisation_scale(cfg: dict, folder: Path) -> float:
    """s of `normalize_activations` (1 for `none`); other schemes are a one-line DataError."""
    cfg_path = folder / CFG_NAME
    scheme = cfg.get("normalize_activations") or "none"
    if scheme == "none":
        return 1.0
    if scheme != "expected_average_only_in":
        raise DataError(f"{cfg_path}: field 'normalize_activations' is {scheme!r}; dictlearn reads 'none' and "
                        "'expected_average_only_in' (fold the normalisation into the weights with SAELens first)")
    scaler = folder / SCALER_NAME
    # No scaler, or one whose factor is null: SAELens' trainer folded the factor into the weights
    # before its final save (and kept the field), and `SAE.load_from_disk` applies none either.
    value = read_json(scaler).get("scaling_factor") if scaler.is_file() else None
    if value is None:
        return 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise DataError(f"{scaler}: field 'scaling_factor' is {value!r}, not a positive number")
    return float(value)


def _fold_decoder_norm(tensors: dict) -> None:
    """`rescale_acts_by_decoder_norm`: SAELens ranks and reports π_i ‖d_i‖ and decodes z_i / ‖d_i‖:
    the same as an encoder times ‖d_i‖ and unit decoder rows."""
    norms = tensors["W_dec"].norm(dim=-1)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]


def _fold_scale(tensors: dict, scale: float, transcoder: bool) -> None:
    """x·s in, ŷ/s out folded into the weights (SAELens `fold_activation_norm_scaling_factor`):
    (x s − b_dec) W_enc = (x − b_dec/s)(s W_enc), and (z W_dec + b_dec)/s = z (W_dec/s) + b_dec/s.
    A SAELens transcoder scales its input only (its output is another activation): W_enc alone."""
    if scale == 1.0:
        return
    tensors["W_enc"] = tensors["W_enc"] * scale
    if transcoder:
        return
    tensors["W_dec"] = tensors["W_dec"] / scale
    tensors["b_dec"] = tensors["b_dec"] / scale
