"""Dictionaries trained elsewhere in a comparison: `dictlearn compare --include PATH[,PATH...]`.

An included dictionary is anything `dictlearn.load` reads (a dictlearn export or checkpoint, and
the outside formats its readers know). It is not trained: it is checked against the run before
anything is harvested or trained (`check_included`, every refusal one line), then evaluated by
`dictlearn.evaluate.evaluate` with the run's own options on the run's own file, after the run's
members (`evaluate_included`): the same held-out rows, downstream windows and probes. Its results
line carries `trained: false`, `source` (the path) and `format`; `l0_target` and `seed` are null,
so no paired verdict over seeds is ever formed for it (dictlearn.analysis.outside says what its
single point can show).

Resume: an included dictionary's record is cached in `DIR/evaluations/included/<name>.json` with a
fingerprint of its files (SHA-256 of every file under the path); a rerun reuses it while the
files are unchanged and evaluates it again otherwise. `include` is not part of a comparison's
identity: a finished run takes new `--include` paths without retraining anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlearn.compare.plan import CompareConfig, Planned
from dictlearn.data.h5 import H5Array
from dictlearn.errors import ConfigError, DataError
from dictlearn.evaluate import Entry, evaluate
from dictlearn.io import atomic_write_text
from dictlearn.metrics.concepts import ProbeCache
from dictlearn.models.hooks import HookPoint, capture, run_until_captured

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # becomes a file name under DIR/evaluations/included


@dataclass
class Included:
    """One outside dictionary, checked against the run: its name in the results, the path, what
    the folder says it is, and the datasets of the run's file it is measured on."""

    name: str
    path: Path
    format: str
    architecture: str
    mapping: str  # sae | transcoder | skip_transcoder
    keys: tuple[str, str | None]  # (input key, target key or None) of the run's file
    site: dict  # the run's model_name, hook_name, hook_name_out (what its own lines record)
    recorded: dict  # model_name, hook_name, hook_name_out as the folder records them (None: not recorded)
    entry: object = None  # the loaded dictlearn.evaluate.Entry

    @property
    def flag(self) -> str:
        return f"--include {self.path}"


# ----------------------------------------------------------------------------- parsing
def parse_include(values: list[str]) -> list[tuple[str, Path]]:
    """`PATH` or `NAME=PATH` items -> [(name, path)]; the name defaults to the folder's name."""
    parsed = []
    for raw in values:
        text = str(raw).strip()
        name, _, rest = text.partition("=")
        if rest and "/" not in name and name.strip():
            name, path = name.strip(), Path(rest.strip())
        else:
            path = Path(text)
            name = path.name if path.name not in ("", ".", "..") else path.resolve().name
            if path.is_file():  # a checkpoint or ae.pt: name it after its folder
                name = path.parent.resolve().name if path.stem in ("ae", "final", "last") else path.stem
        if not _NAME.match(name):
            raise ConfigError(f"--include {text}: name {name!r} is not usable as a file name; give one with "
                              "NAME=PATH (letters, digits, . _ + -)")
        parsed.append((name, path))
    return parsed


def load_entry(path: Path):
    """-> (dictlearn.evaluate.Entry, format): the dictionary as `dictlearn evaluate` reads `path`,
    with the cfg.json its export would have (an outside folder's names its detected format)."""
    entry = Entry.from_path(path)
    return entry, str(entry.cfg.get("format") or "dictlearn")


# ----------------------------------------------------------------------------- checks, before any write
def check_included(config: CompareConfig, source, lm, planned: list[Planned]) -> list[Included]:
    """Every `config.include` path loaded and checked against the run: it loads, its widths fit the
    run's activations, its recorded model and hooks (where both sides record one) are the run's,
    a transcoder has a target in the run, and every name is unique. One-line errors, nothing written."""
    found: list[Included] = []
    names = {p.name: "a dictionary this run trains" for p in planned}
    for name, path in parse_include(config.include):
        flag = f"--include {path}"
        if name in names:
            raise ConfigError(f"{flag}: the name {name!r} is already {names[name]}; give another with NAME={path}")
        names[name] = f"the name of --include {path}"
        if not path.exists():
            raise ConfigError(f"{flag}: no such file or folder; pass a dictionary folder (SAELens, sparsify, "
                              "dictionary_learning or a dictlearn export)")
        try:
            entry, format = load_entry(path)
        except (DataError, ConfigError) as error:
            raise ConfigError(f"{flag}: does not load: {error}") from None
        dictionary = entry.dictionary
        mapping = "skip_transcoder" if getattr(dictionary, "W_skip", None) is not None else \
            "transcoder" if dictionary.transcoder else "sae"
        meta = entry.cfg.get("metadata") if isinstance(entry.cfg.get("metadata"), dict) else {}
        recorded = {k: meta.get(k) or None for k in ("model_name", "hook_name", "hook_name_out")}
        keys = _keys(source, mapping, flag)
        site, widths = _run_site(source, lm, keys)
        # the library's own name for it (SAELens' architecture, dictionary_learning's class), else dictlearn's
        architecture = entry.data.get("source_architecture") or entry.cfg.get("architecture") or type(dictionary).__name__
        included = Included(name, path, format, str(architecture), mapping, keys, site, recorded, entry)
        _check_fit(included, widths)
        found.append(included)
    return found


