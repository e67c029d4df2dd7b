"""`dictlearn.load` on a damaged export: a one-line `DataError` naming the file at fault."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dictlearn import TopKSAE, load
from dictlearn.errors import DataError
from dictlearn.export import CFG_NAME, WEIGHTS_NAME, export


@pytest.fixture
def folder(tmp_path):
    return export(TopKSAE(d_in=8, d_sae=16, k=2), tmp_path / "export", {"hook_name": "h"})


def _edit_cfg(folder, edit) -> None:
    cfg = json.loads((folder / CFG_NAME).read_text())
    edit(cfg)
    (folder / CFG_NAME).write_text(json.dumps(cfg))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("keep", [0, 5, 60, -4])  # bytes of the weights file left
def test_truncated_weights_name_the_file(folder, keep):
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    with pytest.raises(DataError) as error:
        load(folder)
    message = _one_line(error)
    assert str(weights) in message and "truncated" in message and "export it again" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"d_in": 8, "metadata": ', "not valid JSON"),  # cut short
        ("", "not valid JSON"),
        ("[1, 2]", "JSON list, not an object"),
        ('{"metadata": {"dictlearn": {"class_path": "dictlearn.dictionaries.topk.TopKSAE"}}}', "lacks class_path"),
    ],
)
def test_malformed_cfg_names_the_file(folder, text, expected):
    (folder / CFG_NAME).write_text(text)
    with pytest.raises(DataError) as error:
        load(folder)
    message = _one_line(error)
    assert str(folder / CFG_NAME) in message and expected in message


def test_cfg_that_is_not_utf8(folder):
    (folder / CFG_NAME).write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="not UTF-8"):
        load(folder)


def test_hyper_parameters_from_another_version(folder):
    _edit_cfg(folder, lambda cfg: cfg["metadata"]["dictlearn"]["hyper_parameters"].update(no_such_argument=1))
    with pytest.raises(DataError) as error:
        load(folder)
    message = _one_line(error)
    assert str(folder / CFG_NAME) in message and "no_such_argument" in message


def test_weights_of_the_wrong_shape_name_the_weights_file(folder):
    save_file({"W_enc": torch.zeros(8, 99)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(DataError) as error:
        load(folder)
    message = _one_line(error)
    assert str(folder / WEIGHTS_NAME) in message and "W_enc" in message


def test_an_intact_export_still_loads(folder):
    model = load(folder)
    assert (model.d_in, model.d_sae) == (8, 16) and not model.training
