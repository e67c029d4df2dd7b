"""`dictlearn evaluate`: exports + an HDF5 activation file (+ a language model) -> one JSON line each.

    dictlearn evaluate runs/topk/export runs/relu/export --data acts.h5 --out results.jsonl

For each export (or dictlearn checkpoint):
- reconstruction and sparsity metrics (`ReconstructionMetrics`, `SparsityMetrics`) on the file's
  held-out rows — the tail `ActivationDataModule` holds out for validation, so they match the
  `val/` metrics of training;
- `mmcs` when the file holds the true features (`dictlearn synth`);
- downstream metrics (`dictlearn.metrics.downstream`) when a model is known (`--model`, else the
  export's `metadata.model_name`, else the file's `model_name`): the dictionary spliced into the
  model on held-out corpus windows. Without a model they are null, with a note on stderr.
Every key of a line, with its formula, is in docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch

from dictlearn.data.datamodule import ActivationDataModule
from dictlearn.dictionaries.base import Dictionary
from dictlearn.errors import ConfigError, DataError
from dictlearn.export import CFG_NAME, export_config, load
from dictlearn.io import atomic_write_text
from dictlearn.metrics import RECONSTRUCTION_NAMES, SPARSITY_NAMES, ReconstructionMetrics, SparsityMetrics, mmcs
from dictlearn.metrics.downstream import (
    DOWNSTREAM_KEYS,
    SpliceSite,
    downstream_metrics,
    heldout_batches,
    recorded_corpus,
)
from dictlearn.models.hooks import HookPoint, capture, run_until_captured

METRIC_KEYS = RECONSTRUCTION_NAMES + SPARSITY_NAMES + ("mmcs",) + DOWNSTREAM_KEYS
CONFIG_KEYS = (
    "export", "architecture", "class_path", "d_in", "d_sae", "d_out", "k", "hook_name", "hook_name_out",
    "model_name", "hyper_parameters", "data", "input_key", "target_key", "n_rows",
    "model", "corpus", "context_size", "n_contexts", "n_tokens",
)  # fmt: skip
RECORD_KEYS = CONFIG_KEYS + METRIC_KEYS
ROWS_PER_READ = 8192
# The mean-ablation value is the target's mean over this many training rows of the file
# (seeded whole blocks, `ActivationDataModule.sample_rows`): within ~1e-2 σ of the full mean.
MEAN_SAMPLE_ROWS = 65_536
DEFAULT_CONTEXTS, DEFAULT_BATCH_SIZE, DEFAULT_CONTEXT = 64, 8, 256


@dataclass
class Entry:
    """One dictionary to evaluate: its path, the model in eval mode and its cfg.json."""

    path: Path
    dictionary: Dictionary
    cfg: dict

    @property
    def meta(self) -> dict:
        return self.cfg.get("metadata", {})

    @property
    def data(self) -> dict:
        return self.meta.get("dictlearn", {}).get("data", {})


def read_entry(path: str | Path) -> Entry:
    """An export folder (its cfg.json) or a checkpoint (the cfg its export would have)."""
    path = Path(path)
    dictionary = load(path)  # a one-line DataError for a missing or foreign path
    if path.is_dir():
        cfg = json.loads((path / CFG_NAME).read_text())
    else:
        attrs = torch.load(path, map_location="cpu", weights_only=False).get("dictlearn_data", {})
        cfg = export_config(dictionary, attrs)
    return Entry(path, dictionary, cfg)


# ----------------------------------------------------------------------------- the file
def data_keys(entry: Entry, input_key: str | None, target_key: str | None) -> tuple[str, str | None]:
    """(input key, target key or None): the flags, else the keys the export was trained on."""
    input_key = input_key or entry.data.get("input_key") or entry.meta.get("hook_name") or "acts"
    if not entry.dictionary.transcoder:
        if target_key:
            raise ConfigError(f"--target-key {target_key}: {entry.path} is an SAE (its target is its input); drop it")
        return input_key, None
    target_key = target_key or entry.data.get("target_key") or entry.meta.get("hook_name_out")
    if not target_key:
        raise ConfigError(f"{entry.path} is a transcoder and records no target key; pass --target-key KEY")
    return input_key, target_key


def open_data(entry: Entry, path: str, keys: tuple[str, str | None], args) -> ActivationDataModule:
    """The file's datamodule (raw values, the training split) after checking it fits the export."""
    try:
        data = ActivationDataModule(
            path, keys[0], keys[1], batch_size=1, block_size=args.block_size, val_rows=args.val_rows, normalize="none"
        )
    except DataError as error:
        hint = "; choose the datasets with --input-key/--target-key" if "not found" in str(error) else ""
        raise DataError(f"{error}{hint}") from None
    dictionary = entry.dictionary
    for role, key, width, expected in (("d_in", keys[0], data.d_in, dictionary.d_in),
                                       ("d_out", keys[1], data.d_out, dictionary.d_out)):  # fmt: skip
        if key is not None and width != expected:
            raise DataError(
                f"{path}: dataset '{key}' has width {width} but {entry.path} has {role}={expected}; "
                "pass the file or --input-key/--target-key it was trained on"
            )
    _check_provenance(entry, data)
    return data


