"""Dictionaries trained elsewhere through `dictlearn evaluate` and `dictlearn export`: the records
name their source and format, the hook comes from the folder or `--hook`, and an exported copy
loads back equal. The folders are tests/fixtures/peers/ (written by the libraries themselves)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import dictlearn
from dictlearn.cli import main
from dictlearn.data import write_synth_file
from dictlearn.evaluate import RECORD_KEYS, EvaluateOptions, evaluate

PEERS = Path(__file__).parent / "fixtures" / "peers"
FAST = EvaluateOptions(downstream=False, interpret=False, density_rows=0, device="cpu", input_key="acts")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic activation files of the fixtures' widths: an SAE's (d 16) and a transcoder's (16 -> 16)."""
    root = tmp_path_factory.mktemp("readers_evaluate")
    write_synth_file(root / "sae.h5", n_rows=2048, d=16, n_features=64, seed=0)
    write_synth_file(root / "transcoder.h5", n_rows=2048, d=16, n_features=64, d_out=16, seed=1)
    return {"sae": root / "sae.h5", "transcoder": root / "transcoder.h5"}


def _without_model(tmp_path: Path, fmt: str, name: str) -> Path:
    """A copy of a fixture whose cfg.json records no model (so evaluate splices nothing)."""
    copy = shutil.copytree(PEERS / fmt / name, tmp_path / name)
    cfg = json.loads((copy / "cfg.json").read_text())
    cfg["metadata"].pop("model_name")
    (copy / "cfg.json").write_text(json.dumps(cfg))
    return copy


def test_evaluate_records_the_source_and_format_of_every_format(data):
    folders = [PEERS / "saelens" / "topk", PEERS / "dictionary_learning" / "topk"]
    records = evaluate(folders, data["sae"], options=FAST)
    records += evaluate([PEERS / "sparsify" / "run"], data["sae"], options=dataclasses.replace(FAST, hookpoint="layers.1"))
    for record, folder, fmt in zip(records, [*folders, PEERS / "sparsify" / "run"],
                                   ("saelens", "dictionary_learning", "sparsify")):
        assert tuple(record) == RECORD_KEYS
        assert record["source"] == str(folder.resolve()) and record["format"] == fmt
        assert record["model_name"] == "EleutherAI/pythia-70m" and record["input_key"] == "acts"
        assert record["l0"] == pytest.approx(6.0)  # TopK: k latents on every row (k = 6 in each file)
        assert 0 < record["fvu"] < 50
    assert records[0]["hook_name"] == "gpt_neox.layers.1" and records[2]["hook_name"] is None


def test_an_outside_transcoder_is_evaluated_on_its_target(data):
    (record,) = evaluate([PEERS / "sparsify" / "transcoder"], data["transcoder"],
                         options=dataclasses.replace(FAST, target_key="target"))
    assert (record["format"], record["target_key"], record["d_out"]) == ("sparsify", "target", 16)
    assert record["l0"] == pytest.approx(6.0)


def test_the_cli_evaluates_an_outside_folder_and_asks_for_a_hook_it_cannot_find(data, tmp_path, capsys):
    folder = _without_model(tmp_path, "saelens", "jumprelu")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].pop("hook_name")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.jsonl"
    assert main(["evaluate", str(folder), "--data", str(data["sae"]), "--out", str(out), "--no-interpret",
                 "--density-rows", "0", "--device", "cpu"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["format"] == "saelens" and record["fvu"] > 0 and record["ce_loss_recovered"] is None
    # a model to splice into, but no hook in the folder, the file or the flags: one line, nothing loaded
    capsys.readouterr()
    code = main(["evaluate", str(folder), "--data", str(data["sae"]), "--model", "dictlearn/tiny-stdlib",
                 "--no-interpret", "--device", "cpu", "--out", str(tmp_path / "never.jsonl")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dictlearn: error:")]
    assert code == 2 and len(errors) == 1 and "--hook" in errors[0] and str(folder) in errors[0], err
    assert not (tmp_path / "never.jsonl").exists()


def test_the_cli_exports_an_outside_folder_in_dictlearns_layout(tmp_path, capsys):
    for fmt, name, extra in (("saelens", "topk_rescaled", []), ("sparsify", "run", ["--hookpoint", "layers.0"]),
                             ("dictionary_learning", "gated", [])):
        out = tmp_path / f"{fmt}_export"
        assert main(["export", str(PEERS / fmt / name), str(out), *extra]) == 0
        cfg = json.loads((out / "cfg.json").read_text())
        assert cfg["metadata"]["dictlearn"]["data"]["source_format"] == fmt
        assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m"
        x = torch.randn(8, 16)
        original = dictlearn.load(PEERS / fmt / name, hookpoint=extra[1] if extra else None)
        assert torch.equal(dictlearn.load(out).encode(x), original.encode(x))
        assert torch.equal(dictlearn.load(out)(x), original(x))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "saelens_export"), str(tmp_path / "again")]) == 2
    assert "already a dictlearn export" in capsys.readouterr().err


def test_inspect_reads_an_outside_folder_and_writes_nothing_into_it(data, tmp_path):
    folder = _without_model(tmp_path, "saelens", "topk")
    before = sorted(p.name for p in folder.iterdir())
    page = tmp_path / "topk.html"
    assert main(["inspect", str(folder), "--data", str(data["sae"]), "--input-key", "acts", "--cards", "4",
                 "--out", str(page)]) == 0
    assert page.stat().st_size > 0
    assert sorted(p.name for p in folder.iterdir()) == before  # no latent_statistics.safetensors in it
