"""Export in the SAELens layout, and `load` for exports and checkpoints.

An export folder holds `cfg.json` and `sae_weights.safetensors` (`W_enc [d_in, d_sae]`,
`b_enc [d_sae]`, `W_dec [d_sae, d_out]`, `b_dec [d_out]`, `W_skip [d_out, d_in]` for skip
transcoders), so SAELens, SAEBench and Neuronpedia tools load it. Weights are *folded*: the data
scales (training sees activations times a per-dataset scale) and the decoder row norms (each
latent is reported as its activation times its decoder row's norm; docs/architectures.md) are
absorbed, so the export takes raw activations and its decoder rows have unit norm. dictlearn's own
fields live under `metadata.dictlearn` (class, constructor arguments, the folded scales).

`load` on an unreadable export (a truncated safetensors file, a cfg.json that is not JSON or not
dictlearn's) raises a one-line `DataError` naming the file.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dictlearn.dictionaries.model import Dictionary, model_arguments
from dictlearn.dictionaries.readers import FORMATS, Outside, detect
from dictlearn.dictionaries.readers import read as read_outside
from dictlearn.dictionaries.readers.common import read_json
from dictlearn.errors import DataError
from dictlearn.io import atomic_dir
from dictlearn.version import dictlearn_version

CFG_NAME, WEIGHTS_NAME = "cfg.json", "sae_weights.safetensors"
STATISTICS_NAME = "latent_statistics.safetensors"  # written beside the weights by dictlearn inspect
SAE_LENS_VERSION = "6.54.12"  # the SAELens release whose loader this layout was checked against


@torch.no_grad()
def folded_tensors(model: Dictionary) -> dict[str, torch.Tensor]:
    """The model's weights in raw-activation units with unit decoder rows (float32, contiguous)."""
    s_in, s_out = float(model.input_scale), float(model.target_scale)
    # Reported latents are training latents × ls (ls = ‖d_i‖ / s_out); a positive per-latent
    # factor commutes with the activation, so it moves into the encoder.
    ls = model.latent_scale()
    tensors = {
        "W_enc": model.W_enc * s_in * ls,
        "b_enc": model.b_enc * ls,
        "W_dec": model.W_dec / (ls * s_out)[:, None],
        "b_dec": model.b_dec / s_out,
    }
    if model.W_skip is not None:
        tensors["W_skip"] = model.W_skip * (s_in / s_out)
    tensors = model.adapt_export_tensors(tensors, ls)
    return {name: t.detach().float().cpu().contiguous().clone() for name, t in tensors.items()}


def _hyper_parameters(model: Dictionary) -> dict:
    """Constructor arguments, JSON-able, without LightningCLI's private keys."""
    return {k: v for k, v in dict(model.hparams).items() if not str(k).startswith("_")}


def export_config(model: Dictionary, data_attrs: dict | None = None) -> dict:
    """cfg.json for `model` in the SAELens layout (+ dictlearn's metadata)."""
    data_attrs = data_attrs or {}
    cls = type(model)
    cfg = {
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(model.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": _architecture(model),
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            **{k: data_attrs[k] for k in ("model_name", "hook_name", "hook_name_out", "context_size") if k in data_attrs},
            "dictlearn": {
                "version": dictlearn_version(),
                "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "hyper_parameters": _hyper_parameters(model),
                "folded_input_scale": float(model.input_scale),
                "folded_target_scale": float(model.target_scale),
                # False for a dictionary read from another library: its latents are that library's
                "decoder_rows_unit_norm": not getattr(model, "latents_as_recorded", False),
                "data": {k: v for k, v in data_attrs.items()},
            },
        },
    }
    if model.transcoder or model.W_skip is not None:
        cfg["d_out"] = model.d_out
    cfg.update(model.export_fields())
    return cfg


# SAELens has transcoder classes for ReLU and JumpReLU only (saes/transcoder.py); other
# mechanisms' transcoders are written in the same layout under a name SAELens does not load.
_SAE_LENS_TRANSCODERS = {
    ("standard", False): "transcoder", ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder",
}