def _keys(source, mapping: str, flag: str) -> tuple[str, str | None]:
    if mapping == "sae":
        return source.sae_keys
    if source.transcoder_keys is None:
        raise ConfigError(f"{flag}: a {mapping.replace('_', ' ')}, but this run has no target activations; pass "
                          "--target-key K2 (the dataset it predicts) or drop it from --include")
    return source.transcoder_keys


def _run_site(source, lm, keys: tuple[str, str | None]) -> tuple[dict, dict]:
    """(the model and hooks the run's own lines record, {key: width}) for the datasets `keys`: read
    from the file, or, before a harvest, from the model's hooks (one forward of two tokens)."""
    if source.hooks is None or source.path.is_file():
        arrays = {k: H5Array(source.path, k) for k in keys if k is not None}
        attrs = {k: a.attrs() for k, a in arrays.items()}
        site = {"model_name": attrs[keys[0]].get("model_name") or None,
                "hook_name": attrs[keys[0]].get("hook_name") or None,
                "hook_name_out": attrs[keys[1]].get("hook_name") or None if keys[1] else None}
        return site, {k: a.d for k, a in arrays.items()}
    wanted = [k for k in keys if k is not None]
    device = next(lm.model.parameters()).device
    with torch.no_grad(), capture(lm.model, wanted, stop_after=True) as acts:
        run_until_captured(lm.model, torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    widths = {k: acts[str(HookPoint.parse(k))].shape[-1] for k in wanted}
    return {"model_name": lm.name, "hook_name": keys[0], "hook_name_out": keys[1]}, widths


def _check_fit(included: Included, widths: dict) -> None:
    """Widths, model and hooks, as `dictlearn.evaluate` would check them after training (so a
    dictionary that would fail there is refused here, before any)."""
    dictionary, flag = included.entry.dictionary, included.flag
    (input_key, target_key) = included.keys
    for role, key, expected in (("d_in", input_key, dictionary.d_in), ("d_out", target_key, dictionary.d_out)):
        if key is not None and widths[key] != expected:
            raise ConfigError(f"{flag}: {role}={expected} does not fit this run's activations ('{key}' has width "
                              f"{widths[key]}); include a dictionary trained on this model and layer")
    for field, what in (("model_name", "model"), ("hook_name", "hook"), ("hook_name_out", "output hook")):
        mine, theirs = included.site.get(field), included.recorded.get(field)
        if mine and theirs and mine != theirs:
            raise ConfigError(f"{flag}: trained on {what} {theirs!r} but this run's activations come from "
                              f"{what} {mine!r}; include a dictionary of this run's {what}, or compare it on its own data")


# ----------------------------------------------------------------------------- evaluation and results
def fingerprint(path: Path) -> str:
    """SHA-256 over every file under `path` (names and contents): a cached record is reused only
    for the same files."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def evaluate_included(config: CompareConfig, data: Path, included: list[Included], options, cache, probes, progress,
                      check_stop) -> list[dict]:
    """Each included dictionary evaluated as the run's own members are (`options`: the run's
    EvaluateOptions, the datasets set per dictionary, on the run's file `data`) -> its results
    line. `check_stop()` raises between dictionaries when the run was asked to stop."""
    if not included:
        return []
    folder = Path(config.out) / "evaluations" / "included"
    if probes is None and options.interpret:
        probes = ProbeCache()  # the probe rows and linear baseline: once for all included dictionaries
    progress.stage("evaluate included", len(included), unit="dict")
    lines = []
    for i, inc in enumerate(included):
        check_stop()
        record_path, prints = folder / f"{inc.name}.json", fingerprint(inc.path)
        cached = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if cached.get("fingerprint") != prints:
            mine = dataclasses.replace(options, input_key=inc.keys[0], target_key=inc.keys[1], **_run_windows(data, inc))
            record = evaluate([inc.entry], data, options=mine,
                              cache=cache, probes=probes)[0]
            cached = {"fingerprint": prints, "record": record}
            atomic_write_text(record_path, json.dumps(cached, default=str))
        lines.append(included_line(inc, cached["record"]))
        progress.update(i + 1)
    return lines


def _run_windows(data: Path, inc: Included) -> dict:
    """The run's model and window length (its file's), so the spliced runs are the run's own
    windows, whatever the folder records (e.g. SAELens' `context_size`); no model: no downstream
    metrics, as for the run's own dictionaries."""
    attrs = H5Array(data, inc.keys[0]).attrs()
    model = attrs.get("model_name") or None
    return {"model": model, "context": attrs.get("context_size") or None} | ({} if model else {"downstream": False})


def included_line(inc: Included, record: dict) -> dict:
    """evaluate's record + the keys of a run's results line, null where they mean training
    (DESIGN.md: `trained: false`, `source`, `format`). Its `model_name`/`hook_name` are the run's,
    so the analysis draws it on the run's figures; what the folder records is `source_*`."""
    declared = getattr(type(inc.entry.dictionary), "mechanism", None)  # outside classes inherit theirs
    return {
        **record,
        **{k: v for k, v in inc.site.items()},
        "name": inc.name, "architecture": inc.architecture,
        "mechanism": getattr(declared, "name", None), "mapping": inc.mapping,
        "l0_target": None, "seed": None, "train_tokens": None, "train_seconds": None, "log_dir": None,
        "member": None, "batch_size": None, "optimizer": None, "lr_tuned": None,
        "export": str(inc.path.resolve()),
        "trained": False, "source": str(inc.path.resolve()), "format": inc.format,
        **{f"source_{k}": v for k, v in inc.recorded.items()},
    }  # fmt: skip
