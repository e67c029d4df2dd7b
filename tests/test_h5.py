"""H5Array validation messages, dtype handling and atomic writes (dictlearn/data/h5.py)."""

import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from dictlearn.data.h5 import H5Array, open_for_write, write_datasets
from dictlearn.errors import DataError


def _h5(path, attrs=None, **datasets):
    """A file written with plain h5py, as a user would."""
    with h5py.File(path, "w") as f:
        for key, data in datasets.items():
            f.create_dataset(key, data=data)
        f.attrs.update(attrs or {})
    return path


def _raises(path, key, *fragments):
    with pytest.raises(DataError) as info:
        H5Array(path, key)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"'{key}'" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.h5", "acts", "not found")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    _raises(tmp_path / "empty.h5", "acts", "cannot open as HDF5", "re-create")


def test_not_hdf5(tmp_path):
    (tmp_path / "text.h5").write_text("hello\n" * 100)
    _raises(tmp_path / "text.h5", "acts", "cannot open as HDF5")


def test_truncated_file(tmp_path):
    path = _h5(tmp_path / "t.h5", acts=np.ones((4096, 64), np.float32))
    size = os.path.getsize(path)
    with open(path, "rb+") as f:
        f.truncate(size // 2)
    _raises(path, "acts", "cannot open as HDF5", "truncated")


def test_missing_key_lists_2d_datasets(tmp_path):
    path = _h5(tmp_path / "a.h5", **{"blocks.0.hook": np.ones((3, 2)), "tokens": np.arange(3)})
    message = _raises(path, "acts", "'blocks.0.hook'")
    assert "'tokens'" not in message  # 1-D datasets are not candidates


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4)])
def test_not_2d(tmp_path, shape):
    path = _h5(tmp_path / "a.h5", acts=np.ones(shape, np.float32))
    _raises(path, "acts", str(shape), "2-D")


def test_group_is_not_a_dataset(tmp_path):
    path = _h5(tmp_path / "a.h5", **{"layer/resid": np.ones((3, 2), np.float32)})
    _raises(path, "layer", "group", "'layer/resid'")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_integer_and_bool_rejected(tmp_path, dtype):
    path = _h5(tmp_path / "a.h5", acts=np.ones((3, 2), dtype))
    _raises(path, "acts", np.dtype(dtype).name, "float16/float32/float64")


def test_uint16_without_bf16_attr_rejected(tmp_path):
    path = _h5(tmp_path / "a.h5", acts=np.ones((3, 2), np.uint16))
    _raises(path, "acts", "uint16", "dtype='bfloat16'")


def test_zero_rows(tmp_path):
    path = _h5(tmp_path / "a.h5", acts=np.ones((0, 8), np.float32))
    _raises(path, "acts", "(0, 8)", "no data")


def test_incomplete_file(tmp_path):
    path = _h5(tmp_path / "a.h5", attrs={"complete": False}, acts=np.ones((3, 2), np.float32))
    _raises(path, "acts", "complete=False", "interrupted", "re-create")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_read_as_float32(tmp_path, dtype):
    values = np.random.default_rng(0).standard_normal((50, 7)).astype(dtype)
    array = H5Array(_h5(tmp_path / "a.h5", acts=values), "acts")
    out = array.read(0, 50)
    assert out.dtype == torch.float32 and array.stored_dtype == np.dtype(dtype).name
    assert torch.equal(out, torch.from_numpy(values.astype(np.float32)))


def test_bfloat16_convention_round_trip(tmp_path):
    values = torch.randn(40, 6) * 3
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    write_datasets(tmp_path / "bf.h5", {"acts": bits}, {}, {"acts": {"dtype": "bfloat16"}})
    array = H5Array(tmp_path / "bf.h5", "acts")
    assert array.stored_dtype == "bfloat16"
    out = array.read(5, 25)
    assert out.dtype == torch.float32
    assert torch.equal(out, values.to(torch.bfloat16).float()[5:25])
    assert not torch.equal(out, values[5:25])  # the bf16 rounding really happened


def test_plain_h5py_file_at_nested_key(tmp_path):
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("blocks.0.hook", data=values)
        f.create_dataset("model/layer3/resid", data=values * 2)
    assert torch.equal(H5Array(tmp_path / "a.h5", "blocks.0.hook").read(2, 5), torch.from_numpy(values[2:5]))
    nested = H5Array(tmp_path / "a.h5", "model/layer3/resid")
    assert (nested.n_rows, nested.d) == (10, 3)
    assert torch.equal(nested.read(0, 10), torch.from_numpy(values * 2))


