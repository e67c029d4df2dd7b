"""circuit-tracer folders: per-layer transcoder sets and cross-layer transcoders (circuit-tracer 0.5).

The layout is the one circuit-tracer's local cache holds (utils/caching.py,
`load_transcoders_from_cache`): a folder with `config.yaml` and safetensors files.

    config.yaml   model_kind: transcoder_set | cross_layer_transcoder, feature_input_hook,
                  feature_output_hook (TransformerLens hook names inside `blocks.{layer}`), model_name
    transcoder_set, one file per layer, `layer_{i}.safetensors` (`load_relu_transcoder`):
        W_enc [d_sae, d_model]  b_enc [d_sae]  W_dec [d_sae, d_model]  b_dec [d_model]
        activation_function.threshold [d_sae]   (present: JumpReLU; absent: ReLU)
        W_skip [d_model, d_model]                (optional; added as x W_skipᵀ)
    cross_layer_transcoder, two files per layer (`load_clt`):
        W_enc_{i}.safetensors: W_enc_{i} [d_sae, d_model], b_enc_{i} [d_sae], b_dec_{i} [d_model],
                               threshold_{i} [d_sae] (present: JumpReLU; absent: ReLU)
        W_dec_{i}.safetensors: W_dec_{i} [d_sae, n_layers − i, d_model]  (to layers i … n_layers−1)

circuit-tracer's forward (transcoder/*.py): π = x W_encᵀ + b_enc; z = π · 1[π > θ] (JumpReLU, no
ReLU after it) or ReLU(π); a per-layer transcoder decodes ŷ = z W_dec + b_dec (+ x W_skipᵀ); a CLT
decodes ŷ_ℓ' = Σ_{ℓ ≤ ℓ'} z_ℓ W_dec_ℓ[:, ℓ' − ℓ] + b_dec_ℓ'. Every width is d_model (a transcoder
maps one residual-width activation to another). The reader builds the dictlearn classes that
compute exactly this (variants.py), latents as circuit-tracer reports them (no decoder-norm factor).
A CLT's `load_clt` reads no skip weights, so a CLT folder has none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dictlearn.dictionaries.model import Dictionary
from dictlearn.dictionaries.readers.common import Outside, build, read_safetensors, tensor
from dictlearn.errors import DataError

CONFIG_NAME = "config.yaml"
KINDS = ("transcoder_set", "cross_layer_transcoder")
LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
THRESHOLD = "activation_function.threshold"


def is_circuit_tracer(folder: Path) -> bool:
    """A folder with config.yaml and a circuit-tracer file of layer 0."""
    return (folder / CONFIG_NAME).is_file() and any(
        (folder / name).is_file() for name in ("layer_0.safetensors", "W_enc_0.safetensors"))


def read_config(folder: Path) -> dict:
    """config.yaml as a dict (JSON, which dictlearn writes, or YAML, which circuit-tracer's cache
    writes); a one-line DataError naming the file and field otherwise."""
    path = folder / CONFIG_NAME
    text = path.read_text(errors="replace")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML comes with Lightning
            raise DataError(f"{path}: not JSON, and PyYAML is not installed to read it as YAML") from None
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DataError(f"{path}: not valid YAML ({str(error).splitlines()[0]}); copy the folder again") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: holds a {type(cfg).__name__}, not a mapping; copy the folder again")
    if cfg.get("model_kind") not in KINDS:
        raise DataError(f"{path}: field 'model_kind' is {cfg.get('model_kind')!r}; circuit-tracer folders hold "
                        f"{' or '.join(KINDS)}")
    for name in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(cfg.get(name), str):
            raise DataError(f"{path}: no field {name!r} (a TransformerLens hook name inside blocks.<layer>)")
    return cfg


def layer_files(folder: Path) -> list[Path]:
    """A transcoder set's layer_{i}.safetensors in layer order; every layer 0..max must be there
    (circuit-tracer's `TranscoderSet` asserts it)."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := LAYER_FILE.fullmatch(p.name))}
    missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
    if not found or missing:
        raise DataError(f"{folder}: a transcoder set needs layer_0.safetensors … layer_<n>.safetensors; "
                        f"missing layer {missing[0] if missing else 0}")
    return [found[i] for i in range(len(found))]


def _metadata(cfg: dict, layer: int | None) -> dict:
    recorded = {"source_architecture": cfg["model_kind"], "circuit_tracer_feature_input_hook": cfg["feature_input_hook"],
                "circuit_tracer_feature_output_hook": cfg["feature_output_hook"]}
    if isinstance(cfg.get("model_name"), str):
        recorded["model_name"] = cfg["model_name"]
    if layer is not None:
        recorded["circuit_tracer_layer"] = layer
    return recorded


def read_layer(path: Path) -> Dictionary:
    """One `layer_{i}.safetensors` -> its transcoder (circuit-tracer's forward)."""
    raw = read_safetensors(path)
    if "b_enc" not in raw or "b_dec" not in raw:
        raise DataError(f"{path}: no tensor 'b_enc' or 'b_dec'; it holds {', '.join(sorted(raw)) or 'nothing'}")
    d_sae, d_model = raw["b_enc"].shape[0], raw["b_dec"].shape[0]
    tensors = {"W_enc": tensor(raw, "W_enc", (d_sae, d_model), path).T.contiguous(),
               "b_enc": tensor(raw, "b_enc", (d_sae,), path),
               "W_dec": tensor(raw, "W_dec", (d_sae, d_model), path),
               "b_dec": tensor(raw, "b_dec", (d_model,), path)}
    skip = "W_skip" in raw
    if skip:
        tensors["W_skip"] = tensor(raw, "W_skip", (d_model, d_model), path)
    arguments = dict(d_in=d_model, d_sae=d_sae, d_out=d_model, transcoder=True, skip_connection=skip)
    if THRESHOLD in raw:
        tensors["threshold"] = tensor(raw, THRESHOLD, (d_sae,), path)
        return build("circuit_tracer_jumprelu", tensors, path, **arguments)
    return build("relu_l1", tensors, path, apply_b_dec_to_input=False, **arguments)


def read_clt(folder: Path) -> Dictionary:
    """A CLT folder -> the cross-layer dictionary (concatenated widths, dictlearn.dictionaries.crosslayer)."""
    n = 0
    while (folder / f"W_enc_{n}.safetensors").is_file():
        n += 1
    if n < 2:
        raise DataError(f"{folder}: a cross-layer transcoder needs W_enc_0.safetensors and W_enc_1.safetensors at least")
    first = read_safetensors(folder / "W_enc_0.safetensors")
    if "W_enc_0" not in first:
        raise DataError(f"{folder / 'W_enc_0.safetensors'}: no tensor 'W_enc_0'")
    m, d = first["W_enc_0"].shape
    jump = "threshold_0" in first
    W_enc = torch.zeros(n * d, n * m)
    W_dec = torch.zeros(n * m, n * d)
    b_enc, b_dec, threshold = torch.zeros(n * m), torch.zeros(n * d), torch.zeros(n * m)
    for i in range(n):
        enc_path, dec_path = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
        enc, dec = read_safetensors(enc_path), read_safetensors(dec_path)
        rows, cols = slice(i * m, (i + 1) * m), slice(i * d, (i + 1) * d)
        W_enc[cols, rows] = tensor(enc, f"W_enc_{i}", (m, d), enc_path).T
        b_enc[rows] = tensor(enc, f"b_enc_{i}", (m,), enc_path)
        b_dec[cols] = tensor(enc, f"b_dec_{i}", (d,), enc_path)
        if jump:
            threshold[rows] = tensor(enc, f"threshold_{i}", (m,), enc_path, " (layer 0 has a threshold)")
        W_dec[rows, i * d:] = tensor(dec, f"W_dec_{i}", (m, n - i, d), dec_path).reshape(m, (n - i) * d)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    arguments = dict(n_layers=n, d_in=n * d, d_sae=n * m, d_out=n * d)
    if jump:
        return build("circuit_tracer_clt_jumprelu", tensors | {"threshold": threshold}, folder, **arguments)
    return build("circuit_tracer_clt_relu", tensors, folder, apply_b_dec_to_input=False, **arguments)


def parse_layer(hookpoint: str | int, folder: Path) -> int:
    """'layer_3', '3' or 3 -> 3; a one-line DataError otherwise."""
    text = str(hookpoint)
    match = re.fullmatch(r"(?:layer_)?(\d+)", text)
    if match is None:
        raise DataError(f"hookpoint={hookpoint!r}: a circuit-tracer transcoder set names its layers layer_0, "
                        f"layer_1, … ({folder})")
    return int(match.group(1))


def read(folder: Path, hookpoint: str | int | None = None) -> Outside:
    """A circuit-tracer folder -> one dictionary: the CLT, or the set's transcoder of layer
    `hookpoint` (needed when the set has more than one)."""
    cfg = read_config(folder)
    if cfg["model_kind"] == "cross_layer_transcoder":
        if hookpoint is not None:
            raise DataError(f"hookpoint={hookpoint!r}: {folder} holds one cross-layer transcoder; drop hookpoint")
        return Outside(read_clt(folder), "circuit_tracer", folder, _metadata(cfg, None))
    files = layer_files(folder)
    if hookpoint is None and len(files) > 1:
        raise DataError(f"{folder}: a circuit-tracer set of {len(files)} per-layer transcoders; name one with "
                        f"hookpoint= / --hookpoint (layer_0 … layer_{len(files) - 1})")
    layer = 0 if hookpoint is None else parse_layer(hookpoint, folder)
    if layer >= len(files):
        raise DataError(f"hookpoint={hookpoint!r}: {folder} holds layers 0 … {len(files) - 1}")
    return Outside(read_layer(files[layer]), "circuit_tracer", folder, _metadata(cfg, layer))


def read_replacement(folder: str | Path) -> list[Dictionary]:
    """Every dictionary of a circuit-tracer folder, for a replacement model: the set's transcoders
    in layer order, or [the CLT] (`dictlearn.replacement.TranscoderSet` takes the former; a
    cross-layer dictionary is a replacement itself)."""
    folder = Path(folder)
    cfg = read_config(folder)
    if cfg["model_kind"] == "cross_layer_transcoder":
        return [read_clt(folder)]
    return [read_layer(path) for path in layer_files(folder)]
