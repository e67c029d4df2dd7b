"""EleutherAI sparsify folders (checked with eai-sparsify 1.3): one sub-folder per hookpoint, each
with `cfg.json` (`SparseCoderConfig` + `d_in`) and `sae.safetensors`; a training run's folder also
holds `config.json` (the run's, with `model` when trained from sparsify's command line).

Tensors: encoder.weight [d_sae, d_in] (an `nn.Linear`: the transpose of SAELens' W_enc),
encoder.bias [d_sae], W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in] with
`skip_connection`. sparsify's forward (`SparseCoder.encode`/`decode`/`forward`):

    π = ReLU((x − b_dec·[not transcode]) Wᵀ + b),  z = TopK_k(π),  ŷ = z W_dec + b_dec (+ x W_skipᵀ)

which is dictlearn's TopK (the ReLU before the selection keeps the same values). The `groupmax`
activation is not read. Hookpoints are module paths below the model's `base_model` (`layers.6`),
not dictlearn hook names, so they are recorded as `sparsify_hookpoint` and not as `hook_name`:
pass `--hook` to `dictlearn evaluate`.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.dictionaries.readers.common import Outside, build, field_of, read_json, read_safetensors, tensor
from dictlearn.errors import DataError

CFG_NAME, WEIGHTS_NAME, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"


def is_sparsify(folder: Path) -> bool:
    return bool(hookpoints(folder)) or _is_coder(folder)


def _is_coder(folder: Path) -> bool:
    return (folder / CFG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def hookpoints(folder: Path) -> list[str]:
    """The hookpoint sub-folders of a run folder (sorted)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_coder(p))


def read(folder: Path, hookpoint: str | None = None) -> Outside:
    """A sparsify coder folder, or a run folder and one of its hookpoints -> the Dictionary."""
    run = None
    if not _is_coder(folder):
        names = hookpoints(folder)
        if hookpoint is None:
            if len(names) != 1:
                raise DataError(f"{folder}: a sparsify run with {len(names)} hookpoints; pick one with "
                                f"hookpoint= (--hookpoint): {', '.join(names)}")
            hookpoint = names[0]
        elif hookpoint not in names:
            raise DataError(f"{folder}: no hookpoint {hookpoint!r}; it holds {', '.join(names) or 'none'}")
        run, folder = folder, folder / hookpoint
    elif hookpoint is not None and hookpoint != folder.name:
        raise DataError(f"{folder}: a single sparsify coder ({folder.name}); drop hookpoint={hookpoint!r}")
    return _read_coder(folder, run)


def _read_coder(folder: Path, run: Path | None) -> Outside:
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    cfg = read_json(cfg_path)
    activation = field_of(cfg, "activation", cfg_path, str, "topk")
    if activation != "topk":
        raise DataError(f"{cfg_path}: field 'activation' is {activation!r}; dictlearn reads sparsify's 'topk' only")
    d_in, k = field_of(cfg, "d_in", cfg_path), field_of(cfg, "k", cfg_path)
    raw = read_safetensors(weights_path)
    encoder = raw.get("encoder.weight")
    d_sae = field_of(cfg, "num_latents", cfg_path, int, 0) or (encoder.shape[0] if encoder is not None else 0)
    transcoder, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    if skip and not transcoder:  # dictlearn's skip belongs to transcoders (an SAE's would learn the identity)
        raise DataError(f"{cfg_path}: field 'skip_connection' is true but 'transcode' is false; dictlearn reads "
                        "sparsify's skip connection on transcoders only")
    d_out = raw["b_dec"].shape[0] if "b_dec" in raw and raw["b_dec"].dim() == 1 else d_in
    tensors = {
        "W_enc": tensor(raw, "encoder.weight", (d_sae, d_in), weights_path, " (sparsify's [d_sae, d_in])").T.contiguous(),
        "b_enc": tensor(raw, "encoder.bias", (d_sae,), weights_path),
        "W_dec": tensor(raw, "W_dec", (d_sae, d_out), weights_path),
        "b_dec": tensor(raw, "b_dec", (d_out,), weights_path),
    }
    if skip:
        tensors["W_skip"] = tensor(raw, "W_skip", (d_out, d_in), weights_path, " (skip_connection is true)")
    dictionary = build("topk", tensors, weights_path, d_in=d_in, d_sae=d_sae, d_out=d_out, k=k,
                       transcoder=transcoder, skip_connection=skip, apply_b_dec_to_input=not transcoder)
    kind = "skip_transcoder" if skip else "transcoder" if transcoder else "sae"
    metadata = {"sparsify_hookpoint": folder.name, "source_architecture": f"topk_{kind}"}
    if run is not None and (run / RUN_CONFIG).is_file():
        model = read_json(run / RUN_CONFIG).get("model")
        if isinstance(model, str) and model:
            metadata["model_name"] = model
    return Outside(dictionary, "sparsify", run or folder, metadata)