def test_read_slices_concatenates_in_order(tmp_path):
    values = np.arange(60, dtype=np.float32).reshape(20, 3)
    array = H5Array(_h5(tmp_path / "a.h5", acts=values), "acts")
    out = array.read_slices([(15, 18), (2, 4), (7, 7), (0, 1)])
    assert torch.equal(out, torch.from_numpy(values[[15, 16, 17, 2, 3, 0]]))
    with pytest.raises(IndexError):
        array.read(18, 21)


@pytest.mark.parametrize("gap_bytes, span_bytes", [(0, 1 << 26), (24, 1 << 26), (1 << 18, 60), (1 << 18, 1 << 26)])
def test_read_slices_through_gaps_reads_the_same_rows(tmp_path, monkeypatch, gap_bytes, span_bytes):
    """Ranges close together in the file are read as one span (fewer HDF5 calls) and copied out:
    the rows are those of plain indexing whatever the gap and span limits (12-byte rows here)."""
    import dictlearn.data.h5 as h5

    values = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    array = H5Array(_h5(tmp_path / "a.h5", acts=values), "acts")
    slices = [(0, 2), (3, 5), (5, 6), (9, 10), (30, 34), (20, 22), (22, 22), (23, 49), (1, 3)]
    monkeypatch.setattr(h5, "_GAP_BYTES", gap_bytes)
    monkeypatch.setattr(h5, "_SPAN_BYTES", span_bytes)
    rows = np.concatenate([np.arange(a, b) for a, b in slices])
    assert torch.equal(array.read_slices(slices), torch.from_numpy(values[rows]))


def test_runs_join_close_ranges_in_order():
    from dictlearn.data.h5 import _runs

    slices = [(0, 2), (3, 5), (5, 6), (9, 10), (30, 34), (20, 22), (23, 49), (1, 3)]
    assert _runs(slices, 1, 100) == [[(0, 2), (3, 5), (5, 6)], [(9, 10)], [(30, 34)], [(20, 22), (23, 49)], [(1, 3)]]
    assert _runs(slices, 3, 6) == [[(0, 2), (3, 5), (5, 6)], [(9, 10)], [(30, 34)], [(20, 22)], [(23, 49)], [(1, 3)]]
    assert _runs(slices, 0, 100) == [[(0, 2)], [(3, 5), (5, 6)], [(9, 10)], [(30, 34)], [(20, 22)], [(23, 49)],
                                     [(1, 3)]]


@pytest.mark.skipif(not hasattr(os, "POSIX_FADV_WILLNEED"), reason="no posix_fadvise (macOS, Windows)")
def test_will_need_advises_the_rows_bytes(tmp_path, monkeypatch):
    """The advised byte ranges of a contiguous dataset hold exactly the requested rows."""
    values = np.random.default_rng(2).standard_normal((20, 3)).astype(np.float16)
    path = _h5(tmp_path / "a.h5", other=np.ones((5, 2)), acts=values)
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    H5Array(path, "acts").will_need([(15, 18), (2, 4), (7, 7), (19, 21)])  # empty and out-of-range: skipped
    raw = path.read_bytes()
    assert [raw[o : o + n] for o, n, _ in calls] == [values[15:18].tobytes(), values[2:4].tobytes()]
    assert {advice for *_, advice in calls} == {os.POSIX_FADV_WILLNEED}
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("acts", data=values, chunks=(4, 3))
    calls.clear()
    H5Array(tmp_path / "c.h5", "acts").will_need([(0, 4)])  # chunked: no single offset, no advice
    assert calls == []


def test_pickles_without_handle_and_reopens(tmp_path):
    values = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    array = H5Array(_h5(tmp_path / "a.h5", acts=values), "acts")
    array.read(0, 2)  # opens the handle
    assert array._file is not None
    clone = pickle.loads(pickle.dumps(array))
    assert clone._file is None
    assert torch.equal(clone.read(0, 8), torch.from_numpy(values))
    array.close()
    assert torch.equal(array.read(3, 4), torch.from_numpy(values[3:4]))  # reopens after close


