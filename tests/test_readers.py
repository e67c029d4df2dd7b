"""Dictionaries trained elsewhere: `dictlearn.load` on SAELens, sparsify and dictionary_learning
folders gives the library's own encode/decode/forward.

The fixtures (tests/fixtures/peers/) were built, saved and run by the libraries themselves
(tests/fixtures/make_peer_dictionaries.py, in the bench venv); the references are the outputs
of each library's own reloaded object on the committed input. The peers are not installed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dictlearn
from dictlearn.dictionaries.readers import detect, read
from dictlearn.errors import DataError
from dictlearn.export import export, load_with_config

PEERS = Path(__file__).parent / "fixtures" / "peers"
RTOL = 1e-5

#: (format, fixture name, the dictlearn class it loads as)
FIXTURES = [
    ("saelens", "standard", "OutsideReLUSAE"), ("saelens", "standard_no_b_dec", "OutsideReLUSAE"),
    ("saelens", "standard_normalized", "OutsideReLUSAE"), ("saelens", "gated", "OutsideGatedSAE"),
    ("saelens", "jumprelu", "OutsideJumpReLUSAE"), ("saelens", "topk", "OutsideTopKSAE"),
    ("saelens", "topk_rescaled", "OutsideTopKSAE"), ("saelens", "batchtopk", "OutsideJumpReLUSAE"),
    ("saelens", "matryoshka", "OutsideJumpReLUSAE"), ("saelens", "transcoder", "OutsideReLUSAE"),
    ("saelens", "skip_transcoder", "OutsideReLUSAE"), ("saelens", "jumprelu_transcoder", "OutsideJumpReLUSAE"),
    ("saelens", "jumprelu_skip_transcoder", "OutsideJumpReLUSAE"),
    ("sparsify", "run_layers.0", "OutsideTopKSAE"), ("sparsify", "run_layers.1", "OutsideTopKSAE"),
    ("sparsify", "transcoder", "OutsideTopKSAE"), ("sparsify", "skip_transcoder", "OutsideTopKSAE"),
    ("dictionary_learning", "standard", "OutsideReLUSAE"), ("dictionary_learning", "standard_april", "OutsideReLUSAE"),
    ("dictionary_learning", "topk", "OutsideTopKSAE"),
    ("dictionary_learning", "batchtopk", "OutsideBatchTopKSAE"),
    ("dictionary_learning", "matryoshka", "OutsideMatryoshkaSAE"),
    ("dictionary_learning", "jumprelu", "OutsideJumpReLUSAE"), ("dictionary_learning", "gated", "OutsideGatedSAE"),
]  # fmt: skip


def fixture(fmt: str, name: str) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, load keywords, reference {x, z, y}) of one committed fixture."""
    reference = load_file(str(PEERS / fmt / f"{name}.reference.safetensors"))
    if name.startswith("run_"):  # one hookpoint of a sparsify run folder
        return PEERS / fmt / "run", {"hookpoint": name[len("run_"):]}, reference
    return PEERS / fmt / name, {}, reference


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (elementwise over the whole tensor)."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def outputs(dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encode, decode of it, forward) on raw x."""
    z = dictionary.encode(x)
    return z, dictionary.decode(z, x), dictionary(x)


def matches(dictionary, reference: dict) -> bool:
    z, y, forward = outputs(dictionary, reference["x"])
    return max(relative_error(z, reference["z"]), relative_error(y, reference["y"]),
               relative_error(forward, reference["y"])) <= RTOL


# ------------------------------------------------------------------ each library's own outputs
@pytest.mark.parametrize(("fmt", "name", "cls"), FIXTURES, ids=[f"{f}-{n}" for f, n, _ in FIXTURES])
def test_a_dictionary_trained_elsewhere_gives_its_librarys_outputs(fmt, name, cls):
    folder, keywords, reference = fixture(fmt, name)
    dictionary = dictlearn.load(folder, **keywords)
    assert type(dictionary).__name__ == cls and not dictionary.training
    z, y, forward = outputs(dictionary, reference["x"])
    assert relative_error(z, reference["z"]) <= RTOL
    assert relative_error(y, reference["y"]) <= RTOL
    assert relative_error(forward, reference["y"]) <= RTOL
    assert (reference["z"] != 0).any(1).all() and (reference["z"] == 0).any()  # some latents fire, not all
    assert detect(folder) == fmt and dictlearn.load(folder, format=fmt, **keywords).d_sae == dictionary.d_sae


