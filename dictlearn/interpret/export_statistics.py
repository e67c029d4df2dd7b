"""Per-latent statistics recorded beside an export's weights, so steering knows each latent's maximum.

`dictlearn inspect` writes `latent_statistics.safetensors` into the export folder (atomically):
`max_activation [d_sae]`, `fire_count [d_sae]`, with metadata naming the activation file, the
dataset, the rows and the hash of the weights they were measured with. A re-export replaces the
folder (and drops the file); a file whose weights hash differs from the folder's weights is stale
and ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dictlearn.export import STATISTICS_NAME, WEIGHTS_NAME
from dictlearn.io import atomic_path


@dataclass
class Recorded:
    max_activation: torch.Tensor  # [d_sae]
    fire_count: torch.Tensor  # [d_sae]
    source: str  # where the numbers come from, for a person
    data: str | None = None  # the activation file they were measured on


def weights_hash(export: Path) -> str:
    return hashlib.sha256((Path(export) / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]


def record(export: Path, max_activation: torch.Tensor, fire_count: torch.Tensor, data: str, key: str,
           first_row: int, n_rows: int) -> Path:
    """Write the statistics into `export` (an export folder) atomically. -> the file."""
    path = Path(export) / STATISTICS_NAME
    metadata = {"data": str(Path(data).resolve()), "key": key, "first_row": str(first_row), "rows": str(n_rows),
                "weights_sha256": weights_hash(export)}
    tensors = {"max_activation": max_activation.float().contiguous(), "fire_count": fire_count.long().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read(export: Path) -> Recorded | None:
    """The recorded statistics of an export folder, or None (absent, unreadable or stale)."""
    path = Path(export) / STATISTICS_NAME
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    if meta.get("weights_sha256") != weights_hash(export) or "max_activation" not in tensors:
        return None
    source = f"{meta.get('data')}['{meta.get('key')}'], {int(meta.get('rows', 0)):,} rows ({path.name})"
    return Recorded(tensors["max_activation"], tensors["fire_count"], source, meta.get("data"))
