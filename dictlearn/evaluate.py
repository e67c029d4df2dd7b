"""Evaluate dictionaries: exports + an HDF5 activation file (+ a language model) -> one record each.

    dictlearn evaluate runs/topk/export runs/relu/export --data acts.h5 --out results.jsonl  (dictlearn/cli/evaluate.py)

    from dictlearn.evaluate import EvaluateOptions, evaluate      # the same records, from Python
    records = evaluate(["runs/topk/export"], "acts.h5", options=EvaluateOptions(contexts=16))

For each export (or dictlearn checkpoint, or an `Entry`: a loaded dictionary and its cfg):
- reconstruction and sparsity metrics (`ReconstructionMetrics`, `SparsityMetrics`) on the file's
  held-out rows — the tail training validates on (`HeldOutSplit`), so they match the `val/`
  metrics of training;
- `mmcs` when the file holds the true features (`dictlearn synth`);
- the L0 diagnostic of Chanin & Garriga-Alonso 2025 on the same held-out rows
  (`nth_decoder_projection`, its `nth_decoder_projection_n`, the same score at d_sae/8 and d_sae/2,
  `decoder_pairwise_cosine`; dictlearn/metrics/decoder_projection.py);
- downstream metrics (`dictlearn.downstream`) when a model is known (`model`, else the export's
  `metadata.model_name`, else the file's `model_name`): the dictionary spliced into the model on
  held-out corpus windows. Without a model they are null, with a note on stderr;
- probe and concept-coverage keys (`dictlearn.metrics.concepts`) when the file carries concept
  labels (`dictlearn harvest` on a Python corpus): sparse probes on the dictionary's top latents
  against a linear probe on the activation (computed once per file and input, `ProbeCache`),
  and each concept's best latent by F1. Without labels they are null, with a note on stderr.
Every key of a record, with its formula, is in docs/evaluate.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch

from dictlearn.data.h5 import H5Array, check_activation_file
from dictlearn.data.split import HeldOutSplit
from dictlearn.dictionaries.model import Dictionary
from dictlearn.downstream import MEAN_SAMPLE_ROWS, DownstreamCache, SpliceSite, ablation_mean, prepare
from dictlearn.errors import ConfigError, DataError, note
from dictlearn.export import export_config, load_with_config
from dictlearn.metrics import (
    INTERPRETATION_NAMES, RECONSTRUCTION_NAMES, SPARSITY_NAMES, ReconstructionMetrics, SparsityMetrics, mmcs,
)  # fmt: skip
from dictlearn.metrics.bootstrap import ratio_se
from dictlearn.metrics.concepts import ProbeCache, interpretation
from dictlearn.metrics.decoder_projection import L0_PROXY_KEYS, NthDecoderProjection, decoder_pairwise_cosine
from dictlearn.metrics.downstream import DOWNSTREAM_KEYS
from dictlearn.metrics.jacobian import FAITHFULNESS_KEYS, jacobian_cosines, sample_rows
from dictlearn.models.corpus import corpus_name
from dictlearn.models.hooks import HookPoint, resolve_module

METRIC_KEYS = (RECONSTRUCTION_NAMES + SPARSITY_NAMES + ("mmcs",) + L0_PROXY_KEYS + DOWNSTREAM_KEYS
               + FAITHFULNESS_KEYS + INTERPRETATION_NAMES)
INTERPRETATION_DETAIL_KEYS = ("probes", "concepts", "interpret")  # per concept and k; rows used
CONFIG_KEYS = (
    "export", "source", "format", "architecture", "class_path", "d_in", "d_sae", "d_out", "k", "hook_name", "hook_name_out",
    "model_name", "hyper_parameters", "data", "input_key", "target_key", "n_rows", "density_rows",
    "model", "corpus", "context_size", "n_contexts", "n_tokens",
)  # fmt: skip
# Bootstrap standard errors over held-out documents (`DocumentErrors`, `CleanRuns.standard_errors`);
# null where the file records no document per row (the verdicts then use the seed spread alone).
STANDARD_ERROR_KEYS = ("fvu_se", "l0_se", "ce_loss_recovered_se", "kl_div_se")
SPLIT_KEYS = ("heldout", "heldout_rows", "heldout_documents")  # which rows measured (`HeldOutSplit.summary`)
RECORD_KEYS = CONFIG_KEYS + SPLIT_KEYS + METRIC_KEYS + STANDARD_ERROR_KEYS + INTERPRETATION_DETAIL_KEYS
ROWS_PER_READ = 8192
# Rows read once and shared by every dictionary of an evaluation up to this size (`HeldOutData.memo`):
# the default comparison file's are ~60 MB.
SHARED_BYTES = 1 << 30
DENSITY_ROWS = 65_536  # rows the dead/dense fractions and feature densities count over (`reconstruction_metrics`)
DEFAULT_CONTEXTS, DEFAULT_BATCH_SIZE = 64, 8
MIN_HELDOUT_ROWS = 2  # fvu and explained_variance divide by a variance about the mean


@dataclass(frozen=True)
class EvaluateOptions:
    """How to evaluate; each field is the `dictlearn evaluate` flag of the same name.

    model/corpus/context: the downstream model, corpus and window length (None: the export's,
    else the file's). hook: the site the dictionary reads (None: the export's `metadata.hook_name`,
    else the file's); the default input dataset too. hookpoint: which coder of a sparsify run folder. input_key/target_key: the datasets (None: the export's). contexts: held-out
    corpus windows to splice, batch_size of them per forward pass. val_rows/block_size: the
    held-out split, as `--data.val_rows`/`--data.block_size` in training. device "auto": cuda if
    available. downstream=False skips the spliced runs (their keys are null); interpret=False
    skips the probes and concept coverage (theirs are null). density_rows: rows `dead_fraction`,
    `dense_fraction` and `feature_density` count over (the held-out tail, then seeded training
    rows, at most the file; 0: the tail only). feature_density=True adds each latent's firing
    frequency over those rows (a list of d_sae numbers) as `feature_density`.
    """

    model: str | None = None
    hook: str | None = None
    hookpoint: str | None = None
    corpus: str | None = None
    input_key: str | None = None
    target_key: str | None = None
    contexts: int = DEFAULT_CONTEXTS
    batch_size: int = DEFAULT_BATCH_SIZE
    context: int | None = None
    val_rows: int | None = None
    block_size: int = 512
    device: str = "auto"
    downstream: bool = True
    interpret: bool = True
    density_rows: int = DENSITY_ROWS
    feature_density: bool = False

    def __post_init__(self) -> None:
        for name in ("contexts", "batch_size", "context", "block_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {value})")
        for name in ("val_rows", "density_rows"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {value})")

    def resolved(self) -> EvaluateOptions:
        """These options with device "auto" made concrete."""
        if self.device != "auto":
            return self
        return dataclasses.replace(self, device="cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Entry:
    """One dictionary to evaluate and its cfg.json (`export_config(dictionary, data_attrs)` for
    one in memory); `path` is the export or checkpoint it came from (None: in memory)."""

    dictionary: Dictionary
    cfg: dict
    path: Path | None = None

    @classmethod
    def from_path(cls, path: str | Path, hookpoint: str | None = None) -> Entry:
        """An export folder (its cfg.json), a checkpoint (the cfg its export would have) or another
        library's folder (the cfg its export would have, with `format` and `source`; `hookpoint`
        picks a sparsify run's coder)."""
        path = Path(path)
        # a one-line DataError for a missing, unknown or damaged path
        dictionary, cfg = load_with_config(path, hookpoint=hookpoint)
        if cfg is not None:
            return cls(dictionary, cfg, path)
        attrs = torch.load(path, map_location="cpu", weights_only=False).get("dictlearn_data", {})
        return cls(dictionary, export_config(dictionary, attrs), path)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else f"the {type(self.dictionary).__name__} given"

    @property
    def meta(self) -> dict:
        return self.cfg.get("metadata", {})

    @property
    def data(self) -> dict:
        return self.meta.get("dictlearn", {}).get("data", {})