def test_write_datasets_layout_and_attrs(tmp_path):
    values = np.ones((16, 4), np.float32)
    write_datasets(tmp_path / "w.h5", {"acts": values, "tokens": np.arange(16)}, {"model_name": "tiny"})
    with h5py.File(tmp_path / "w.h5", "r") as f:
        assert bool(f.attrs["complete"]) and f.attrs["model_name"] == "tiny"
        assert "dictlearn_version" in f.attrs
        assert f["acts"].chunks is None and f["acts"].compression is None  # contiguous, raw
        np.testing.assert_array_equal(f["tokens"][:], np.arange(16))
    assert sorted(os.listdir(tmp_path)) == ["w.h5"]  # no temp file left


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with open_for_write(tmp_path / "w.h5", {"kind": "test"}) as f:
            f.create_dataset("acts", data=np.ones((4, 4), np.float32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_a_key_list_reads_the_layers_side_by_side(tmp_path):
    """`mlp_in.0,mlp_in.1,mlp_in.2`: [rows, 3 d], each layer's columns its own dataset's rows."""
    rng = np.random.default_rng(0)
    layers = {f"transformer.h.{i}.mlp:input": rng.standard_normal((50, 4)).astype(np.float32) for i in range(3)}
    path = _h5(tmp_path / "a.h5", **layers, short=np.zeros((49, 4), np.float32), wide=np.zeros((50, 5), np.float32))
    array = H5Array(path, ",".join(layers))
    assert (array.n_rows, array.d) == (50, 12) and array.attrs()["hook_name"] == ",".join(layers)
    expected = np.concatenate(list(layers.values()), axis=1)
    np.testing.assert_array_equal(array.read_slices([(3, 9), (20, 22)]).numpy(), expected[np.r_[3:9, 20:22]])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(array)).read(0, 50).numpy(), expected)
    keys = list(layers)
    for key, fragment in [(f"{keys[1]},{keys[0]}", "not in layer order"), (f"{keys[0]},{keys[0]}", "repeated"),
                          (f"{keys[0]},short", "49 rows"), (f"{keys[0]},wide", "equal widths"),
                          (f"{keys[0]},nope", "'nope' not found")]:
        with pytest.raises(DataError, match=fragment) as info:
            H5Array(path, key)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_a_held_array_reads_the_files_rows_from_one_read(tmp_path, monkeypatch, dtype):
    """`hold_in_memory`: the same float32 rows as the file path for any ranges (empty, repeated,
    out of order), from one whole-dataset read per process; the copy is not pickled; False reads
    the file again."""
    values = torch.from_numpy(np.random.default_rng(3).standard_normal((40, 5)).astype(np.float32))
    if dtype == "bfloat16":
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        path = tmp_path / "a.h5"
        write_datasets(path, {"acts": bits}, {}, {"acts": {"dtype": "bfloat16"}})
    else:
        path = _h5(tmp_path / "a.h5", acts=values.numpy().astype(dtype))
    slices = [(30, 34), (0, 2), (7, 7), (1, 3), (39, 40)]
    from_file = H5Array(path, "acts").read_slices(slices)
    array = H5Array(path, "acts")
    assert array.nbytes == 40 * 5 * (2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize)
    array.hold_in_memory()
    whole_reads = []
    monkeypatch.setattr(array, "_read_file", lambda s: pytest.fail("a held array read the file by ranges"))
    real_handle = array._handle
    monkeypatch.setattr(array, "_handle", lambda: whole_reads.append(1) or real_handle())
    for _ in range(3):
        out = array.read_slices(slices)
        assert out.dtype == torch.float32 and torch.equal(out, from_file)
    assert len(whole_reads) == 1
    assert array.read_slices([]).shape == (0, 5)
    with pytest.raises(IndexError):
        array.read(38, 41)
    monkeypatch.undo()
    clone = pickle.loads(pickle.dumps(array))
    assert clone.held and clone._rows is None and torch.equal(clone.read_slices(slices), from_file)
    array.hold_in_memory(False)
    assert array._rows is None and torch.equal(array.read_slices(slices), from_file)


def test_a_held_key_list_holds_every_layer(tmp_path):
    layers = {f"l.{i}": np.random.default_rng(i).standard_normal((20, 3)).astype(np.float32) for i in range(2)}
    array = H5Array(_h5(tmp_path / "a.h5", **layers), "l.0,l.1")
    assert array.nbytes == 2 * 20 * 3 * 4
    array.hold_in_memory()
    assert all(part.held for part in array.parts)
    expected = np.concatenate(list(layers.values()), axis=1)
    np.testing.assert_array_equal(array.read_slices([(5, 9), (0, 1)]).numpy(), expected[np.r_[5:9, 0:1]])
    assert all(part._rows is not None for part in array.parts)