def _check_provenance(entry: Entry, data: ActivationDataModule) -> None:
    """The file's model and hooks are the export's, where both record them."""
    attrs, meta = data.inputs.attrs(), entry.meta
    if meta.get("model_name") and attrs.get("model_name") and meta["model_name"] != attrs["model_name"]:
        raise ConfigError(f"{entry.path} was trained on activations of model {meta['model_name']!r} but {data.path} "
                          f"was harvested from {attrs['model_name']!r}; pass a file harvested from that model")
    pairs = [("hook_name", data.input_key, attrs.get("hook_name"))]
    if data.targets is not None:
        pairs.append(("hook_name_out", data.target_key, data.targets.attrs().get("hook_name")))
    for field, key, hook in pairs:
        if meta.get(field) and hook and meta[field] != hook:
            raise ConfigError(f"{entry.path} was trained on hook_name {meta[field]!r} but {data.path}['{key}'] "
                              f"holds {hook!r}; pass the matching file or --input-key/--target-key")


@torch.no_grad()
def reconstruction_metrics(dictionary: Dictionary, data: ActivationDataModule, device: str) -> tuple[dict, int]:
    """Reconstruction + sparsity metrics on the held-out tail rows [n_train, n_rows). -> (metrics, rows)."""
    recon, sparsity = ReconstructionMetrics(dictionary.d_out).to(device), SparsityMetrics(dictionary.d_sae).to(device)
    n_rows = data.inputs.n_rows
    for start in range(data.n_train, n_rows, ROWS_PER_READ):
        stop = min(start + ROWS_PER_READ, n_rows)
        x = data.inputs.read(start, stop).to(device)
        y = x if data.targets is None else data.targets.read(start, stop).to(device)
        z = dictionary.encode(x)  # as Dictionary.validation_step
        recon.update(y, dictionary.decode(z, x))
        sparsity.update(z)
    values = {**recon.compute(), **sparsity.compute()}
    return {k: float(v) for k, v in values.items()}, n_rows - data.n_train


def feature_mmcs(path: str, dictionary: Dictionary) -> float | None:
    """MMCS of the decoder rows against the file's true features (`features`, or `features_out`
    for a transcoder, whose decoder lives in the output space); None when the file has none."""
    key = "features_out" if dictionary.transcoder else "features"
    with h5py.File(path, "r") as f:
        dataset = f.get(key)
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 2 or dataset.shape[1] != dictionary.d_out:
            return None
        features = torch.from_numpy(dataset[:]).float()
    return mmcs(features, dictionary.W_dec.detach().float().cpu())


# ----------------------------------------------------------------------------- downstream
@dataclass
class Downstream:
    """What the spliced runs used, for the record."""

    metrics: dict
    model: str
    corpus: str
    context_size: int
    n_contexts: int
    n_tokens: int