def test_what_the_folders_record_becomes_the_dictionarys_model_and_hook():
    _, cfg = load_with_config(PEERS / "saelens" / "standard")
    assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m"
    assert cfg["metadata"]["hook_name"] == "gpt_neox.layers.1"
    assert (cfg["format"], Path(cfg["source"]).name) == ("saelens", "standard")
    _, cfg = load_with_config(PEERS / "saelens" / "transcoder")
    assert cfg["metadata"]["hook_name_out"] == "gpt_neox.layers.1.mlp:output"
    dictionary, cfg = load_with_config(PEERS / "sparsify" / "run", hookpoint="layers.1")
    assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m" and "hook_name" not in cfg["metadata"]
    assert cfg["metadata"]["dictlearn"]["data"]["sparsify_hookpoint"] == "layers.1"
    assert cfg["metadata"]["dictlearn"]["data"]["source_architecture"] == "topk_sae"
    assert dictionary.k == 6
    _, cfg = load_with_config(PEERS / "dictionary_learning" / "matryoshka")
    assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m" and cfg["format"] == "dictionary_learning"
    assert cfg["metadata"]["dictlearn"]["data"]["source_architecture"] == "MatryoshkaBatchTopKSAE"
    assert cfg["architecture"] == "jumprelu"  # the name of its dictlearn export (SAELens layout)
    _, cfg = load_with_config(PEERS / "saelens" / "jumprelu_skip_transcoder")
    assert cfg["metadata"]["dictlearn"]["data"]["source_architecture"] == "jumprelu_skip_transcoder"


def test_the_committed_fixtures_stay_small():
    assert sum(p.stat().st_size for p in PEERS.rglob("*") if p.is_file()) < 1_000_000


def test_a_dictionary_learning_weights_file_reads_as_its_folder():
    folder, _, reference = fixture("dictionary_learning", "batchtopk")
    assert matches(dictlearn.load(folder / "ae.pt"), reference)


def test_settings_read_from_the_files():
    assert dictlearn.load(PEERS / "saelens" / "standard").apply_b_dec_to_input
    assert not dictlearn.load(PEERS / "saelens" / "standard_no_b_dec").apply_b_dec_to_input
    skip = dictlearn.load(PEERS / "saelens" / "skip_transcoder")
    assert skip.transcoder and skip.W_skip is not None and (skip.d_in, skip.d_out) == (16, 12)
    matryoshka = dictlearn.load(PEERS / "dictionary_learning" / "matryoshka")
    assert matryoshka.prefix_widths == (8, 16, 32, 64) and matryoshka.k == 6
    threshold = dictlearn.load(PEERS / "dictionary_learning" / "batchtopk").threshold
    assert torch.all(threshold == torch.tensor(0.9).double())  # its float32 scalar, one per latent


# ------------------------------------------------------------------ a wrong reading would fail
def test_a_transposed_encoder_would_not_match():
    """sparsify stores the encoder [d_sae, d_in]; its bytes read as SAELens' [d_in, d_sae] fail."""
    folder, keywords, reference = fixture("sparsify", "run_layers.0")
    dictionary = dictlearn.load(folder, **keywords)
    raw = load_file(str(folder / "layers.0" / "sae.safetensors"))["encoder.weight"]
    with torch.no_grad():
        dictionary.W_enc.copy_(raw.reshape(dictionary.d_in, dictionary.d_sae))
    assert not matches(dictionary, reference)