def _architecture(model: Dictionary) -> str:
    """SAELens architecture name: the mechanism's, or its transcoder variant."""
    name, skip = model.sae_lens_architecture, model.W_skip is not None
    if not (model.transcoder or skip):
        return name
    return _SAE_LENS_TRANSCODERS.get((name, skip), f"{name}_{'skip_' if skip else ''}transcoder")


def is_export(folder: Path) -> bool:
    """Whether `folder` is a dictlearn export and nothing else (only export files, a cfg.json with
    metadata.dictlearn): the one kind of non-empty folder `export` may replace, so a person's files
    (or another tool's SAE) are never deleted by an export written over them."""
    if not {p.name for p in folder.iterdir()} <= {CFG_NAME, WEIGHTS_NAME, STATISTICS_NAME}:
        return False
    try:
        return isinstance(read_config(folder).get("metadata", {}).get("dictlearn"), dict)
    except (DataError, AttributeError):
        return False


def export(model: Dictionary, out: str | Path, data_attrs: dict | None = None) -> Path:
    """Write `model` as an export folder at `out`, atomically. -> the folder.

    An existing folder at `out` is replaced only when it is empty or a previous export (`is_export`);
    anything else raises a one-line ConfigError before anything is written."""
    cfg = export_config(model, data_attrs)
    tensors = folded_tensors(model)
    with atomic_dir(out, previous=is_export) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CFG_NAME).write_text(json.dumps(cfg, indent=2, default=_json_default) + "\n")
    return Path(out)


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _import_class(class_path: str) -> type[Dictionary]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise DataError(f"cannot import dictionary class {class_path!r}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, Dictionary)):
        raise DataError(f"{class_path!r} is not a dictlearn Dictionary")
    return cls


def load(path: str | Path, member: str | None = None, *, format: str | None = None,
         hookpoint: str | None = None) -> Dictionary:
    """A Dictionary from an export folder, a Lightning checkpoint or another library's folder
    (SAELens, sparsify, dictionary_learning, circuit-tracer: `dictlearn.dictionaries.readers`), in eval mode.

    Exports and checkpoints give the same `encode`/`decode` on raw activations; an outside folder
    gives its library's own. A sweep's checkpoint holds several dictionaries: name the one you
    want with `member`. `format` names a folder's format (None: detected from its files);
    `hookpoint` picks one coder of a sparsify run folder, or one layer (`layer_3`) of a circuit-tracer
    transcoder set.
    """
    return load_with_config(path, member, format=format, hookpoint=hookpoint)[0]


def load_with_config(path: str | Path, member: str | None = None, *, format: str | None = None,
                     hookpoint: str | None = None) -> tuple[Dictionary, dict | None]:
    """(`load`'s Dictionary, its cfg.json): an export's own; for an outside folder the cfg.json its
    dictlearn export would have, with the folder's recorded model and hook under `metadata` and
    top-level `format` and `source`; None for a checkpoint (its cfg comes from the checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == "ae.pt" and (path.parent / "config.json").is_file():
        path = path.parent  # dictionary_learning's weights file: its folder holds the config too
    if format is not None and format not in FORMATS:
        raise DataError(f"format={format!r}: dictlearn reads {', '.join(FORMATS)}")
    if hookpoint is not None and not (path.is_dir() and (format or detect(path)) in ("sparsify", "circuit_tracer")):
        raise DataError(f"hookpoint={hookpoint!r}: only sparsify run folders and circuit-tracer sets hold several "
                        f"hookpoints; {path} is "
                        "not one (drop hookpoint / --hookpoint)")
    if path.is_dir():
        format = format or detect(path)
        if format == "dictlearn":
            return _load_export(path), read_config(path)
        outside = read_outside(path, format, hookpoint)
        outside.dictionary.source_format = outside.format  # saelens, sparsify or dictionary_learning
        return outside.dictionary, outside_config(outside)
    if format not in (None, "dictlearn"):
        raise DataError(f"{path}: format={format!r} names a folder, and this is not one")
    if path.is_file():
        return _load_checkpoint(path, member), None
    raise DataError(f"{path}: no such export folder or checkpoint file")


def outside_config(outside: Outside) -> dict:
    """The cfg.json of an outside dictionary's dictlearn export, plus `format` and `source`."""
    attrs = {**outside.metadata, "source": str(outside.source), "source_format": outside.format}
    return {**export_config(outside.dictionary, attrs), "format": outside.format, "source": str(outside.source)}


def _load_checkpoint(path: Path, member: str | None = None) -> Dictionary:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file
        raise DataError(f"{path}: cannot read checkpoint ({error}); pick another checkpoint") from None
    members = checkpoint.get("dictlearn_members")
    state = checkpoint.get("state_dict", {})
    if members is None:  # one dictionary, saved before sweeps: its keys at the top level
        class_path = checkpoint.get("dictlearn_class") or checkpoint.get("hyper_parameters", {}).get("_class_path")
        if class_path is None:
            raise DataError(f"{path}: not a dictlearn checkpoint (no dictionary class recorded)")
        record, prefix = {"class_path": class_path, "hyper_parameters": checkpoint.get("hyper_parameters", {})}, ""
    else:
        if member is None and len(members) != 1:
            raise DataError(f"{path}: a sweep of {len(members)} dictionaries; name one: {', '.join(members)}")
        name = member if member is not None else next(iter(members))
        if name not in members:
            raise DataError(f"{path}: no dictionary {name!r}; it holds {', '.join(members)}")
        record, prefix = members[name], f"members.{name}."
    # model_arguments: an older checkpoint's training settings (lr, ...) are not the model's any more
    model = _import_class(record["class_path"])(**model_arguments(record["hyper_parameters"]))
    own = model.state_dict()
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own})
    return _for_inference(model)