# ----------------------------------------------------------------------------- the file
@dataclass
class HeldOutData:
    """The datasets one dictionary is measured on, and the file's held-out split."""

    path: str
    input_key: str
    target_key: str | None
    inputs: H5Array
    targets: H5Array | None
    split: HeldOutSplit
    shared: dict = dataclasses.field(default_factory=dict)  # `memo`'s values; a DownstreamCache's `shared`

    def memo(self, what: tuple, compute):
        """`compute()` once per file, datasets and split for every dictionary evaluated with the same
        `shared` dict (the rows every dictionary reads, the mean-ablation vector); kept while the
        tensors kept stay under SHARED_BYTES, else computed again for each dictionary."""
        key = (str(Path(self.path).resolve()), self.input_key, self.target_key, self.split, *what)
        if key in self.shared:
            return self.shared[key]
        value = compute()
        held = sum(_nbytes(v) for v in self.shared.values())
        if held + _nbytes(value) <= SHARED_BYTES:
            self.shared[key] = value
        return value

    @property
    def attrs(self) -> dict:
        """The input dataset's provenance (model, hook, corpus, context_size, ...)."""
        return self.inputs.attrs()

    def ablation_rows(self, n_rows: int) -> torch.Tensor:
        """Up to `n_rows` training rows of the target (the input, for an SAE) from seeded whole
        blocks — the rows the training datamodule samples with seed 0: [n, d_out]."""
        array = self.inputs if self.targets is None else self.targets
        if self.split.n_train == 0:
            raise DataError(f"{self.path}: all {self.split.n_rows} rows are held out, none left for the mean "
                            "ablation; lower --val-rows")
        rows = array.read_slices(self.split.sample_slices(n_rows, seed=0))
        if not torch.isfinite(rows).all():
            raise DataError(f"{self.path}: dataset '{array.key}' has NaN/Inf values in the sampled training rows;"
                            " clean or re-harvest the file")
        return rows

    def heldout_documents(self) -> torch.Tensor | None:
        """int64 [held-out rows]: each held-out row's document (`doc_index`); None when the file
        records none (a plain h5py file: its metrics get no `_se`)."""
        first, last = self.split.heldout
        with h5py.File(self.path, "r") as f:
            documents = f.get("doc_index")
            if not isinstance(documents, h5py.Dataset) or documents.shape != (self.split.n_rows,):
                return None
            return torch.from_numpy(documents[first:last].astype("int64"))

    def close(self) -> None:
        for array in (self.inputs, self.targets):
            if array is not None:
                array.close()