def test_an_ignored_threshold_would_not_match():
    for fmt, name in (("saelens", "jumprelu"), ("dictionary_learning", "jumprelu"), ("saelens", "batchtopk")):
        folder, _, reference = fixture(fmt, name)
        dictionary = dictlearn.load(folder)
        with torch.no_grad():
            dictionary.stored_threshold.zero_()
        assert not matches(dictionary, reference), name
    folder, _, reference = fixture("dictionary_learning", "batchtopk")
    dictionary = dictlearn.load(folder)
    with torch.no_grad():
        dictionary.threshold.zero_()
    assert not matches(dictionary, reference)


def test_a_missed_normalisation_scale_or_decoder_norm_would_not_match(tmp_path):
    # SAELens' activation_scaler.json: without its factor the same weights give other outputs
    folder, _, reference = fixture("saelens", "standard_normalized")
    scaler = json.loads((folder / "activation_scaler.json").read_text())
    assert scaler["scaling_factor"] == pytest.approx(0.37)
    copy = shutil.copytree(folder, tmp_path / "no_scaler")
    (copy / "activation_scaler.json").unlink()
    assert not matches(dictlearn.load(copy), reference)
    # rescale_acts_by_decoder_norm ignored: TopK ranks other latents
    folder, _, reference = fixture("saelens", "topk_rescaled")
    copy = shutil.copytree(folder, tmp_path / "no_rescale")
    cfg = json.loads((copy / "cfg.json").read_text())
    (copy / "cfg.json").write_text(json.dumps(cfg | {"rescale_acts_by_decoder_norm": False}))
    unscaled = dictlearn.load(copy)
    assert not matches(unscaled, reference)
    assert not torch.equal(unscaled.encode(reference["x"]) != 0, reference["z"] != 0)  # other latents fire


def test_dictionary_learning_autoencoder_latents_follow_its_loader():
    """AutoEncoder.from_pretrained folds the decoder norms (latent × ‖d_i‖): the fixture's z are
    those, and the raw file's activations (unequal norms) differ while the output does not."""
    folder, _, reference = fixture("dictionary_learning", "standard")
    state = torch.load(folder / "ae.pt", weights_only=True)
    x = reference["x"]
    raw_z = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    norms = state["decoder.weight"].norm(dim=0)
    assert relative_error(raw_z, reference["z"]) > 1e-2
    assert relative_error(raw_z * norms, reference["z"]) <= RTOL
    assert relative_error(raw_z @ state["decoder.weight"].T + state["bias"], reference["y"]) <= RTOL


# ------------------------------------------------------------------ one-line errors
def _copy(tmp_path: Path, fmt: str, name: str) -> Path:
    return shutil.copytree(PEERS / fmt / name, tmp_path / name)


def test_an_unknown_architecture_names_the_file_and_the_field(tmp_path):
    copy = _copy(tmp_path, "saelens", "standard")
    cfg = json.loads((copy / "cfg.json").read_text())
    (copy / "cfg.json").write_text(json.dumps(cfg | {"architecture": "temporal"}))
    with pytest.raises(DataError, match=r"cfg\.json: field 'architecture' is 'temporal'") as error:
        dictlearn.load(copy)
    assert "\n" not in str(error.value)
    (copy / "cfg.json").write_text(json.dumps(cfg | {"architecture": "batchtopk"}))
    with pytest.raises(DataError, match=r"a training checkpoint: save it with SAELens' save_inference_model"):
        dictlearn.load(copy)
    copy = _copy(tmp_path, "dictionary_learning", "topk")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "AutoEncoderNeo"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"config\.json: field 'trainer.dict_class' is 'AutoEncoderNeo'"):
        dictlearn.load(copy)


def test_a_wrong_shape_names_the_file_and_the_tensor(tmp_path):
    copy = _copy(tmp_path, "saelens", "topk")
    tensors = load_file(str(copy / "sae_weights.safetensors"))
    save_file({**tensors, "W_enc": tensors["W_enc"].T.contiguous()}, str(copy / "sae_weights.safetensors"))
    with pytest.raises(DataError, match=r"sae_weights\.safetensors: tensor 'W_enc' has shape \(64, 16\), "
                                        r"expected \(16, 64\)"):
        dictlearn.load(copy)
    copy = _copy(tmp_path, "saelens", "jumprelu")
    tensors = load_file(str(copy / "sae_weights.safetensors"))
    del tensors["threshold"]
    save_file(tensors, str(copy / "sae_weights.safetensors"))
    with pytest.raises(DataError, match=r"sae_weights\.safetensors: no tensor 'threshold'"):
        dictlearn.load(copy)


