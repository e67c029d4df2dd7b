"""`compare(config)` for `--replace mlp`: harvest every layer -> train -> splice -> results -> report.

The run folder keeps compare's contract (DESIGN.md): compare.yaml, activations.h5 (every layer's
MLP input and output, row-aligned; absent with --data), train/seed<S>/ (one sweep per seed
holding every replacement's members), exports/<member>/, evaluations/<replacement>.json,
results.jsonl (one line per replacement), figures/, report.md/html, timings.json. Every stage
leaves whole files or nothing, so a rerun resumes from what is there; a signal stops between
units of work (compare.run.Stopped).

Each replacement is evaluated by `dictlearn.replacement.replacement_metrics` on the run's
held-out windows (the held-out documents the harvest recorded), every MLP replaced at once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlearn.compare import run, sweeps, workers
from dictlearn.compare.plan import OPTIMIZER, CompareConfig
from dictlearn.compare.progress import Progress
from dictlearn.compare.replace import check_targets
from dictlearn.compare.replace_plan import ReplacementPlan, plan_replacements
from dictlearn.compare.results import machine, write_results, write_timings
from dictlearn.data.h5 import H5Array, check_activation_file
from dictlearn.data.split import HeldOutSplit
from dictlearn.dictionaries.registry import mechanism_class
from dictlearn.downstream import DownstreamCache, _heldout_excerpts, recorded_corpus
from dictlearn.errors import ConfigError, DataError
from dictlearn.export import load
from dictlearn.harvest.activations import n_layers
from dictlearn.io import atomic_write_text
from dictlearn.metrics.jacobian import jacobian_cosines, sample_rows
from dictlearn.models.hooks import HookPoint, resolve_module, standard_hooks
from dictlearn.models.tiny import DEFAULT_CONTEXT
from dictlearn.replacement import TranscoderSet, mlp_sites, reference, replacement_metrics
from dictlearn.runtime import check_device

DOWNSTREAM_BATCH = 8  # held-out windows per forward pass


@dataclass
class ReplaceSource(run.Source):
    """The activation file, the replaced layers and each layer's MLP input and output keys."""

    layers: tuple[int, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def keys(self, planned) -> tuple[str, str]:
        return planned.input_key, planned.target_key


def check_source(config: CompareConfig, out: Path):
    """-> (ReplaceSource, the loaded language model); every bad input one line, nothing written."""
    if config.corpus is not None and not Path(config.corpus).exists():
        raise ConfigError(f"--corpus {config.corpus}: no such file or folder; pass a text file or a folder of them")
    lm = run._load_model(config.model)
    count = n_layers(lm.model)
    if count is None:
        raise ConfigError(f"--model {config.model}: it records no config.num_hidden_layers; --replace needs to "
                          "know every layer")
    hooks = [standard_hooks(lm.model, layer) for layer in range(count)]
    if config.data is None:
        layers = list(range(count))
        inputs, outputs = [h["mlp_in"] for h in hooks], [h["mlp_out"] for h in hooks]
        path = out / "activations.h5"
    else:
        path = Path(check_activation_file(config.data))
        inputs, outputs = _split(config.input_key, hooks, "mlp_in"), _split(config.target_key, hooks, "mlp_out")
        layers = _layers_of(inputs, hooks, "mlp_in", "--input-key")
        if _layers_of(outputs, hooks, "mlp_out", "--target-key") != layers:
            raise ConfigError(f"--target-key {','.join(outputs)}: names other layers than --input-key "
                              f"({','.join(inputs)}); give each layer's MLP output in the same order")
        if len(layers) < 2:
            raise ConfigError(f"--input-key {','.join(inputs)}: --replace compares cross-layer transcoders, which "
                              "need at least 2 layers; list 2 or more")
        for flag, keys in (("--input-key", inputs), ("--target-key", outputs)):
            try:
                H5Array(path, ",".join(keys))
            except DataError as error:
                raise DataError(f"{flag}: {error}" + (
                    " (harvest every layer with dictlearn harvest --layers all)" if "not found" in str(error) else ""
                )) from None
    check_targets(config, len(layers))
    source = ReplaceSource(path, (inputs[0], None), None, None if config.data else inputs + outputs,
                           tuple(layers), tuple(inputs), tuple(outputs))
    return source, lm


def _split(keys: str | None, hooks: list[dict], which: str) -> list[str]:
    """A comma-separated key list, or every layer's standard hook when none is given."""
    if not keys:
        return [h[which] for h in hooks]
    return [k.strip() for k in keys.split(",") if k.strip()]


def _layers_of(keys: list[str], hooks: list[dict], which: str, flag: str) -> list[int]:
    """The model layer of each key (its standard `which` hook), checked to increase."""
    where = {h[which]: layer for layer, h in enumerate(hooks)}
    layers = []
    for key in keys:
        if key not in where:
            raise ConfigError(f"{flag} {key}: not a layer's {which} hook of the model (they are "
                              f"{', '.join(list(where)[:2])}, …); pass the model the file was harvested from")
        layers.append(where[key])
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"{flag} {','.join(keys)}: not in layer order (layers {layers}); list each layer once, "
                          "first to last")
    return layers