def data_keys(entry: Entry, input_key: str | None, target_key: str | None,
              hook: str | None = None) -> tuple[str, str | None]:
    """(input key, target key or None): the options, else the keys the export was trained on
    (harvest names a dataset after its hook: `--hook` or the recorded hook, else `acts`)."""
    input_key = input_key or entry.data.get("input_key") or hook or entry.meta.get("hook_name") or "acts"
    if not entry.dictionary.transcoder:
        if target_key:
            raise ConfigError(f"--target-key {target_key}: {entry.name} is an SAE (its target is its input); drop it")
        return input_key, None
    target_key = target_key or entry.data.get("target_key") or entry.meta.get("hook_name_out")
    if not target_key:
        raise ConfigError(f"{entry.name} is a transcoder and records no target key; pass --target-key KEY")
    return input_key, target_key


def _array(path: str, key: str) -> H5Array:
    try:
        return H5Array(path, key)
    except DataError as error:
        hint = "; choose the datasets with --input-key/--target-key" if "not found" in str(error) else ""
        raise DataError(f"{error}{hint}") from None


def open_data(entry: Entry, path: str, keys: tuple[str, str | None], options: EvaluateOptions) -> HeldOutData:
    """The file's datasets and held-out split, after checking they fit the export."""
    inputs = _array(path, keys[0])
    targets = None if keys[1] is None else _array(path, keys[1])
    if targets is not None and targets.n_rows != inputs.n_rows:
        raise DataError(f"{path}: input '{keys[0]}' has {inputs.n_rows} rows but target '{keys[1]}' has "
                        f"{targets.n_rows}; they must be row-aligned — re-harvest")
    dictionary = entry.dictionary
    for role, array, expected in (("d_in", inputs, dictionary.d_in), ("d_out", targets, dictionary.d_out)):
        if array is not None and array.d != expected:
            raise DataError(
                f"{path}: dataset '{array.key}' has width {array.d} but {entry.name} has {role}={expected}; "
                "pass the file or --input-key/--target-key it was trained on"
            )
    split = HeldOutSplit.from_file(path, inputs.n_rows, options.block_size, options.val_rows)
    check_split(path, split)
    data = HeldOutData(path, keys[0], keys[1], inputs, targets, split)
    _check_provenance(entry, data)
    return data


