"""Export for circuit tracing: per-layer transcoder sets and CLTs in circuit-tracer 0.5's layout.

circuit-tracer (Hanna, Piotrowski et al. 2025; github.com/safety-research/circuit-tracer) builds
attribution graphs from a replacement model whose MLPs are per-layer transcoders or a cross-layer
transcoder (Ameisen et al. 2025). `export_circuit_tracer` writes a folder its cache loader reads
(`circuit_tracer.utils.caching.load_transcoders_from_cache`; `load_transcoder_set` /
`load_clt` on the files directly): the layout is in `dictlearn.dictionaries.readers.circuit_tracer`,
which reads it back (`dictlearn.load(folder, hookpoint="layer_2")`).

What maps. circuit-tracer 0.5's loaders build one of two activations: JumpReLU when a threshold is
stored (z = π · 1[π > θ]), ReLU otherwise. So these export exactly (weights folded to raw units as
the SAELens export folds them, decoder rows unit-norm):
- JumpReLU transcoders and skip transcoders, and JumpReLU CLTs;
- BatchTopK and Matryoshka transcoders: their inference rule is one threshold (a > θ), a JumpReLU;
- ReLU (L1) transcoders and skip transcoders;
- outside dictionaries of those kinds (a SAELens JumpReLU's ReLU(π) · 1[π > θ] is π · 1[π > max(θ, 0)]).
What does not, refused in one line: TopK (per-layer TopK transcoders and TopK CLTs; circuit-tracer
has a `TopK` module but no loader builds it, so the file would load as a ReLU and fire on every
positive pre-activation), Gated, SAEs (not transcoders), transcoders whose input and output widths
differ (circuit-tracer's widths are all d_model), skip connections on a CLT (`load_clt` reads none)
and per-layer sets whose dictionaries differ in width or skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.crosslayer import CrossLayer, CrossLayerJumpReLU
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.model import Dictionary
from dictlearn.dictionaries.readers import circuit_tracer as layout
from dictlearn.dictionaries.readers.variants import CircuitTracerCrossLayerReLU
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.errors import ConfigError
from dictlearn.export import folded_tensors
from dictlearn.io import atomic_dir
from dictlearn.version import dictlearn_version

CIRCUIT_TRACER_VERSION = "0.5.0"  # the release whose loaders this layout was checked against
#: TransformerLens hooks inside blocks.<layer> for a GPT-2-style model: the MLP's input (after
#: ln_2, its weight and bias applied) and its output
INPUT_HOOK, OUTPUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"


def activation_of(model: Dictionary, where: str) -> str:
    """'jump_relu' or 'relu': the circuit-tracer activation computing `model`'s latents exactly;
    a one-line ConfigError naming what does not map."""
    name = type(model).__name__
    if isinstance(model, CrossLayer):
        if isinstance(model, CrossLayerJumpReLU):
            return "jump_relu"
        if isinstance(model, CircuitTracerCrossLayerReLU):
            return "relu"
        raise ConfigError(f"{where}: {name} does not map to circuit-tracer 0.5, whose CLT loader builds JumpReLU "
                          "(threshold stored) or ReLU only — a TopK CLT would load as a ReLU and fire on every "
                          "positive pre-activation; export a JumpReLU CLT")
    if not (model.transcoder or model.W_skip is not None):
        raise ConfigError(f"{where}: {name} is an SAE; circuit-tracer replaces MLPs with transcoders "
                          "(--model.transcoder true) or CLTs")
    if model.d_in != model.d_out:
        raise ConfigError(f"{where}: reads width {model.d_in} and writes {model.d_out}; circuit-tracer's transcoders "
                          "map one d_model-wide activation to another (MLP input to MLP output)")
    if isinstance(model, (JumpReLUSAE, BatchTopKSAE)):  # BatchTopK and Matryoshka: a > θ at inference
        return "jump_relu"
    if isinstance(model, ReLUL1SAE) and not model.apply_b_dec_to_input:
        return "relu"
    raise ConfigError(f"{where}: {name} does not map to circuit-tracer 0.5, whose transcoder loader builds JumpReLU "
                      "(threshold stored) or ReLU only — a TopK transcoder would load as a ReLU and fire on every "
                      "positive pre-activation; export JumpReLU, BatchTopK or ReLU transcoders")


def _threshold(model: Dictionary, tensors: dict[str, Tensor]) -> Tensor:
    """θ for circuit-tracer's π · 1[π > θ]: where the source applies a ReLU after its threshold
    (BatchTopK, a SAELens JumpReLU), max(θ, 0) gives the same latents; dictlearn's own θ is > 0."""
    threshold = tensors["threshold"]
    return threshold if "CircuitTracer" in type(model).__name__ else threshold.clamp_min(0.0)