# ----------------------------------------------------------------------------- the run
def compare_replacements(config: CompareConfig) -> Path:
    """Run (or resume) a `--replace mlp` comparison; -> the run folder."""
    check_device(config.device, allow_auto=True)  # before anything is written
    config = config.resolved()
    out = run.check_out(config)
    source, lm = check_source(config, out)
    planned = plan_replacements(config, list(source.layers), list(source.inputs), list(source.outputs))
    # progress counts trained dictionaries (a set's per-layer transcoders, or a CLT), as the workers report them
    progress = Progress(sum(len(p.members) for p in planned), enabled=not config.quiet)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.yaml", config.to_yaml())
    started = time.perf_counter()
    with run._signals_to_flag() as stop:
        if source.hooks is not None and not source.path.is_file():
            run._harvest(config, lm, source, progress, stop)
        workers, threads = _train_all(config, source, planned, progress, stop)
        records = _evaluate_all(config, source, planned, lm, progress, stop)
    write_results(out, records)
    progress.stage("report", 1, unit="file")
    host = machine(config.device)
    host |= {"workers": workers, "threads_per_worker": threads or host["torch_threads"]}
    write_timings(out, progress, time.perf_counter() - started, host, complete=False)
    run._import_analysis().write_report(out, records, echo=not config.quiet)
    progress.finish()
    write_timings(out, progress, time.perf_counter() - started, host)
    return out


def _train_all(config: CompareConfig, source: ReplaceSource, planned: list[ReplacementPlan], progress: Progress,
               stop: threading.Event) -> tuple[int, int | None]:
    """Every seed's sweep: side by side in `--workers` processes (compare/workers.py: as many as
    seeds are left, the torch threads shared out), else one after the other in this process.
    -> (worker processes, torch threads each; None: this process's)."""
    groups = sweeps.pending_sweeps(Path(config.out), {
        f"seed{seed}": [m for p in planned if p.seed == seed for m in p.members] for seed in config.seeds}, progress)
    n = min(config.workers, len(groups))
    if n <= 1:
        for label, members in groups.items():
            sweeps._train_group(config, source, members, label, progress, stop)
        return 1, None
    threads = workers.threads_each(n)
    with workers.Pool(config, source, n, threads) as pool:  # each worker runs sweeps._train_group
        pool.train(groups, progress, stop)
    return n, threads


def load_replacement(out: Path, p: ReplacementPlan):
    """The replacement `p` from its exports: a TranscoderSet, or the CLT itself."""
    loaded = [load(out / "exports" / m.name).eval() for m in p.members]
    return loaded[0] if p.mapping == "clt" else TranscoderSet(loaded)


def _evaluate_all(config: CompareConfig, source: ReplaceSource, planned: list[ReplacementPlan], lm, progress: Progress,
                  stop: threading.Event) -> list[dict]:

    out = Path(config.out)
    todo = sweeps.not_evaluated(out, planned)
    progress.stage("evaluate", max(1, len(todo)), unit="replacement")
    if todo:
        attrs = H5Array(source.path, source.inputs[0]).attrs()
        lm = lm or run._load_model(config.model)
        lm.model.to(config.device)
        cache = DownstreamCache(config.device)
        batches = cache.batches(lm, recorded_corpus(attrs.get("corpus")) or config.corpus,
                                int(attrs.get("context_size") or DEFAULT_CONTEXT), config.contexts,
                                bool(attrs.get("exclude_special", True)), DOWNSTREAM_BATCH, data=str(source.path))
        sites = mlp_sites(lm.model, list(source.layers))
        held_out = _held_out(cache, batches, source.path)
        ref = reference(lm.model, sites, batches)  # the clean and ablated runs, shared by every replacement
        jacobian_rows = _jacobian_rows(source, config.device)
    for i, p in enumerate(todo):
        run._check_stop(stop)
        replacement = load_replacement(out, p).to(config.device)
        # per_layer=False: the one-layer-replaced runs would triple the cost (docs/compare.md); the
        # per-layer FVU and L0 come from the clean run either way
        record = replacement_metrics(lm.model, sites, replacement, batches, per_layer=False, ref=ref)
        if p.mapping != "clt":
            _add_jacobian_cos(record, lm.model, sites, replacement, jacobian_rows)
        record |= {"model_name": lm.name, "data": str(source.path), "context_size": int(batches[0][0].shape[1]),
                   "n_contexts": sum(int(t.shape[0]) for t, _ in batches), **held_out}
        atomic_write_text(out / "evaluations" / f"{p.name}.json", json.dumps(record))
        progress.update(i + 1)
    return [results_line(config, p, source, out, sum(len(q.members) for q in planned if q.seed == p.seed))
            for p in planned]