def _model_name(entry: Entry, data: ActivationDataModule, args) -> str | None:
    """--model, else the export's model, else the file's; None (with a note) when none is known."""
    name = args.model or entry.meta.get("model_name") or data.inputs.attrs().get("model_name")
    if not name:
        print(f"dictlearn: note: {entry.path}: no model recorded in the export or {data.path} and no --model; "
              "downstream metrics skipped", file=sys.stderr)
    elif args.model and entry.meta.get("model_name") not in (None, args.model):
        print(f"dictlearn: note: {entry.path} was trained on {entry.meta['model_name']}; splicing into {args.model}",
              file=sys.stderr)
    return name


def _site(entry: Entry, data: ActivationDataModule) -> SpliceSite:
    """Where the export was trained: its metadata, else the file's datasets' hook names."""
    hook_in = entry.meta.get("hook_name") or data.inputs.attrs().get("hook_name")
    hook_out = entry.meta.get("hook_name_out") or (data.targets.attrs().get("hook_name") if data.targets else None)
    return SpliceSite.from_metadata(hook_in, hook_out, entry.dictionary.transcoder)


def _check_widths(lm, site: SpliceSite, dictionary: Dictionary, tokens: torch.Tensor, export: Path) -> None:
    """The model's activations at the site have the dictionary's widths (else: another model)."""
    read = site.read or site.write
    with torch.no_grad(), capture(lm.model, [read, site.write], stop_after=True) as acts:
        run_until_captured(lm.model, tokens[:1], use_cache=False)
    for hook, expected, role in ((read, dictionary.d_in, "d_in"), (site.write, dictionary.d_out, "d_out")):
        width = acts[str(HookPoint.parse(hook))].shape[-1]
        if width != expected:
            raise ConfigError(f"model {lm.name}: hook {hook!r} has width {width} but {export} has {role}={expected}; "
                              "it was trained on another model — pass --model")


def _batches(lm, entry: Entry, attrs: dict, args, cache: dict) -> tuple[list, str | None, int]:
    """Held-out windows on the device (cached per model/corpus/context) -> (batches, corpus, context)."""
    context = int(args.context or entry.meta.get("context_size") or attrs.get("context_size") or DEFAULT_CONTEXT)
    limit = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ConfigError(f"--context {context}: model {lm.name} takes at most {limit} tokens")
    corpus = args.corpus or recorded_corpus(attrs.get("corpus"))
    key = (lm.name, corpus, context, bool(attrs.get("exclude_special", True)))
    if key not in cache:
        batches = heldout_batches(lm.tokenizer, corpus, context, args.contexts, key[-1], args.batch_size)
        cache[key] = [(t.to(args.device), s.to(args.device)) for t, s in batches]
    return cache[key], corpus, context


def run_downstream(entry: Entry, data: ActivationDataModule, args, cache: dict) -> Downstream | None:
    """Downstream metrics of one export, or None when no model is known."""
    from dictlearn.data.corpus import corpus_name
    from dictlearn.models.loading import load_model

    name = _model_name(entry, data, args)
    if not name:
        return None
    site = _site(entry, data)
    if name not in cache:
        cache[name] = load_model(name, device=args.device)
    lm = cache[name]
    batches, corpus, context = _batches(lm, entry, data.inputs.attrs(), args, cache)
    _check_widths(lm, site, entry.dictionary, batches[0][0], entry.path)
    # mean ablation: the site's mean over sampled training rows of the file (docs/evaluate.md)
    mean = data.sample_rows(MEAN_SAMPLE_ROWS)[1].double().mean(0).float().to(args.device)
    metrics, n_tokens = downstream_metrics(lm.model, entry.dictionary, site, batches, mean)
    n_contexts = sum(len(tokens) for tokens, _ in batches)
    return Downstream(metrics, lm.name, corpus_name(corpus), context, n_contexts, n_tokens)


