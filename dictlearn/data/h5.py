"""Reading and writing activation datasets in HDF5.

An activation dataset is one 2-D dataset `[n_rows, d]` inside an HDF5 file, at any key (nested
keys such as ``blocks.0.hook`` or ``layer3/resid`` are fine). `H5Array` validates it once at
construction and then reads contiguous row ranges as float32 torch tensors. A comma-separated
key (``mlp_in.0,mlp_in.1,mlp_in.2``) reads several row-aligned datasets of equal width side by
side, `[n_rows, layers * d]`, listed in layer order: the input or target of a cross-layer
transcoder (`dictlearn harvest --layers all` writes such files).

Stored dtypes:
- float16, float32, float64 (float64 is read as float32).
- **bfloat16 convention.** h5py has no bfloat16, so a bf16 dataset is stored as ``uint16`` holding
  the raw bf16 bit patterns, with the *dataset* attribute ``dtype = "bfloat16"``. The reader views
  the bits as ``torch.bfloat16`` and upcasts to float32. A uint16 dataset without that attribute
  is integer data and is rejected, like every other integer, bool or non-numeric dtype.

A file whose root attribute ``complete`` is False was left by an interrupted writer (harvest,
synth) and is rejected. Files written by dictlearn go through `open_for_write`, which sets
``complete=True`` last and moves the file into place atomically (see `dictlearn.io`).

Process safety: the h5py handle is opened lazily in the reading process, dropped when pickled and
reopened if the pid changes, so it never crosses a fork or spawn into a DataLoader worker
(a handle opened in the parent cannot be pickled into a spawned worker; benchmarks/RESULTS.md).
An array told to `hold_in_memory` reads its whole dataset once per process, on first use, and
serves every later read from that copy; the copy is never pickled either.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import h5py
import numpy as np
import torch

from dictlearn.errors import DataError
from dictlearn.io import atomic_path
from dictlearn.version import dictlearn_version

BF16_ATTR = "bfloat16"
_FLOAT_DTYPES = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))


def _attr_str(value: object) -> str:
    """An HDF5 string attribute as str (h5py returns bytes for fixed-length strings)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value: object) -> object:
    """An HDF5 attribute as a JSON-able Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _list_2d_datasets(f: h5py.File, limit: int = 20) -> str:
    """Comma-separated names of the 2-D datasets in `f`, for error messages."""
    names: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim == 2:
            names.append(name)

    f.visititems(visit)
    if not names:
        return "the file has no 2-D datasets"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return "2-D datasets in the file: " + ", ".join(repr(n) for n in names[:limit]) + more


def check_activation_file(path, flag: str = "--data") -> str:
    """`path` as a string, or a one-line DataError naming `flag` when there is no such file (every
    command that reads an activation file checks this before any work)."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file; pass an HDF5 activation file")
    return path


def _open_checked(path: str, key: str) -> h5py.File:
    """Open `path` read-only, turning h5py's OSError into a one-line DataError."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (wanted dataset '{key}'); check the path")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = " ".join(str(err).split())
        raise DataError(
            f"{path}: cannot open as HDF5 to read '{key}' ({reason}); the file is truncated or not"
            " HDF5 — re-create it"
        ) from None


def _check_dataset(f: h5py.File, path: str, key: str) -> tuple[int, int, str]:
    """Validate `f[key]`; return (n_rows, d, stored dtype name)."""
    if "complete" in f.attrs and not bool(f.attrs["complete"]):
        raise DataError(
            f"{path}: attribute complete=False — the file was left by an interrupted harvest/synth"
            f" (wanted dataset '{key}'); re-create it"
        )
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        what = "is a group, not a dataset" if obj is not None else "not found"
        raise DataError(f"{path}: dataset '{key}' {what}; {_list_2d_datasets(f)}")
    if obj.ndim != 2:
        raise DataError(
            f"{path}: dataset '{key}' has shape {obj.shape}; activations must be 2-D [rows, d]."
            f" {_list_2d_datasets(f)}"
        )
    dtype = _stored_dtype(obj, path, key)
    n_rows, d = obj.shape
    if n_rows == 0 or d == 0:
        raise DataError(
            f"{path}: dataset '{key}' has shape {obj.shape} (no data); harvest more rows or pick"
            " another key"
        )
    return n_rows, d, dtype


def _raw_dtype(stored_dtype: str) -> np.dtype:
    """The numpy dtype a dataset's values are read as (bfloat16: its uint16 bits)."""
    return np.dtype(np.uint16) if stored_dtype == BF16_ATTR else np.dtype(stored_dtype)


