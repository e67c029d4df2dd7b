"""Steering (`dictlearn steer`): the clamp against the formula x' = x + (c − f)·d in float64, a clamp
to the latent's own value changing nothing (SAE and transcoder), a positive scale raising the
log-probability of the latent's top promoted byte on the embedded model, the effect numbers
against a reference, and bad input as one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from dictlearn.cli import main
from dictlearn.downstream import SpliceSite, run_replaced
from dictlearn.export import export, load
from dictlearn.interpret.directions import decoder_direction, top_tokens, unembedding
from dictlearn.interpret.steer import _effect, clamp_replacement, constant, steer, steer_export
from dictlearn.models.loading import load_model
from dictlearn.models.tiny import TINY_NAME
from test_dashboard import HOOK, embedded, random_topk  # noqa: F401  (embedded: a fixture)

MLP_IN, MLP_OUT = "transformer.h.2.mlp:input", "transformer.h.2.mlp"


@pytest.fixture(scope="module")
def lm():
    return load_model()


def _tokens(lm, text: str = "def main(argv):\n    return 0\n") -> torch.Tensor:
    return torch.tensor([[lm.tokenizer.bos_token_id] + lm.tokenizer.encode(text)])


def test_clamp_is_the_error_kept_reconstruction_with_one_latent_replaced():
    """x' = decode(z with z_l := c) + (x − decode(z)), checked in float64 for an SAE with a scale
    that is not folded (a checkpoint-like dictionary): the direction is decode(e_l) − decode(0)."""
    sae = random_topk(12, 40, 5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) + 0.5)  # rows off unit norm
        sae.input_scale.fill_(1.7)
        sae.target_scale.fill_(1.7)
    x = torch.randn(30, 12)
    latent, c = 3, 2.5
    new = clamp_replacement(sae, latent, constant(c))(x, x)
    s64 = sae.double()
    z = s64.encode(x.double())
    z_clamped = z.clone()
    z_clamped[:, latent] = c
    reference = s64.decode(z_clamped) + (x.double() - s64.decode(z))
    assert torch.allclose(new.double(), reference, atol=1e-5)


@pytest.mark.parametrize("mapping", ["sae", "transcoder", "skip_transcoder"])
def test_clamping_to_the_current_value_changes_nothing(lm, mapping):
    torch.manual_seed(0)
    dictionary = random_topk(128, 64, 8)
    if mapping != "sae":
        from dictlearn import TopKSAE

        skip = mapping == "skip_transcoder"
        dictionary = TopKSAE(d_in=128, d_sae=64, k=8, transcoder=True, skip_connection=skip).requires_grad_(False)
        if skip:
            dictionary.W_skip.normal_(0, 0.05)  # a skip term that the clamp must leave alone
        dictionary.eval()
        site = SpliceSite(MLP_OUT, read=MLP_IN)
    else:
        site = SpliceSite(HOOK)
    tokens = _tokens(lm)
    keep = tokens == lm.tokenizer.bos_token_id
    with torch.no_grad():
        clean = lm.model(tokens, use_cache=False).logits
        same = run_replaced(lm.model, tokens, site, clamp_replacement(dictionary, 5, lambda f: f), keep)
        moved = run_replaced(lm.model, tokens, site, clamp_replacement(dictionary, 5, constant(20.0)), keep)
    assert torch.equal(same, clean)
    assert (moved - clean).abs().max() > 1e-2  # and the same path does change them otherwise
    assert torch.equal(moved[:, 0], clean[:, 0])  # BOS is never steered


def test_positive_scale_raises_the_top_promoted_byte(lm):
    """Latent 0 of a random SAE at the middle block, clamped to 40 (about 3× the residual's norm):
    the mean log-probability of the byte its decoder row promotes most rises."""
    sae = random_topk(128, 32, 4, seed=3)
    site = SpliceSite(HOOK)
    promoted = top_tokens(unembedding(lm.model).lens(decoder_direction(sae, 0))[0], 1,
                          allowed=torch.arange(257) < 256)[0][0][0]
    up = steer(sae, lm, site, 0, 10.0, "import os\n", max_activation=4.0, tokens=8)
    assert up.value == 40.0
    delta_up = dict(up.promoted)[lm.tokenizer.decode([promoted])]
    assert delta_up > 1.0, up.promoted
    assert up.kl > 0.1


def test_effect_numbers_equal_a_reference():
    g = torch.Generator().manual_seed(4)
    clean, steered = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    at = torch.tensor([False, True, True, True, False, True])
    kl, deltas, mass, n = _effect(clean, steered, at, [2, 7])
    lc, ls = clean[at].double().log_softmax(-1), steered[at].double().log_softmax(-1)
    pc = lc.exp()
    assert n == 4 and abs(kl - float((pc * (lc - ls)).sum(-1).mean())) < 1e-12
    assert abs(deltas[1][1] - float((ls[:, 7] - lc[:, 7]).mean())) < 1e-12
    both = lambda l: torch.log(l[:, 2].exp() + l[:, 7].exp())
    assert abs(mass - float((both(ls) - both(lc)).mean())) < 1e-12


@pytest.mark.slow
def test_steer_command_prints_both_continuations(embedded, capsys):
    export_dir, data = embedded
    code = main(["steer", str(export_dir), "--feature", "1", "--scale", "8", "--prompt", "class A:\n", "--tokens",
                 "12", "--data", str(data), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["feature"] == 1 and out["positions"] >= 12
    assert out["value"] == pytest.approx(8 * out["max_activation"]) and "measured now" in out["max_source"]
    # the maximum is the brute-force maximum over the file's rows
    import h5py

    with h5py.File(data) as f:
        z = load(export_dir).encode(torch.from_numpy(f[HOOK][:]))
    assert out["max_activation"] == pytest.approx(float(z[:, 1].max()), rel=1e-6)
    result = steer_export(export_dir, 1, 8.0, "class A:\n", tokens=12, data=str(data))
    text = result.side_by_side(30)
    assert "clean" in text and "steered" in text and "KL(clean ‖ steered)" in text


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(embedded, tmp_path, capsys):
    export_dir, data = embedded

    def run(*args: str) -> tuple[int, str]:
        code = main(["steer", args[0], "--prompt", "x = ", "--scale", "5", "--tokens", "4", *args[1:]])
        return code, capsys.readouterr().err.strip()

    code, err = run(str(export_dir), "--feature", "64", "--data", str(data))
    assert code == 2 and "--feature 64" in err and "0..63" in err and len(err.splitlines()) == 1
    narrow = export(random_topk(16, 32, 4), tmp_path / "narrow", {"model_name": TINY_NAME, "hook_name": HOOK})
    code, err = run(str(narrow), "--feature", "1", "--data", str(data))
    assert code == 2 and "width 128" in err and "d_in=16" in err and len(err.splitlines()) == 1
    from transformers import GPT2LMHeadModel

    from dictlearn.models.tiny import tiny_config

    GPT2LMHeadModel(tiny_config(n_layer=1)).save_pretrained(tmp_path / "one_layer")
    capsys.readouterr()
    code, err = run(str(export_dir), "--feature", "1", "--data", str(data), "--model", str(tmp_path / "one_layer"))
    assert code == 2 and "transformer.h.2" in err and len(err.splitlines()) == 1
    code, err = run(str(export_dir), "--feature", "1", "--tokens", "0")
    assert code == 2 and "--tokens" in err


def test_transcoder_clamp_keeps_the_skip_and_the_error():
    """A skip transcoder: y' = decode(z with z_l := c, x) + (y − decode(z, x)), in float64."""
    from dictlearn import TopKSAE

    torch.manual_seed(1)
    tc = TopKSAE(d_in=10, d_sae=24, k=3, d_out=7, transcoder=True, skip_connection=True).requires_grad_(False).eval()
    tc.W_skip.normal_(0, 0.3)
    tc.b_dec.normal_(0, 0.3)
    x, y = torch.randn(15, 10), torch.randn(15, 7)
    new = clamp_replacement(tc, 4, constant(-1.5))(x, y)
    t64 = tc.double()
    z = t64.encode(x.double())
    z_clamped = z.clone()
    z_clamped[:, 4] = -1.5
    reference = t64.decode(z_clamped, x.double()) + (y.double() - t64.decode(z, x.double()))
    assert torch.allclose(new.double(), reference, atol=1e-5)