# ----------------------------------------------------------------------------- one record
def evaluate_entry(entry: Entry, args, cache: dict) -> dict:
    """Every metric and the dictionary's config, as one JSON-able dict with keys `RECORD_KEYS`."""
    entry.dictionary.to(args.device)
    keys = data_keys(entry, args.input_key, args.target_key)
    data = open_data(entry, args.data, keys, args)
    try:
        metrics, n_rows = reconstruction_metrics(entry.dictionary, data, args.device)
        metrics["mmcs"] = feature_mmcs(args.data, entry.dictionary)
        downstream = run_downstream(entry, data, args, cache)
    finally:
        data.teardown("evaluate")
    if downstream is not None:
        metrics.update(downstream.metrics)
    return _record(entry, args.data, keys, n_rows, downstream) | {k: _finite(metrics.get(k)) for k in METRIC_KEYS}


def _record(entry: Entry, data_path: str, keys, n_rows: int, downstream: Downstream | None) -> dict:
    meta, dictionary = entry.meta, entry.dictionary
    hyper_parameters = meta.get("dictlearn", {}).get("hyper_parameters", {})
    return {
        "export": str(entry.path.resolve()),
        "architecture": entry.cfg.get("architecture"),
        "class_path": meta.get("dictlearn", {}).get("class_path"),
        "d_in": dictionary.d_in, "d_sae": dictionary.d_sae, "d_out": dictionary.d_out,
        "k": entry.cfg.get("k", hyper_parameters.get("k")),
        "hook_name": meta.get("hook_name"), "hook_name_out": meta.get("hook_name_out"),
        "model_name": meta.get("model_name"),
        "hyper_parameters": hyper_parameters,
        "data": str(Path(data_path).resolve()), "input_key": keys[0], "target_key": keys[1], "n_rows": n_rows,
        **_downstream_info(downstream),
    }  # fmt: skip


def _downstream_info(downstream: Downstream | None) -> dict:
    """model, corpus, context_size, n_contexts, n_tokens of the spliced runs; null when skipped."""
    fields = ("model", "corpus", "context_size", "n_contexts", "n_tokens")
    return {name: None if downstream is None else getattr(downstream, name) for name in fields}


def _finite(value):
    """JSON has no NaN/Inf: an undefined metric (e.g. a 0/0 recovered fraction) is null."""
    return None if value is None or not math.isfinite(value) else value


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ConfigErrors (the CLI prints them, exit 2)."""

    def error(self, message: str):
        raise ConfigError(f"evaluate: {message}; see dictlearn evaluate --help")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dictlearn evaluate", description="Export(s) + HDF5 (+ model) -> one JSON line per export.")
    p.add_argument("exports", nargs="+", metavar="EXPORT", help="export folders (or dictlearn checkpoints)")
    p.add_argument("--data", required=True, help="HDF5 activation file; metrics use its held-out tail rows")
    p.add_argument("--model", default=None,
                   help="model for downstream metrics (name or folder; default: the export's, else the file's)")
    p.add_argument("--out", default=None, help="write the JSON lines here (atomically) instead of stdout")
    p.add_argument("--contexts", type=_positive, default=DEFAULT_CONTEXTS, help="held-out corpus windows to splice")
    p.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    p.add_argument("--context", type=_positive, default=None,
                   help="window length (default: the export's context_size, else the file's)")
    p.add_argument("--corpus", default=None,
                   help="text file or folder (default: the corpus the file was harvested from)")
    p.add_argument("--input-key", default=None, help="input dataset (default: the export's)")
    p.add_argument("--target-key", default=None, help="transcoder target dataset (default: the export's)")
    p.add_argument("--val-rows", type=int, default=None, help="held-out tail rows, as --data.val_rows in training")
    p.add_argument("--block-size", type=_positive, default=512, help="as --data.block_size in training")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not Path(args.data).is_file():
        raise DataError(f"--data {args.data}: no such file; pass an HDF5 activation file")
    cache: dict = {}  # language models and token windows shared by the exports of this run
    records = [evaluate_entry(read_entry(path), args, cache) for path in args.exports]
    text = "".join(json.dumps(record, default=str) + "\n" for record in records)
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
        print(f"dictlearn: {len(records)} result line(s) written to {args.out}")
    return 0