def _stored_dtype(ds: h5py.Dataset, path: str, key: str) -> str:
    """'float16' | 'float32' | 'float64' | 'bfloat16', or a DataError for anything else."""
    if ds.dtype in _FLOAT_DTYPES:
        return ds.dtype.name
    if ds.dtype == np.uint16 and _attr_str(ds.attrs.get("dtype", "")) == BF16_ATTR:
        return BF16_ATTR
    hint = " (for bfloat16 bits, set the dataset attribute dtype='bfloat16')" if ds.dtype == np.uint16 else ""
    raise DataError(
        f"{path}: dataset '{key}' has dtype {ds.dtype}; activations must be float16/float32/float64"
        f" or bfloat16 stored as uint16{hint}"
    )


class H5Array:
    """A lazily opened, validated view of one 2-D activation dataset `(path, key)`.

    Construction opens the file briefly to validate it (exists, opens, key, 2-D, float dtype,
    rows > 0, not marked incomplete) and closes it again; `read` opens it on first use in the
    current process.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path, self.key = os.fspath(path), key
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None
        self._pid: int | None = None
        self.held = False  # `hold_in_memory`
        self._rows: np.ndarray | None = None  # the whole dataset, as stored, once held and read
        self._rows_pid: int | None = None  # the process that read `_rows`
        self.parts: list[H5Array] | None = None
        if "," in key:  # several layers side by side: a cross-layer transcoder's input or target
            self.parts = _layer_parts(self.path, key)
            self.n_rows, self.stored_dtype = self.parts[0].n_rows, self.parts[0].stored_dtype
            self.d = sum(part.d for part in self.parts)
            return
        with _open_checked(self.path, key) as f:
            self.n_rows, self.d, self.stored_dtype = _check_dataset(f, self.path, key)

    def attrs(self) -> dict[str, object]:
        """The file's root attributes overlaid with the dataset's own (provenance: model, hook, ...)."""
        if self.parts is not None:
            return {**self.parts[0].attrs(), "hook_name": self.key}
        with h5py.File(self.path, "r") as f:
            merged = {**f.attrs, **f[self.key].attrs}
        return {name: _plain(value) for name, value in merged.items()}

    def __repr__(self) -> str:
        shape = f"({self.n_rows}, {self.d})"
        return f"H5Array({self.path!r}, {self.key!r}, shape={shape}, dtype={self.stored_dtype})"

    def __len__(self) -> int:
        return self.n_rows

    def _handle(self) -> h5py.Dataset:
        # A handle inherited through fork is unsupported by HDF5: reopen in every new process.
        if self._dataset is None or self._pid != os.getpid():
            self._file, self._pid = _open_checked(self.path, self.key), os.getpid()
            self._dataset = self._file[self.key]
        return self._dataset

    @property
    def nbytes(self) -> int:
        """Bytes of the dataset as stored (all parts)."""
        if self.parts is not None:
            return sum(part.nbytes for part in self.parts)
        return self.n_rows * self.d * _raw_dtype(self.stored_dtype).itemsize

    def hold_in_memory(self, hold: bool = True) -> None:
        """Serve reads from a copy of the whole dataset, read once per process in one sequential
        read, instead of one HDF5 read per row range (False: drop it, read the file again).

        A shuffled batch of small blocks is dozens of HDF5 reads, each with h5py's fixed cost
        (~15 ms for 1024 rows of 128 in 16-row blocks, a tenth of a compare sweep's step); from
        memory it is one copy. The bytes returned are the file's either way."""
        for part in self.parts or ():
            part.hold_in_memory(hold)
        self.held = hold
        if not hold:
            self._rows = None

    def _held_rows(self) -> np.ndarray:
        if self._rows is None or self._rows_pid != os.getpid():
            rows = np.empty((self.n_rows, self.d), dtype=_raw_dtype(self.stored_dtype))
            self._handle().read_direct(rows)
            self._rows, self._rows_pid = rows, os.getpid()
        return self._rows

    def will_need(self, slices: Sequence[tuple[int, int]]) -> None:
        """Ask the OS to start reading these row ranges into the page cache, without waiting.

        For a file that is not in the page cache, the ranges' disk reads then run concurrently
        (and beside other work) instead of one after another inside `read_slices`: a 4096-row
        batch of eight 512-row blocks from a cold contiguous file read ~2x faster
        (benchmarks/RESULTS.md, "Data loader"). Only a contiguous dataset has one file offset;
        for a chunked one, or without ``posix_fadvise`` (macOS, Windows), this does nothing.
        """
        if self.parts is not None:
            for part in self.parts:
                part.will_need(slices)
            return
        if self.held:
            return
        ds = self._handle()
        offset = ds.id.get_offset()
        if offset is None or not hasattr(os, "POSIX_FADV_WILLNEED"):
            return
        fd, row_bytes = self._file.id.get_vfd_handle(), self.d * ds.dtype.itemsize
        for start, stop in slices:
            if 0 <= start < stop <= self.n_rows:
                with contextlib.suppress(OSError):  # advice only: the read itself reports errors
                    os.posix_fadvise(fd, offset + start * row_bytes, (stop - start) * row_bytes,
                                     os.POSIX_FADV_WILLNEED)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` -> float32 tensor `[stop - start, d]`."""
        return self.read_slices([(start, stop)])

    def read_slices(self, slices: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Concatenation of contiguous row ranges -> float32 tensor `[sum of lengths, d]`.

        Each range is one contiguous HDF5 read straight into the output buffer (no per-row
        indexing: sorted fancy indexing is 5-50x slower than blocks, benchmarks/RESULTS.md).
        """
        if self.parts is not None:
            return torch.cat([part.read_slices(slices) for part in self.parts], dim=1)
        for start, stop in slices:
            if not 0 <= start <= stop <= self.n_rows:
                raise IndexError(
                    f"{self.path}['{self.key}']: rows [{start}, {stop}) outside [0, {self.n_rows})"
                )
        if self.held:
            held = self._held_rows()
            out = np.concatenate([held[start:stop] for start, stop in slices]) if slices else held[:0].copy()
        else:
            out = self._read_file(slices)
        tensor = torch.from_numpy(out)
        if self.stored_dtype == BF16_ATTR:
            tensor = tensor.view(torch.bfloat16)
        # Upcast in torch, faster than numpy's cast (benchmarks/RESULTS.md, "HDF5 layout").
        return tensor.float()

    def _read_file(self, slices: Sequence[tuple[int, int]]) -> np.ndarray:
        """`read_slices` from the file, as stored: [sum of lengths, d]."""
        raw_dtype = _raw_dtype(self.stored_dtype)
        out = np.empty((sum(stop - start for start, stop in slices), self.d), dtype=raw_dtype)
        ds, offset = self._handle(), 0
        row_bytes = self.d * out.itemsize
        for run in _runs([s for s in slices if s[1] > s[0]], max(0, _GAP_BYTES // row_bytes),
                         max(1, _SPAN_BYTES // row_bytes)):
            if len(run) == 1:
                (start, stop), = run
                ds.read_direct(out, np.s_[start:stop], np.s_[offset : offset + stop - start])
                offset += stop - start
                continue
            first = run[0][0]  # one read through the small gaps, then each range copied out
            span = np.empty((run[-1][1] - first, self.d), dtype=raw_dtype)
            ds.read_direct(span, np.s_[first : run[-1][1]])
            for start, stop in run:
                out[offset : offset + stop - start] = span[start - first : stop - first]
                offset += stop - start
        return out

    def close(self) -> None:
        """Drop the open handle (if any); the next `read` reopens it."""
        for part in self.parts or ():
            part.close()
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._dataset = self._pid = None

    def __getstate__(self) -> dict:
        # h5py handles cannot be pickled (spawn) and must not be shared (fork).
        state = self.__dict__.copy()
        state.update(_file=None, _dataset=None, _pid=None, _rows=None, _rows_pid=None)
        return state


# Each HDF5 read costs ~0.1 ms of Python and library overhead whatever its size, about the time to
# copy 1 MB: a sample of many small blocks (16 rows, the short run's block size) spent seconds
# per member in read calls (benchmarks/RESULTS.md, "compare --replace mlp"). Ranges that follow
# each other in the file with gaps of at most _GAP_BYTES are read as one span, at most _SPAN_BYTES.
_GAP_BYTES, _SPAN_BYTES = 1 << 18, 1 << 26


def _runs(slices: Sequence[tuple[int, int]], gap_rows: int, span_rows: int) -> list[list[tuple[int, int]]]:
    """`slices` (non-empty ranges, in the caller's order) cut into runs read with one call each:
    consecutive ranges, each starting at most `gap_rows` after the previous one stops, spanning at
    most `span_rows` rows (a single range may span more)."""
    runs: list[list[tuple[int, int]]] = []
    for start, stop in slices:
        if runs:
            run = runs[-1]
            if run[-1][1] <= start <= run[-1][1] + gap_rows and stop - run[0][0] <= span_rows:
                run.append((start, stop))
                continue
        runs.append([(start, stop)])
    return runs


def _layer_parts(path: str, key: str) -> list[H5Array]:
    """The datasets of a comma-separated `key` ("mlp_in.0,mlp_in.1,..."): one per layer, in layer
    order, of equal rows and widths, each checked as a dataset; a one-line DataError otherwise."""
    keys = [k.strip() for k in key.split(",")]
    if any(not k for k in keys) or len(set(keys)) != len(keys):
        raise DataError(f"{path}: key list {key!r} has an empty or repeated key; name each layer's dataset once")
    layers = [_layer_index(k) for k in keys]
    if None not in layers and any(b <= a for a, b in zip(layers, layers[1:])):
        raise DataError(f"{path}: key list {key!r} is not in layer order (layers {layers}); list the layers "
                        "from first to last")
    parts = [H5Array(path, k) for k in keys]
    for part in parts[1:]:
        if part.n_rows != parts[0].n_rows:
            raise DataError(f"{path}: '{part.key}' has {part.n_rows} rows but '{keys[0]}' has {parts[0].n_rows}; "
                            "the layers must be row-aligned (harvest them together with --layers)")
        if part.d != parts[0].d:
            raise DataError(f"{path}: '{part.key}' has width {part.d} but '{keys[0]}' has {parts[0].d}; the layers "
                            "of a cross-layer transcoder must have equal widths")
    return parts


def _layer_index(key: str) -> int | None:
    """The layer a key names: its last all-digit component (``transformer.h.3.mlp:input`` -> 3,
    ``mlp_in.3`` -> 3), None when there is none."""
    digits = [part for part in key.replace(":", ".").replace("/", ".").split(".") if part.isdigit()]
    return int(digits[-1]) if digits else None


@contextlib.contextmanager
def open_for_write(path: str | os.PathLike, attrs: dict | None = None) -> Iterator[h5py.File]:
    """Yield an h5py.File on a temp path beside `path`; on success mark it complete and move it in.

    Root attributes: `attrs`, ``dictlearn_version`` and ``complete`` (False while writing, True
    written last). On an exception the temp file is removed and nothing appears at `path`.
    Create datasets without ``chunks``/``compression`` for the contiguous layout (fastest to read;
    benchmarks/RESULTS.md, "HDF5 layout").
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["complete"] = False
            f.attrs["dictlearn_version"] = dictlearn_version()
            for name, value in (attrs or {}).items():
                f.attrs[name] = value
            yield f
            f.attrs["complete"] = True


def write_datasets(
    path: str | os.PathLike,
    datasets: dict[str, np.ndarray],
    attrs: dict | None = None,
    dataset_attrs: dict[str, dict] | None = None,
) -> None:
    """Write a whole HDF5 file atomically: uncompressed contiguous datasets, then `complete=True`.

    `datasets` maps key -> array; `dataset_attrs` maps key -> that dataset's attributes (e.g.
    ``{"acts": {"dtype": "bfloat16"}}`` for bf16 bits stored as uint16).
    """
    with open_for_write(path, attrs) as f:
        for key, array in datasets.items():
            ds = f.create_dataset(key, data=np.asarray(array))
            for name, value in (dataset_attrs or {}).get(key, {}).items():
                ds.attrs[name] = value