def _jacobian_rows(source: ReplaceSource, device: str) -> list[torch.Tensor]:
    """Each layer's MLP input on the held-out rows jacobian_cos reads ([n, d_in] each): evenly
    spaced, as `dictlearn evaluate` samples them for a single transcoder."""
    first, stop = HeldOutSplit.from_file(str(source.path), H5Array(source.path, source.inputs[0]).n_rows).heldout
    rows = [(r, r + 1) for r in (first + sample_rows(stop - first)).tolist()]
    return [H5Array(source.path, key).read_slices(rows).to(device) for key in source.inputs]


def _add_jacobian_cos(record: dict, model, sites, replacement: TranscoderSet, rows: list[torch.Tensor]) -> None:
    """`layers.<layer>.jacobian_cos` of a set of per-layer transcoders: each against the MLP it
    replaces (dictlearn/metrics/jacobian.py). Not for a CLT, whose layer output also moves with
    every earlier layer's input, so no one MLP's Jacobian is its counterpart."""
    for i, site in enumerate(sites):
        module = resolve_module(model, HookPoint.parse(site.write).module)
        cosines = jacobian_cosines(replacement.dictionaries[i], module, rows[i])
        record["layers"][str(site.layer)]["jacobian_cos"] = float(cosines.mean())


def _held_out(cache, batches, path: Path) -> dict:
    """`heldout: "documents"` and `heldout_documents` (distinct documents of the windows) when the
    file records held-out documents, as a single-site results line records its split (the rows:
    `heldout_rows`, each record's n_rows); {} when the windows come from the corpus's held-out
    split instead (heldout_windows), which the report then says is not recorded."""
    if _heldout_excerpts(str(path)) is None:
        return {}
    key = next(k for k, v in cache.windows.items() if v is batches)
    return {"heldout": "documents", "heldout_documents": _unique_documents(cache.documents.get(key) or [])}


def _unique_documents(per_batch) -> int | None:
    """Distinct corpus documents (>= 0; -1 marks BOS) over the batches' [B, context] tensors."""
    if not per_batch:
        return None
    flat = torch.cat([d.reshape(-1) for d in per_batch])
    return int(torch.unique(flat[flat >= 0]).numel())


def results_line(config: CompareConfig, p: ReplacementPlan, source: ReplaceSource, out: Path, in_sweep: int) -> dict:
    """The evaluation record + what the comparison knows of the replacement (docs/metrics.md)."""
    record = json.loads((out / "evaluations" / f"{p.name}.json").read_text())
    seconds_file = out / "train" / f"seed{p.seed}" / "train_seconds.json"
    # the sweep's wall time shared out by members (a CLT costs more than one layer's transcoder)
    seconds = (json.loads(seconds_file.read_text())["seconds"] * len(p.members) / in_sweep
               if seconds_file.is_file() else None)
    line = {
        **record, "heldout_rows": record.get("n_rows"), "name": p.name, "architecture": p.architecture, "mechanism": p.mechanism, "mapping": p.mapping,
        "replace": "mlp", "layers_replaced": list(p.layers), "hook_name": ",".join(source.inputs),
        "hook_name_out": ",".join(source.outputs), "l0_target": p.l0_target, "d_sae": p.d_sae, "seed": p.seed,
        "k": p.k, "train_tokens": config.steps * config.batch_size, "train_seconds": seconds,
        "export": [str((out / "exports" / m.name).resolve()) for m in p.members],
        "members": [m.name for m in p.members], "log_dir": str(Path("train") / f"seed{p.seed}" / "version_0"),
        "batch_size": config.batch_size, "trained": True, "lr_tuned": False,
        "optimizer": {key: p.members[0].training[key] for key in OPTIMIZER if key in p.members[0].training},
    }  # fmt: skip
    coefficient = mechanism_class(p.mechanism).mechanism.coefficient
    if coefficient is not None:  # the calibrated λ of the CLT
        cfg = json.loads((out / "exports" / p.members[0].name / "cfg.json").read_text())
        line[coefficient] = ((cfg.get("metadata") or {}).get("dictlearn") or {}).get("hyper_parameters", {}).get(
            coefficient)
    return line
