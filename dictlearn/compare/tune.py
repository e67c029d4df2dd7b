"""`dictlearn compare --tune-lr`: each architecture's learning rate, chosen on validation documents.

One optimiser for every architecture is the fair default (compare/plan.py `OPTIMIZER`); where a
mechanism may need another learning rate, the search makes that a visible, recorded choice:

- **Runs.** For each architecture, one short run per LR of `lr_grid` at one setting: the middle
  L0 target (of the sorted targets), the first seed and the first d_sae of the plan, for as many
  steps as the comparison's own runs (the best LR depends on the run's length). The runs of one
  architecture are one sweep (`DIR/train/lr_<architecture>/`); calibrated mechanisms calibrate
  their coefficient to the target in each run, as in the comparison.
- **Validation documents.** Carved from the *training* side of a harvested file: the documents of
  its last `VALIDATION_FRACTION` of training rows (the harvest writes documents in a seeded random
  order, so they are a random tenth of the training documents), the document straddling the cut
  left on the training side. The search runs train on the rows before them; the test documents
  (the file's held-out documents, which the report scores) are never read. A file that records no
  held-out documents is refused: without document ids, validation rows could not be kept apart
  from the test rows.
- **Criterion.** The lowest *bound on the FVU at the target L0*: a run's validation FVU times
  ``max(1, L0 / target)``. Why a bound: FVU falls as L0 rises, and no faster than ``1 / L0``
  (the default comparison's TopK: FVU 0.142, 0.092, 0.058 at L0 8, 16, 32, about ``L0^-0.65``;
  benchmarks/RESULTS.md), so a run below its target would do no worse at it, and one above it
  would do no worse than its FVU times the overshoot. An LR cannot win by spending more latents
  than the target, and a run whose calibration undershoots is not thrown out for it (short runs
  miss L0 by 10-50 %, and a hard L0 window picks the LR too small to train, whose coefficient
  calibrates easily).
  FVU is evaluate's (`reconstruction_metrics`, the code that scores the test documents).
- **Record.** `DIR/lr_search.json`: every run (architecture, lr, validation fvu, l0, chosen), the
  validation split and the criterion; the report shows it as a table. Finished sweeps keep
  `scores.json` next to their checkpoints, so rerunning the same `--out` trains nothing again.

    documents = validation_documents("acts.h5", n_rows)   # rows [documents.start, documents.stop)
    chosen = search(config, source, train)                # {"topk": 0.003, "relu_l1": 0.001, ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dictlearn.compare.plan import CompareConfig, Planned, plan, with_lr
from dictlearn.data.h5 import H5Array
from dictlearn.data.split import HeldOutSplit
from dictlearn.errors import DataError
from dictlearn.export import load
from dictlearn.io import atomic_write_text

VALIDATION_FRACTION = 0.1  # of the training rows: ~10 % of the training documents validate
SEARCH_FILE = "lr_search.json"
CRITERION = ("lowest validation FVU x max(1, validation L0 / target L0): a bound on the FVU at the target L0 "
             "(FVU falls with L0, no faster than 1/L0), so no LR wins by exceeding the target L0")


@dataclass(frozen=True)
class ValidationDocuments:
    """Rows `[0, start)` train the search runs, rows `[start, stop)` are the validation
    documents'; `stop` is the file's `heldout_start` (the test documents follow it)."""

    start: int
    stop: int
    documents: int  # validation documents
    train_documents: int  # documents of rows [0, start)

    def split(self, block_size: int = 512, val_rows: int | None = None) -> HeldOutSplit:
        """The search's split of the file's first `stop` rows: train `[0, start)`, validate after."""
        return HeldOutSplit(self.stop, block_size, val_rows, self.start, self.documents, self.train_documents)

    def summary(self) -> dict[str, int]:
        return {"documents": self.documents, "rows": self.stop - self.start, "train_documents": self.train_documents,
                "train_rows": self.start, "test_rows_from": self.stop}


def validation_documents(path: str, n_rows: int, fraction: float = VALIDATION_FRACTION) -> ValidationDocuments:
    """The validation documents of a harvested file (module docstring); a one-line DataError for a
    file without recorded documents or with too few training documents to spare some."""
    split = HeldOutSplit.from_file(path, n_rows)
    if split.kind != "documents":
        raise DataError(f"{path}: records no held-out documents (not a `dictlearn harvest` file, or one with under "
                        "10 documents); --tune-lr needs document ids to keep its validation rows apart from the test "
                        "rows: drop --tune-lr or harvest the activations with dictlearn")
    stop = split.heldout_start
    with h5py.File(path, "r") as f:
        doc = f["doc_index"][:stop].astype(np.int64)
    cut = stop - max(1, round(fraction * stop))
    seen = np.zeros(int(doc.max(initial=0)) + 1, bool)
    seen[doc[:cut][doc[:cut] >= 0]] = True
    # the document straddling the cut stays on the training side (a document's rows are contiguous)
    straddling = (doc[cut:] >= 0) & seen[np.clip(doc[cut:], 0, None)]
    start = cut + (int(np.argmin(straddling)) if not straddling.all() else len(straddling))
    train_ids, val_ids = (np.unique(ids[ids >= 0]) for ids in (doc[:start], doc[start:]))
    if len(val_ids) < 2 or len(train_ids) < 2:
        raise DataError(f"{path}: its {len(np.unique(doc[doc >= 0]))} training-side documents are too few to hold "
                        "some out for validation (--tune-lr needs 2 on each side); harvest more tokens or drop "
                        "--tune-lr")
    if len(np.intersect1d(train_ids, val_ids)):
        raise DataError(f"{path}: document {int(np.intersect1d(train_ids, val_ids)[0])} has rows on both sides of "
                        f"row {start}; its documents are not contiguous — re-harvest the file")
    return ValidationDocuments(start, stop, len(val_ids), len(train_ids))


def check(config: CompareConfig, source) -> None:
    """Before anything is written: a given --data file can hold validation documents."""
    if config.tune_lr and source.hooks is None:
        validation_documents(str(source.path), H5Array(source.path, source.sae_keys[0]).n_rows)


def search_runs(config: CompareConfig) -> dict[str, list[tuple[float, Planned]]]:
    """{architecture: [(lr, its search run)]}: the plan's dictionary at the middle L0 target, first
    seed and first d_sae, once per LR of the grid, named `<architecture>_lr<i>`."""
    targets = sorted(config.l0)
    middle = targets[(len(targets) - 1) // 2]
    runs = {}
    for p in plan(config):
        if (p.seed, p.d_sae, p.l0_target) == (config.seeds[0], config.d_sae[0], middle):
            runs[p.architecture] = [(lr, dataclasses.replace(p, name=f"{p.architecture}_lr{i}",
                                                             training=with_lr(p.training, lr)))
                                    for i, lr in enumerate(config.lr_grid)]
    return runs


def search(config: CompareConfig, source, train: Callable[[list[Planned], Path, ValidationDocuments], None]
           ) -> dict[str, float]:
    """Train (`train(runs, folder, documents)`: compare/run.py's sweep training on `documents`'
    split) and score every search run not already scored; write DIR/lr_search.json;
    -> {architecture: chosen lr}."""
    out = Path(config.out)
    documents = validation_documents(str(source.path), H5Array(source.path, source.sae_keys[0]).n_rows)
    searched, rows = search_runs(config), []
    for architecture, runs in searched.items():
        rows += _scored(config, source, documents, architecture, runs, train)
    chosen = choose(rows)
    for row in rows:
        row["chosen"] = chosen[row["architecture"]] == row["lr"]
    first = next(iter(searched.values()))[0][1]
    seconds = [out / "train" / f"lr_{a}" / "train_seconds.json" for a in chosen]
    record = {"criterion": CRITERION, "l0_target": first.l0_target, "d_sae": first.d_sae, "seed": first.seed,
              "steps": config.steps, "lr_grid": config.lr_grid, "validation": documents.summary(),
              "train_seconds": sum(json.loads(f.read_text())["seconds"] for f in seconds if f.is_file()),
              "chosen": chosen, "table": rows}
    atomic_write_text(out / SEARCH_FILE, json.dumps(record, indent=1) + "\n")
    return chosen


def fvu_bound(fvu: float, l0: float, target: float) -> float:
    """A bound on a run's FVU at L0 `target` from its (fvu, l0): fvu * max(1, l0 / target)."""
    return fvu * max(1.0, l0 / target)