def test_a_missing_file_or_field_is_named(tmp_path):
    copy = _copy(tmp_path, "dictionary_learning", "gated")
    (copy / "config.json").unlink()
    with pytest.raises(DataError, match=r"config\.json: missing"):
        dictlearn.load(copy)
    copy = _copy(tmp_path, "saelens", "topk_rescaled")
    cfg = json.loads((copy / "cfg.json").read_text())
    del cfg["k"]
    (copy / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"cfg\.json: no field 'k'"):
        dictlearn.load(copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a dictionary folder"):
        dictlearn.load(tmp_path / "empty")
    with pytest.raises(DataError, match=r"format='orbax'"):
        dictlearn.load(PEERS / "saelens" / "topk", format="orbax")


def test_a_sparsify_run_with_several_hookpoints_asks_for_one():
    with pytest.raises(DataError, match=r"2 hookpoints; pick one with hookpoint= \(--hookpoint\): layers.0, layers.1"):
        dictlearn.load(PEERS / "sparsify" / "run")
    with pytest.raises(DataError, match=r"no hookpoint 'layers.7'; it holds layers.0, layers.1"):
        dictlearn.load(PEERS / "sparsify" / "run", hookpoint="layers.7")
    with pytest.raises(DataError, match=r"only sparsify run folders"):
        read(PEERS / "saelens" / "topk", hookpoint="layers.0")
    for folder in (PEERS / "saelens" / "topk", PEERS / "dictionary_learning" / "topk"):
        with pytest.raises(DataError, match=r"only sparsify run folders and circuit-tracer sets hold several hookpoints"):
            dictlearn.load(folder, hookpoint="layers.0")


# ------------------------------------------------------------------ dictlearn's export of them
@pytest.mark.parametrize(("fmt", "name"), [("saelens", "topk_rescaled"), ("saelens", "skip_transcoder"),
                                           ("sparsify", "run_layers.1"), ("dictionary_learning", "matryoshka"),
                                           ("dictionary_learning", "jumprelu"), ("saelens", "gated")])
def test_an_outside_dictionary_exported_by_dictlearn_loads_back_equal(tmp_path, fmt, name):
    folder, keywords, reference = fixture(fmt, name)
    dictionary, cfg = load_with_config(folder, **keywords)
    out = export(dictionary, tmp_path / "export", cfg["metadata"]["dictlearn"]["data"])
    assert detect(out) == "dictlearn"
    again, again_cfg = load_with_config(out)
    assert type(again) is type(dictionary)
    for got, want in zip(outputs(again, reference["x"]), outputs(dictionary, reference["x"])):
        assert torch.equal(got, want)
    assert matches(again, reference)
    assert again_cfg["metadata"]["dictlearn"]["decoder_rows_unit_norm"] is False
    assert again_cfg["metadata"]["dictlearn"]["data"]["source_format"] == fmt


@pytest.mark.parametrize(("fmt", "name", "cls"), FIXTURES, ids=[f"{f}-{n}" for f, n, _ in FIXTURES])
def test_its_dictlearn_export_means_the_same_to_saelens(tmp_path, fmt, name, cls):
    """The export of any outside dictionary, read as SAELens reads cfg.json and the safetensors
    (tests/saelens_reference.py, no dictlearn code), gives the original library's outputs."""
    from saelens_reference import sae_lens_forward

    folder, keywords, reference = fixture(fmt, name)
    dictionary, cfg = load_with_config(folder, **keywords)
    out = export(dictionary, tmp_path / "export", cfg["metadata"]["dictlearn"]["data"])
    z, y = sae_lens_forward(out, reference["x"])
    assert relative_error(z, reference["z"]) <= RTOL and relative_error(y, reference["y"]) <= RTOL
