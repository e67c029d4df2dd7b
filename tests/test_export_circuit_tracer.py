"""Export for circuit tracing (dictlearn.export_circuit) against circuit-tracer 0.5's forward,
written here in float64 from the files alone (transcoder/single_layer_transcoder.py and
cross_layer_transcoder.py: π = x W_encᵀ + b_enc, z = π · 1[π > θ] or ReLU(π), a set decodes
z W_dec + b_dec (+ x W_skipᵀ), a CLT Σ_{ℓ ≤ ℓ'} z_ℓ W_dec_ℓ[:, ℓ' − ℓ] + b_dec_ℓ'), and the
round trip through `dictlearn.load`. benchmarks/check_circuit_tracer.py runs circuit-tracer's own
loaders on the same folders (bench venv)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dictlearn
from conftest import assert_one_line_cli_error
from dictlearn import JumpReLUSAE, TopKSAE
from dictlearn.cli import main
from dictlearn.dictionaries import CrossLayerJumpReLU, CrossLayerTopK
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.readers.circuit_tracer import read_replacement
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.errors import ConfigError, DataError
from dictlearn.export import export
from dictlearn.export_circuit import export_circuit_tracer

NL, D, M = 3, 8, 6


def _randomised(model, seed: int = 0, theta: float = 0.3):
    """Random weights (a CLT's zero blocks kept), data scales away from 1 and decoder rows away
    from unit norm, so every folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.constrain_parameters()
        model.W_dec.mul_(torch.rand(model.W_dec.shape[0], 1, generator=g) + 0.5)
        if hasattr(model, "log_threshold"):
            model.log_threshold.copy_(torch.full_like(model.log_threshold, theta).log())
        if isinstance(model, BatchTopKSAE):
            model.threshold.fill_(theta)
        model.input_scale.fill_(2.0)
        model.target_scale.fill_(0.5)
    return model.eval()


def _x(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _act(pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    return pre.relu() if threshold is None else torch.where(pre > threshold, pre, 0.0)


def clt_reference(folder, x_layers):
    """circuit-tracer's CLT forward from the files, float64: (latents [n, M] per layer, outputs)."""
    enc = [load_file(str(folder / f"W_enc_{i}.safetensors")) for i in range(NL)]
    dec = [load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].double() for i in range(NL)]
    latents = []
    for i, f in enumerate(enc):
        pre = x_layers[i].double() @ f[f"W_enc_{i}"].double().T + f[f"b_enc_{i}"].double()
        latents.append(_act(pre, f[f"threshold_{i}"].double() if f"threshold_{i}" in f else None))
    outputs = [enc[j][f"b_dec_{j}"].double() + sum(latents[i] @ dec[i][:, j - i] for i in range(j + 1))
               for j in range(NL)]
    return latents, outputs


def test_a_jumprelu_clt_exports_in_circuit_tracers_layout_and_gives_our_numbers(tmp_path):
    clt = _randomised(CrossLayerJumpReLU(n_layers=NL, d_in=NL * D, d_sae=NL * M))
    out = export_circuit_tracer([clt], tmp_path / "clt", [{"model_name": "m", "hook_name": "h"}])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml"] + [f"W_{kind}_{i}.safetensors" for kind in ("enc", "dec") for i in range(NL)])
    cfg = json.loads((out / "config.yaml").read_text())
    assert (cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"], cfg["model_name"]) == (
        "cross_layer_transcoder", "ln2.hook_normalized", "hook_mlp_out", "m")
    for i in range(NL):
        shapes = {k: tuple(v.shape) for k, v in load_file(str(out / f"W_enc_{i}.safetensors")).items()}
        assert shapes == {f"W_enc_{i}": (M, D), f"b_enc_{i}": (M,), f"b_dec_{i}": (D,), f"threshold_{i}": (M,)}
        assert tuple(load_file(str(out / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].shape) == (M, NL - i, D)
    x = _x(64, NL * D) * 3
    xs = [x[:, i * D:(i + 1) * D] for i in range(NL)]
    latents, outputs = clt_reference(out, xs)
    ours = [clt.encode_layer(i, xs[i]) for i in range(NL)]
    assert all((a > 0).any() and (a == 0).any() for a in ours)  # thresholds bite both ways
    for i in range(NL):
        torch.testing.assert_close(ours[i].double(), latents[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clt.decode_layer(i, ours[: i + 1]).double(), outputs[i], rtol=1e-5, atol=1e-5)
    # the round trip: dictlearn.load reads the folder back, latents as circuit-tracer reports them
    back = dictlearn.load(out)
    assert back.source_format == "circuit_tracer" and isinstance(back, CrossLayerJumpReLU)
    torch.testing.assert_close(back.encode(x), clt.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back(x), clt(x), rtol=1e-5, atol=1e-5)
    # and exporting the read-back again writes the same files
    again = export_circuit_tracer(read_replacement(out), tmp_path / "again")
    for i in range(NL):
        for name in (f"W_enc_{i}", f"W_dec_{i}"):
            a, b = (load_file(str(f / f"{name}.safetensors")) for f in (out, again))
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def _transcoders(make, skip: bool = False):
    return [_randomised(make(d_in=D, d_sae=M, transcoder=True, skip_connection=skip), seed=i) for i in range(NL)]


@pytest.mark.parametrize(("make", "skip", "jump"), [
    (JumpReLUSAE, False, True), (JumpReLUSAE, True, True), (lambda **kw: BatchTopKSAE(k=2, **kw), False, True),
    (lambda **kw: ReLUL1SAE(apply_b_dec_to_input=False, **kw), True, False),
], ids=["jumprelu", "jumprelu-skip", "batchtopk", "relu-skip"])
def test_a_transcoder_set_exports_and_gives_our_numbers(tmp_path, make, skip, jump):
    models = _transcoders(make, skip)
    hooks = [{"hook_name": f"transformer.h.{i}.mlp.input"} for i in range(NL)]
    out = export_circuit_tracer(models, tmp_path / "set", hooks)
    assert json.loads((out / "config.yaml").read_text())["model_kind"] == "transcoder_set"
    x = _x(64, D) * 3
    for i, model in enumerate(models):
        f = {k: v.double() for k, v in load_file(str(out / f"layer_{i}.safetensors")).items()}
        assert ("activation_function.threshold" in f) == jump and ("W_skip" in f) == skip
        assert f["W_enc"].shape == (M, D) and f["W_dec"].shape == (M, D)
        z = _act(x.double() @ f["W_enc"].T + f["b_enc"], f.get("activation_function.threshold"))
        y = z @ f["W_dec"] + f["b_dec"] + (x.double() @ f["W_skip"].T if skip else 0)
        ours = model.encode(x)
        assert (ours > 0).any() and (ours == 0).any()
        torch.testing.assert_close(ours.double(), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).double(), y, rtol=1e-5, atol=1e-5)
        back = dictlearn.load(out, hookpoint=f"layer_{i}")
        torch.testing.assert_close(back.encode(x), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(read_replacement(out)) == NL
    with pytest.raises(DataError, match=r"a circuit-tracer set of 3 per-layer transcoders; name one"):
        dictlearn.load(out)


@pytest.mark.parametrize(("models", "words"), [
    (lambda: [TopKSAE(d_in=D, d_sae=M, k=2, transcoder=True)], "TopKSAE does not map to circuit-tracer 0.5"),
    (lambda: [CrossLayerTopK(n_layers=NL, d_in=NL * D, d_sae=NL * M, k=2)], "CrossLayerTopK does not map"),
    (lambda: [JumpReLUSAE(d_in=D, d_sae=M)], "is an SAE"),
    (lambda: [JumpReLUSAE(d_in=D, d_sae=M, d_out=D + 1, transcoder=True)], "reads width 8 and writes 9"),
    (lambda: [JumpReLUSAE(d_in=D, d_sae=M, transcoder=True), JumpReLUSAE(d_in=D, d_sae=M + 1, transcoder=True)],
     "one width for every layer"),
    (lambda: [JumpReLUSAE(d_in=D, d_sae=M, transcoder=True),
              JumpReLUSAE(d_in=D, d_sae=M, transcoder=True, skip_connection=True)], "skips on every layer or on none"),
    (lambda: [CrossLayerJumpReLU(n_layers=NL, d_in=NL * D, d_sae=NL * M)] * 2, "export it alone"),
], ids=["topk", "topk-clt", "sae", "widths", "set-widths", "set-skips", "two-clts"])
def test_what_circuit_tracer_cannot_hold_is_refused_in_one_line(tmp_path, models, words):
    with pytest.raises(ConfigError, match=words) as error:
        export_circuit_tracer(models(), tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_a_set_out_of_layer_order_is_refused(tmp_path):
    hooks = [{"hook_name": f"transformer.h.{i}.mlp.input"} for i in (1, 0, 2)]
    with pytest.raises(ConfigError, match=r"layers \[1, 0, 2\]; a circuit-tracer set needs layers 0 … 2"):
        export_circuit_tracer(_transcoders(JumpReLUSAE), tmp_path / "out", hooks)
    assert not (tmp_path / "out").exists()


def test_the_cli_writes_a_set_from_exports_and_refuses_topk_in_one_line(tmp_path, capsys):
    models = _transcoders(JumpReLUSAE)
    sources = [str(export(m, tmp_path / f"e{i}", {"hook_name": f"transformer.h.{i}.mlp.input"}))
               for i, m in enumerate(models)]
    assert main(["export", "--format", "circuit-tracer", *sources, str(tmp_path / "ct")]) == 0
    x = _x(16, D) * 3
    torch.testing.assert_close(dictlearn.load(tmp_path / "ct", hookpoint="2").encode(x), models[2].encode(x),
                               rtol=1e-5, atol=1e-5)
    # writing again over its own earlier output is allowed; a TopK source is refused, nothing written
    assert main(["export", "--format", "circuit-tracer", *sources, str(tmp_path / "ct")]) == 0
    capsys.readouterr()
    topk = str(export(TopKSAE(d_in=D, d_sae=M, k=2, transcoder=True), tmp_path / "topk"))
    assert_one_line_cli_error(main(["export", "--format", "circuit-tracer", topk, str(tmp_path / "no")]), capsys,
                              ["TopK", "circuit-tracer 0.5", "JumpReLU"], tmp_path / "no")
    assert_one_line_cli_error(main(["export", sources[0], sources[1], str(tmp_path / "no")]), capsys,
                              ["SOURCE: 2 given", "--format circuit-tracer"], tmp_path / "no")


def test_a_set_missing_a_layer_file_is_one_line(tmp_path):
    out = export_circuit_tracer(_transcoders(JumpReLUSAE), tmp_path / "set")
    (out / "layer_1.safetensors").unlink()
    with pytest.raises(DataError, match=r"missing layer 1"):
        dictlearn.load(out, hookpoint="layer_0")
    save_file({"b_enc": torch.zeros(M)}, str(out / "layer_1.safetensors"))
    with pytest.raises(DataError, match=r"layer_1.safetensors: no tensor 'b_enc' or 'b_dec'"):
        dictlearn.load(out, hookpoint="layer_1")


def test_the_cli_writes_a_set_from_the_members_of_one_sweep_checkpoint(tmp_path, capsys):
    """`--member a,b,c`: one sweep's checkpoint, its members taken in the order named (layer order)."""
    from dictlearn.training import DictionaryTraining
    from dictlearn.training.checkpoints import save_members

    models = _transcoders(JumpReLUSAE)
    module = DictionaryTraining({f"layer{i}": m for i, m in enumerate(models)})
    checkpoint = {"state_dict": module.state_dict()}
    save_members(module, checkpoint)
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    assert main(["export", "--format", "circuit-tracer", str(path), str(tmp_path / "ct"),
                 "--member", "layer0, layer1,layer2"]) == 0
    x = _x(16, D) * 3
    for i, model in enumerate(models):
        back = dictlearn.load(tmp_path / "ct", hookpoint=f"layer_{i}")
        torch.testing.assert_close(back.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)
    # members named out of layer order are written as named: layer_0 holds member layer2
    assert main(["export", "--format", "circuit-tracer", str(path), str(tmp_path / "swapped"),
                 "--member", "layer2,layer1,layer0"]) == 0
    torch.testing.assert_close(dictlearn.load(tmp_path / "swapped", hookpoint="layer_0").encode(x),
                               models[2].encode(x), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert_one_line_cli_error(main(["export", "--format", "circuit-tracer", str(path), str(path),
                                    str(tmp_path / "no"), "--member", "layer0,layer1"]), capsys,
                              ["--member with several names", "one sweep checkpoint"], tmp_path / "no")
    assert_one_line_cli_error(main(["export", "--format", "circuit-tracer", str(path), str(tmp_path / "no"),
                                    "--member", "layer0,nope"]), capsys, ["nope"], tmp_path / "no")