def choose(rows: list[dict]) -> dict[str, float]:
    """{architecture: lr}: the lowest `score` (the FVU bound) of rows {architecture, lr, score}."""
    chosen = {}
    for architecture in dict.fromkeys(r["architecture"] for r in rows):
        finite = [r for r in rows if r["architecture"] == architecture and math.isfinite(r["score"])]
        if not finite:
            raise DataError(f"--tune-lr: every search run of {architecture} has a non-finite validation FVU; lower "
                            "--lr-grid")
        chosen[architecture] = min(finite, key=lambda r: r["score"])["lr"]
    return chosen


def _scored(config: CompareConfig, source, documents: ValidationDocuments, architecture: str,
            runs: list[tuple[float, Planned]], train) -> list[dict]:
    """One architecture's search sweep, trained (or resumed) and scored; its rows of the table."""
    folder = Path(config.out) / "train" / f"lr_{architecture}"
    scores = folder / "scores.json"
    if scores.is_file():
        return json.loads(scores.read_text())
    group = [p for _, p in runs]
    final = folder / "final.ckpt"
    if not final.is_file():
        train(group, folder, documents)
    rows = []
    for lr, p in runs:
        fvu, l0 = validation_scores(final, p, source, documents, config.device)
        rows.append({"architecture": architecture, "lr": lr, "validation_fvu": fvu, "l0": l0,
                     "l0_target": p.l0_target, "score": fvu_bound(fvu, l0, p.l0_target), "name": p.name})
    atomic_write_text(scores, json.dumps(rows, indent=1) + "\n")
    return rows


def validation_scores(checkpoint: Path, p: Planned, source, documents: ValidationDocuments,
                      device: str) -> tuple[float, float]:
    """(fvu, l0) of search run `p` on every validation-document row, by evaluate's own code."""
    from dictlearn.evaluate import HeldOutData, reconstruction_metrics

    dictionary = load(checkpoint, member=p.name).to(device)
    input_key, target_key = source.keys(p)
    inputs = H5Array(source.path, input_key)
    targets = None if target_key is None else H5Array(source.path, target_key)
    data = HeldOutData(str(source.path), input_key, target_key, inputs, targets, documents.split())
    try:
        metrics, _, _ = reconstruction_metrics(dictionary, data, device, density_rows=0)
    finally:
        data.close()
    return float(metrics["fvu"]), float(metrics["l0"])
