"""Concept labels stored in an activation file: the ``concepts/`` group `dictlearn harvest` writes.

    read_concept_labels("acts.h5")                     # ConceptLabels, or None without the group
    write_concept_labels(f, names, values)             # your own labels into an open h5py file

The labels themselves (which byte is a keyword, a string, ...) come from dictlearn.harvest.labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from dictlearn.errors import DataError

GROUP = "concepts"  # the HDF5 group `dictlearn harvest` writes (docs/data.md, "Concept labels")


# ----------------------------------------------------------------------------- reading
@dataclass
class ConceptLabels:
    """Concept labels of an activation file's rows.

    names: the concepts, one column each; parents: child -> parent (e.g. "def" -> "keyword");
    values: bool [n_rows, n_concepts], row-aligned with the file's activation rows (or with the
    rows asked for); labelled: bool [n_rows], False where a row has no labels (a BOS position, a
    non-Python document, the part of a file past a tokenize failure) — its values are all False
    and it is neither a positive nor a negative; attrs: the group's attributes (class balance,
    documents that failed to tokenize, the token rule).
    """

    names: list[str]
    parents: dict[str, str]
    values: np.ndarray
    labelled: np.ndarray
    attrs: dict = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        """bool [n_rows] of one concept."""
        return self.values[:, self.names.index(name)]


def read_concept_labels(path: str | Path, rows=None) -> ConceptLabels | None:
    """The ``concepts/`` group of an activation file, or None when the file has none.

    rows: None for every row, a slice, or an int array of row indices (any order; the result
    follows it). Raises a one-line DataError for a damaged group.
    """
    with h5py.File(path, "r") as f:
        group = f.get(GROUP)
        if group is None:
            return None
        if not isinstance(group, h5py.Group) or "values" not in group or "labelled" not in group:
            raise DataError(f"{path}: '{GROUP}' is not a concept-label group (needs datasets 'values' and "
                            "'labelled'); re-harvest the file or delete the group")
        names = [str(n) for n in json.loads(group.attrs["names"])]
        values_ds, labelled_ds = group["values"], group["labelled"]
        if values_ds.ndim != 2 or values_ds.shape[1] != len(names) or labelled_ds.shape != values_ds.shape[:1]:
            raise DataError(f"{path}: '{GROUP}/values' is {values_ds.shape} for {len(names)} names and "
                            f"'{GROUP}/labelled' is {labelled_ds.shape}; re-harvest the file")
        values, labelled = _read_rows(values_ds, rows), _read_rows(labelled_ds, rows)
        attrs = {k: _attr(v) for k, v in group.attrs.items() if k not in ("names", "parents")}
        parents = {str(k): str(v) for k, v in json.loads(group.attrs.get("parents", "{}")).items()}
    return ConceptLabels(names, parents, values.astype(bool), labelled.astype(bool), attrs)


def write_concept_labels(f: h5py.File, names: list[str], values: np.ndarray, labelled: np.ndarray | None = None,
                         parents: dict[str, str] | None = None, **attrs) -> h5py.Group:
    """Your own labels into an open, writable activation file (`dictlearn.data.open_for_write`):
    values bool [rows, len(names)] row-aligned with its activations; labelled bool [rows]
    (None: every row). Writes the layout `read_concept_labels` reads; `attrs` are added as-is."""
    values = np.asarray(values, dtype=bool)
    labelled = np.ones(len(values), bool) if labelled is None else np.asarray(labelled, dtype=bool)
    if values.ndim != 2 or values.shape[1] != len(names) or labelled.shape != values.shape[:1]:
        raise DataError(f"concept labels: values {values.shape} and labelled {labelled.shape} do not fit "
                        f"{len(names)} names; pass values [rows, {len(names)}] and labelled [rows]")
    group = f.create_group(GROUP)
    group.create_dataset("values", data=values)
    group.create_dataset("labelled", data=labelled)
    group.attrs["names"] = json.dumps(list(names))
    group.attrs["parents"] = json.dumps(parents or {})
    group.attrs["positive_rows"] = values[labelled].sum(0)
    group.attrs["labelled_rows"] = int(labelled.sum())
    for key, value in attrs.items():
        group.attrs[key] = value
    return group


def _read_rows(dataset: h5py.Dataset, rows) -> np.ndarray:
    if rows is None:
        return dataset[()]
    if isinstance(rows, slice):
        return dataset[rows]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= dataset.shape[0]):
        raise DataError(f"concept rows {int(rows.min())}..{int(rows.max())} outside the file's "
                        f"{dataset.shape[0]} rows")
    unique, inverse = np.unique(rows, return_inverse=True)
    return _read_sorted(dataset, unique)[inverse]


def _read_sorted(dataset: h5py.Dataset, unique: np.ndarray) -> np.ndarray:
    """Rows at sorted unique indices, read as the contiguous span that holds them when that is
    not much larger (h5py's point selection is ~50x slower than a slice per row)."""
    if unique.size == 0:
        return dataset[0:0]
    first, last = int(unique[0]), int(unique[-1]) + 1
    if last - first <= 64 * unique.size:
        return dataset[first:last][unique - first]
    return dataset[unique]


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