def check_split(path: str, split: HeldOutSplit) -> None:
    """The held-out rows can give a meaningful answer: enough of them for a variance, and none
    of the rows the dictionary may have trained on. A one-line DataError naming the flag, the
    held-out row count and what fits, otherwise."""
    default = dataclasses.replace(split, val_rows=None, block_size=HeldOutSplit.block_size)
    if split.val_rows is not None and split.heldout_start is not None:  # held-out documents
        available = split.n_rows - split.heldout_start
        if split.val_rows > available:
            raise DataError(f"--val-rows {split.val_rows}: {path} holds out {available:,} rows (its held-out "
                            f"documents); pass at most {available} or drop --val-rows to use them all")
    elif split.n_train == 0 and default.n_train > 0:  # the flags, not the file, leave no training rows
        flags = [f"--val-rows {split.val_rows}"] if split.val_rows is not None else []
        flags += [f"--block-size {split.block_size}"] if split.block_size != default.block_size else []
        blocks = -(-split.n_rows // split.block_size)
        fits = f"at most {(blocks - 1) * split.block_size:,} rows fit" if blocks > 1 else "no --val-rows fits"
        raise DataError(f"{' '.join(flags)}: would hold out all {split.n_rows:,} rows of {path}, the rows the "
                        f"dictionary trained on included ({fits} with blocks of {split.block_size}); drop "
                        f"{'them' if len(flags) > 1 else 'it'} for the default {default.n_val:,} held-out rows")
    if split.n_val == 0:
        raise DataError(f"{path}: --val-rows 0 holds out no rows to measure; drop it or pass a positive count")
    if split.n_val < MIN_HELDOUT_ROWS:
        raise DataError(f"{path}: {split.n_val} held-out row; fvu and explained_variance need at least "
                        f"{MIN_HELDOUT_ROWS} (a variance about their mean): pass a file with more rows"
                        + (" or a larger --val-rows" if split.val_rows is not None else ""))


def _check_provenance(entry: Entry, data: HeldOutData) -> None:
    """The file's model and hooks are the export's, where both record them."""
    attrs, meta = data.attrs, entry.meta
    if meta.get("model_name") and attrs.get("model_name") and meta["model_name"] != attrs["model_name"]:
        raise ConfigError(f"{entry.name} was trained on activations of model {meta['model_name']!r} but {data.path} "
                          f"was harvested from {attrs['model_name']!r}; pass a file harvested from that model")
    pairs = [("hook_name", data.input_key, attrs.get("hook_name"))]
    if data.targets is not None:
        pairs.append(("hook_name_out", data.target_key, data.targets.attrs().get("hook_name")))
    for field, key, hook in pairs:
        if meta.get(field) and hook and meta[field] != hook:
            raise ConfigError(f"{entry.name} was trained on hook_name {meta[field]!r} but {data.path}['{key}'] "
                              f"holds {hook!r}; pass the matching file or --input-key/--target-key")


def reconstruction_metrics(dictionary: Dictionary, data: HeldOutData, device: str,
                           density_rows: int = DENSITY_ROWS) -> tuple[dict, int, int]:
    """Reconstruction metrics, `l0` and `l1` on the held-out tail rows; `dead_fraction`,
    `dense_fraction` and `feature_density` (each latent's firing frequency, a list) over
    `density_rows` rows where the file has them: the held-out tail, then seeded whole blocks of
    training rows. -> (metrics, held-out rows, density rows).

    Why more rows for the density keys: the tail is ~1 % of the file (2,560 rows of the default
    compare file), and a latent firing on 1 token in 10,000 is absent from 2,560 rows 77 % of the
    time, so a dead fraction over the tail counts rare latents as dead. A latent that fires on
    none of 65,536 rows fires at a rate below ~5e-5 (95 % bound). The training rows are fine for
    this count: a latent is dead or alive on the data distribution, seen in training or not."""
    recon, sparsity = ReconstructionMetrics(dictionary.d_out).to(device), SparsityMetrics(dictionary.d_sae).to(device)
    census = SparsityMetrics(dictionary.d_sae).to(device)
    first, n_rows = data.split.heldout
    documents = data.heldout_documents()
    errors = None if documents is None else DocumentErrors(documents, dictionary.d_out)
    proxy = NthDecoderProjection(dictionary.W_dec)
    for start, stop, x, y in heldout_rows(data):
        x, y = x.to(device), y.to(device)
        z = dictionary.encode(x)  # as in validation
        y_hat = dictionary.decode(z, x)
        recon.update(y, y_hat)
        counts = SparsityMetrics.statistics(z)  # one counting pass for both counters
        sparsity.update(**counts)
        census.update(**counts)
        proxy.update(y - _zero_latent_output(dictionary, z, x))  # what the latents write: y − b_dec (− skip)
        if errors is not None:
            errors.update(slice(start - first, stop - first), y, y_hat, z)
    for x in density_rows_of(data, max(0, density_rows - (n_rows - first))):
        census.update(dictionary.encode(x.to(device)))
    values = {**recon.compute(), **sparsity.compute(), **proxy.compute(),
              "decoder_pairwise_cosine": decoder_pairwise_cosine(dictionary.W_dec)}
    density = census.compute()
    values |= {"dead_fraction": density["dead_fraction"], "dense_fraction": density["dense_fraction"]}
    metrics = {k: v if v is None or isinstance(v, int) else float(v) for k, v in values.items()}
    metrics |= {"feature_density": census.feature_density().tolist()}
    metrics |= {} if errors is None else errors.compute()
    return metrics, n_rows - first, int(census.n_tokens)


def heldout_rows(data: HeldOutData) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The held-out rows in reads of ROWS_PER_READ: (start, stop, x [n, d_in], y [n, d_out]) (y is
    x for an SAE), read once per file for every dictionary (`HeldOutData.memo`)."""
    def read() -> list:
        first, n_rows = data.split.heldout
        reads = []
        for start in range(first, n_rows, ROWS_PER_READ):
            stop = min(start + ROWS_PER_READ, n_rows)
            x = data.inputs.read(start, stop)
            reads.append((start, stop, x, x if data.targets is None else data.targets.read(start, stop)))
        return reads

    return data.memo(("heldout",), read)


def density_rows_of(data: HeldOutData, n_rows: int) -> list[torch.Tensor]:
    """Up to `n_rows` training rows of the input from seeded whole blocks (`sample_slices`, seed 0)
    in reads of about ROWS_PER_READ rows [n, d_in], checked finite; read once per file."""
    def read() -> list:
        slices = data.split.sample_slices(n_rows, seed=0)
        per_read = max(1, ROWS_PER_READ // data.split.block_size)
        reads = []
        for group in (slices[i:i + per_read] for i in range(0, len(slices), per_read)):
            x = data.inputs.read_slices(group)
            if not torch.isfinite(x).all():
                raise DataError(f"{data.path}: dataset '{data.input_key}' has NaN/Inf values in rows "
                                f"{group[0][0]}-{group[-1][1] - 1}; fix the file or pass --density-rows 0")
            reads.append(x)
        return reads

    return data.memo(("density", n_rows), read)


def _zero_latent_output(dictionary: Dictionary, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """decode(0, x): [n, d_out], or [1, d_out] where it does not depend on x (no skip), the same row:
    a zero row times W_dec is exactly zero whatever the GEMM's blocking, so one row is every row."""
    if dictionary.W_skip is None:
        return dictionary.decode(torch.zeros_like(z[:1]), x[:1])
    return dictionary.decode(torch.zeros_like(z), x)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class DocumentErrors:
    """Per held-out document, the sums `fvu` and `l0` are ratios of, for their bootstrap standard
    errors (dictlearn.metrics.bootstrap): Σ‖y − ŷ‖², Σ‖y‖², Σy [d], active latents and rows.

    documents: int64 [held-out rows], each row's document. FVU's denominator is the variance
    about the mean of *all* held-out rows, so a document's share is Σ_t ‖y_t − μ‖² with the
    global μ, formed in `compute` from Σ‖y‖² − 2μ·Σy + n‖μ‖² once μ is known."""

    def __init__(self, documents: torch.Tensor, d_out: int) -> None:
        self.ids, self.index = torch.unique(documents, return_inverse=True)
        f64, n = torch.float64, len(self.ids)
        self.scalars = torch.zeros(n, 4, dtype=f64)  # sq_error, sq_target, active, rows
        self.target = torch.zeros(n, d_out, dtype=f64)

    def update(self, rows: slice, y: torch.Tensor, y_hat: torch.Tensor, z: torch.Tensor) -> None:
        """rows: the held-out rows (from the first) of y, y_hat [n, d_out] and z [n, d_sae]."""
        index = self.index[rows]
        y = y.detach().cpu().to(torch.float64)
        values = torch.stack([(y - y_hat.detach().cpu().to(torch.float64)).square().sum(-1), y.square().sum(-1),
                              (z != 0).sum(-1).cpu().to(torch.float64), torch.ones(len(y), dtype=torch.float64)], 1)
        self.scalars.index_add_(0, index, values)
        self.target.index_add_(0, index, y)

    def compute(self) -> dict[str, float]:
        """`fvu_se`, `l0_se` (null with fewer than 2 documents)."""
        sq_error, sq_target, active, rows = self.scalars.T
        mean = self.target.sum(0) / rows.sum()
        total = sq_target - 2 * self.target @ mean + rows * mean.square().sum()
        se = ratio_se(torch.stack([sq_error, active], 1).numpy(), torch.stack([total, rows], 1).numpy())
        return {"fvu_se": float(se[0]), "l0_se": float(se[1])}


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
    """What the spliced runs gave and used, for the record."""

    metrics: dict
    model: str
    corpus: str
    context_size: int
    n_contexts: int
    n_tokens: int


def _model_name(entry: Entry, data: HeldOutData, options: EvaluateOptions) -> str | None:
    """The option, else the export's model, else the file's; None (with a note) when none is known."""
    name = options.model or entry.meta.get("model_name") or data.attrs.get("model_name")
    if not name:
        note(f"{entry.name}: no model recorded in the export or {data.path} and no --model; "
              "downstream metrics skipped")
    elif options.model and entry.meta.get("model_name") not in (None, options.model):
        note(f"{entry.name} was trained on {entry.meta['model_name']}; splicing into "
              f"{options.model}")
    return name


def _site(entry: Entry, data: HeldOutData, hook: str | None = None) -> SpliceSite:
    """Where the dictionary reads: `--hook`, else its metadata, else the file's datasets' hook names;
    a one-line ConfigError when none records one."""
    hook_in = hook or entry.meta.get("hook_name") or data.attrs.get("hook_name")
    if not hook_in:
        raise ConfigError(f"{entry.name}: no hook is recorded in it or in {data.path}['{data.input_key}'] for "
                          "the downstream metrics; pass --hook MODULE.PATH (the site it reads, e.g. transformer.h.1)")
    hook_out = entry.meta.get("hook_name_out") or (data.targets.attrs().get("hook_name") if data.targets else None)
    return SpliceSite.from_metadata(hook_in, hook_out, entry.dictionary.transcoder)


def run_downstream(
    entry: Entry, data: HeldOutData, options: EvaluateOptions, cache: DownstreamCache
) -> Downstream | None:
    """Downstream metrics of one dictionary, or None when no model is known."""
    name = _model_name(entry, data, options)
    if not name:
        return None
    site = _site(entry, data, options.hook)
    lm = cache.model(name)
    # the mean-ablation vector once per file, passed as its own one-row sample (whose mean it is, exactly)
    mean = data.memo(("ablation_mean",), lambda: ablation_mean(data.ablation_rows(MEAN_SAMPLE_ROWS)))
    inputs = prepare(lm, site, data.attrs, mean.unsqueeze(0), contexts=options.contexts,
                     batch_size=options.batch_size, corpus=options.corpus,
                     context=options.context or entry.meta.get("context_size"), cache=cache, data=data.path)
    inputs.check_widths(entry.dictionary.d_in, entry.dictionary.d_out, entry.name)
    metrics, n_tokens = inputs.run(entry.dictionary, standard_errors=True)
    if entry.dictionary.transcoder:
        metrics["jacobian_cos"] = transcoder_jacobian_cos(lm.model, site, entry.dictionary, data)
    return Downstream(metrics, lm.name, corpus_name(inputs.corpus), inputs.context, inputs.n_contexts, n_tokens)


def transcoder_jacobian_cos(model: torch.nn.Module, site: SpliceSite, dictionary: Dictionary,
                            data: HeldOutData) -> float | None:
    """jacobian_cos (dictlearn/metrics/jacobian.py) against the module the transcoder replaces, on
    evenly spaced held-out input rows; None (with a note) when the transcoder does not read that
    module's own input (e.g. the residual stream before the LayerNorm), so no module is its map."""
    write = HookPoint.parse(site.write)
    if site.read is None or HookPoint.parse(site.read) != HookPoint(write.module, "input"):
        note(f"transcoder reads {site.read!r}, not {write.module}:input; jacobian_cos skipped")
        return None
    first, n_rows = data.split.heldout
    rows = (first + sample_rows(n_rows - first)).tolist()
    device = next(model.parameters()).device
    x = data.inputs.read_slices([(r, r + 1) for r in rows]).to(device)
    return float(jacobian_cosines(dictionary, resolve_module(model, write.module), x).mean())


# ----------------------------------------------------------------------------- records
def evaluate(
    exports: Sequence[str | Path | Entry],
    data: str | Path,
    *,
    options: EvaluateOptions | None = None,
    cache: DownstreamCache | None = None,
    probes=None,
) -> list[dict]:
    """One record (keys `RECORD_KEYS`, JSON-able) per export folder, checkpoint or `Entry`.

    Language models and token windows are loaded once per call (pass a `DownstreamCache` to share
    them across calls); so are the probe rows and linear baselines (pass a
    `dictlearn.metrics.concepts.ProbeCache` as `probes` to share them). Dictionaries are moved to
    the options' device and run in eval mode without gradients; an `Entry`'s dictionary gets its
    train/eval mode back afterwards.
    """
    options = (options or EvaluateOptions()).resolved()
    data = check_activation_file(data)
    cache = cache or DownstreamCache(options.device)
    if options.interpret and probes is None:
        probes = ProbeCache()
    with torch.no_grad():
        return [_evaluate_one(e if isinstance(e, Entry) else Entry.from_path(e, options.hookpoint), data, options,
                              cache, probes) for e in exports]


def _evaluate_one(entry: Entry, data_path: str, options: EvaluateOptions, cache: DownstreamCache, probes) -> dict:
    dictionary = entry.dictionary
    training = dictionary.training
    dictionary.to(options.device).eval()
    try:
        keys = data_keys(entry, options.input_key, options.target_key, options.hook)
        data = open_data(entry, data_path, keys, options)
        data.shared = cache.shared  # rows and the ablation mean read once for every dictionary of the cache
        try:
            if options.downstream and (options.model or entry.meta.get("model_name") or data.attrs.get("model_name")):
                _site(entry, data, options.hook)  # before any metric: a missing hook is one line, up front
            metrics, n_rows, density_rows = reconstruction_metrics(dictionary, data, options.device, options.density_rows)
            split = {k: v for k, v in data.split.summary().items() if k in SPLIT_KEYS}
            metrics["mmcs"] = feature_mmcs(data_path, dictionary)
            downstream = run_downstream(entry, data, options, cache) if options.downstream else None
            metrics.update(_interpretation(dictionary, data, options, probes))
        finally:
            data.close()
    finally:
        dictionary.train(training)
    if downstream is not None:
        metrics.update(downstream.metrics)
    density = {"feature_density": metrics["feature_density"]} if options.feature_density else {}
    return (_record(entry, data_path, keys, (n_rows, density_rows), downstream) | split
            | {k: _finite(metrics.get(k)) for k in METRIC_KEYS + STANDARD_ERROR_KEYS}
            | {k: metrics.get(k) for k in INTERPRETATION_DETAIL_KEYS} | density)


def _interpretation(dictionary: Dictionary, data: HeldOutData, options: EvaluateOptions, probes) -> dict:
    """The probe and coverage keys (dictlearn.metrics.concepts); {} (null keys) when skipped."""
    if not options.interpret:
        return {}
    return interpretation(dictionary, data.path, data.input_key, data.split, probes, options.device)


def _record(entry: Entry, data_path: str, keys, rows: tuple[int, int], downstream: Downstream | None) -> dict:
    meta, dictionary = entry.meta, entry.dictionary
    hyper_parameters = meta.get("dictlearn", {}).get("hyper_parameters", {})
    return {
        "export": None if entry.path is None else str(entry.path.resolve()),
        # where the dictionary came from: another library's folder, or dictlearn's own export or checkpoint
        "source": entry.cfg.get("source") or (None if entry.path is None else str(entry.path.resolve())),
        "format": entry.cfg.get("format", "dictlearn"),
        "architecture": entry.cfg.get("architecture"),
        "class_path": meta.get("dictlearn", {}).get("class_path"),
        "d_in": dictionary.d_in, "d_sae": dictionary.d_sae, "d_out": dictionary.d_out,
        "k": entry.cfg.get("k", hyper_parameters.get("k")),
        "hook_name": meta.get("hook_name"), "hook_name_out": meta.get("hook_name_out"),
        "model_name": meta.get("model_name"),
        "hyper_parameters": hyper_parameters,
        "data": str(Path(data_path).resolve()), "input_key": keys[0], "target_key": keys[1],
        "n_rows": rows[0], "density_rows": rows[1],
        **_downstream_info(downstream),
    }  # fmt: skip


def _downstream_info(downstream: Downstream | None) -> dict:
    """model, corpus, context_size, n_contexts, n_tokens of the spliced runs; null when skipped."""
    fields = ("model", "corpus", "context_size", "n_contexts", "n_tokens")
    return {name: None if downstream is None else getattr(downstream, name) for name in fields}


def _finite(value):
    """JSON has no NaN/Inf: an undefined metric (e.g. a 0/0 recovered fraction) is null."""
    return None if value is None or not math.isfinite(value) else value