def layer_tensors(model: Dictionary, where: str) -> dict[str, Tensor]:
    """A per-layer transcoder -> layer_{i}.safetensors' tensors (circuit-tracer's names and layout)."""
    activation = activation_of(model, where)
    tensors = folded_tensors(model)
    out = {"W_enc": tensors["W_enc"].T.contiguous(), "b_enc": tensors["b_enc"],
           "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if activation == "jump_relu":
        out[layout.THRESHOLD] = _threshold(model, tensors)
    if "W_skip" in tensors:
        out["W_skip"] = tensors["W_skip"]
    return {k: v.contiguous() for k, v in out.items()}


def clt_files(model: CrossLayer, where: str) -> dict[str, dict[str, Tensor]]:
    """A CLT -> {file name: tensors}: W_enc_{i} / W_dec_{i}.safetensors per layer."""
    activation = activation_of(model, where)
    n, tensors = model.n_layers, folded_tensors(model)
    d, m = model.d_in // n, model.d_sae // n
    if model.d_out != model.d_in:
        raise ConfigError(f"{where}: reads {d} per layer and writes {model.d_out // n}; circuit-tracer's CLT maps "
                          "d_model to d_model at every layer")
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    files = {}
    for i in range(n):
        rows, cols = slice(i * m, (i + 1) * m), slice(i * d, (i + 1) * d)
        encoder = {f"W_enc_{i}": W_enc[cols, rows].T, f"b_enc_{i}": tensors["b_enc"][rows],
                   f"b_dec_{i}": tensors["b_dec"][cols]}
        if activation == "jump_relu":
            encoder[f"threshold_{i}"] = _threshold(model, tensors)[rows]
        files[f"W_enc_{i}.safetensors"] = encoder
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": W_dec[rows, i * d:].reshape(m, n - i, d)}
    return {name: {k: v.contiguous().clone() for k, v in group.items()} for name, group in files.items()}


def _layer_of(attrs: dict) -> int | None:
    """The block index in a recorded hook name (`transformer.h.2.mlp.input` -> 2), if any."""
    numbers = re.findall(r"\.(\d+)\.", str(attrs.get("hook_name", "")))
    return int(numbers[0]) if len(numbers) == 1 else None


def check_set(models: Sequence[Dictionary], attrs: Sequence[dict], names: Sequence[str]) -> None:
    """Per-layer transcoders that circuit-tracer's `TranscoderSet` accepts: one width and one skip
    setting for all, and — where their data recorded a hook — layers 0, 1, … in order."""
    first = models[0]
    for model, name in zip(models[1:], names[1:]):
        if (model.d_in, model.d_sae) != (first.d_in, first.d_sae):
            raise ConfigError(f"{name}: d_in {model.d_in}, d_sae {model.d_sae}, while {names[0]} has d_in {first.d_in}, "
                              f"d_sae {first.d_sae}; a circuit-tracer set needs one width for every layer")
        if (model.W_skip is None) != (first.W_skip is None):
            raise ConfigError(f"{name}: {'no ' if model.W_skip is None else ''}skip connection, unlike {names[0]}; "
                              "a circuit-tracer set has skips on every layer or on none")
    layers = [_layer_of(a) for a in attrs]
    if all(layer is not None for layer in layers) and layers != list(range(len(models))):
        raise ConfigError(f"the transcoders read the MLPs of layers {layers}; a circuit-tracer set needs layers "
                          f"0 … {len(models) - 1}, each once, given in that order")


def config(kind: str, attrs: Sequence[dict], models: Sequence[Dictionary], input_hook: str, output_hook: str) -> dict:
    """config.yaml's fields (written as JSON, which YAML loaders read)."""
    cfg = {"model_kind": kind, "feature_input_hook": input_hook, "feature_output_hook": output_hook}
    names = {a.get("model_name") for a in attrs}
    if len(names) == 1 and isinstance(next(iter(names)), str):
        cfg["model_name"] = next(iter(names))
    cfg["dictlearn"] = {
        "version": dictlearn_version(), "circuit_tracer_version": CIRCUIT_TRACER_VERSION,
        "classes": [f"{type(m).__module__}.{type(m).__qualname__}" for m in models],
        "data": list(attrs),
    }
    return cfg


def export_circuit_tracer(models: Sequence[Dictionary], out: str | Path, attrs: Sequence[dict] | None = None,
                          names: Sequence[str] | None = None, input_hook: str = INPUT_HOOK,
                          output_hook: str = OUTPUT_HOOK) -> Path:
    """Write `models` — [one CLT] or per-layer transcoders in layer order — as a circuit-tracer
    folder at `out`, atomically (a one-line ConfigError before anything is written when they do
    not map). An existing folder is replaced only when empty or a previous circuit-tracer export."""
    models = list(models)
    attrs = list(attrs) if attrs is not None else [{} for _ in models]
    names = list(names) if names is not None else [f"dictionary {i}" for i in range(len(models))]
    if not models:
        raise ConfigError("export --format circuit-tracer: no dictionary given")
    if any(isinstance(m, CrossLayer) for m in models):
        if len(models) != 1:
            raise ConfigError("a cross-layer transcoder is a whole replacement; export it alone, not in a set")
        files, kind = clt_files(models[0], names[0]), "cross_layer_transcoder"
    else:
        check_set(models, attrs, names)
        files = {f"layer_{i}.safetensors": layer_tensors(m, n) for i, (m, n) in enumerate(zip(models, names))}
        kind = "transcoder_set"
    for name, group in files.items():
        bad = next((k for k, v in group.items() if not torch.isfinite(v).all()), None)
        if bad is not None:
            raise ConfigError(f"{name}: tensor {bad} holds NaN or Inf; the dictionary did not train")
    cfg = config(kind, attrs, models, input_hook, output_hook)
    with atomic_dir(out, previous=is_circuit_tracer_export) as tmp:
        for name, group in files.items():
            save_file(group, str(tmp / name), metadata={"format": "pt"})
        (tmp / layout.CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return Path(out)


def is_circuit_tracer_export(folder: Path) -> bool:
    """Whether `folder` is a circuit-tracer folder written by dictlearn and nothing else."""
    pattern = re.compile(r"config\.yaml|layer_\d+\.safetensors|W_(enc|dec)_\d+\.safetensors")
    if not all(pattern.fullmatch(p.name) for p in folder.iterdir()):
        return False
    try:
        return isinstance(layout.read_config(folder).get("dictlearn"), dict)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to replace
        return False