def _load_export(path: Path) -> Dictionary:
    cfg_path, weights_path = path / CFG_NAME, path / WEIGHTS_NAME
    metadata = read_config(path).get("metadata")
    meta = metadata.get("dictlearn") if isinstance(metadata, dict) else None
    if meta is None:
        raise DataError(f"{cfg_path}: not written by dictlearn (no metadata.dictlearn); drop format='dictlearn' "
                        "to read it as a SAELens folder")
    if not (isinstance(meta, dict) and isinstance(meta.get("class_path"), str)
            and isinstance(meta.get("hyper_parameters"), dict)):
        raise DataError(f"{cfg_path}: metadata.dictlearn lacks class_path or hyper_parameters; {_REEXPORT}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{weights_path}: cannot read the weights ({error}); the file is truncated or not "
                        f"safetensors — {_REEXPORT}") from None
    try:
        model = _import_class(meta["class_path"])(**model_arguments(meta["hyper_parameters"]))
    except TypeError as error:  # written by another dictlearn version
        raise DataError(f"{cfg_path}: metadata.dictlearn.hyper_parameters do not fit {meta['class_path']} "
                        f"({error}); export it again with this dictlearn version") from None
    try:
        model.load_folded(tensors)
    except DataError as error:
        raise DataError(f"{weights_path}: {error}") from None
    return _for_inference(model)


_REEXPORT = "export it again (dictlearn export CKPT OUT) or copy the folder again"


def read_config(path: str | Path) -> dict:
    """An export folder's cfg.json as a dict; a one-line DataError when either file is missing or
    cfg.json is not a JSON object."""
    path = Path(path)
    cfg_path = path / CFG_NAME
    for required in (cfg_path, path / WEIGHTS_NAME):
        if not required.is_file():
            raise DataError(f"{path}: missing {required.name}; not an export folder")
    return read_json(cfg_path, advice=_REEXPORT)


def _for_inference(model: Dictionary) -> Dictionary:
    """Eval mode, parameters without gradients: encode/decode build no graph unless the input
    asks for one (attribution through a loaded dictionary still works: x.requires_grad_())."""
    return model.requires_grad_(False).eval()
