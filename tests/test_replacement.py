"""The replacement model (dictlearn.replacement) against a float64 GPT-2 forward written here.

The reference re-implements the embedded model's forward in float64 numpy-style torch from its
weights (embeddings, pre-LN attention with a causal mask, the gelu_new MLP, the tied unembedding),
with every MLP output replaced by a ReLU transcoder computed here too, and computes the losses from
its own log-softmax. Exact cases: transcoders that are copies of the MLPs reproduce the clean loss
exactly; error terms from the clean run give the clean logits back.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from dictlearn import TopKSAE
from dictlearn.errors import ConfigError
from dictlearn.models.loading import load_model
from dictlearn.replacement import TranscoderSet, mlp_sites, reference, replaced, replacement_metrics

SEQ, BATCH = 20, 3


@pytest.fixture(scope="module")
def lm():
    return load_model(None)


@pytest.fixture(scope="module")
def batches(lm):
    """Two batches of byte windows of Python text, BOS first; position 0 special."""
    text = open(math.__file__ if math.__file__.endswith(".py") else torch.__file__, "rb").read()[:4000]
    out = []
    for b in range(2):
        rows = [[256] + list(text[(b * BATCH + r) * 60:(b * BATCH + r) * 60 + SEQ - 1]) for r in range(BATCH)]
        tokens = torch.tensor(rows)
        special = tokens == 256
        out.append((tokens, special))
    return out


class ReLUTranscoders(nn.Module):
    """Per-layer ReLU transcoders with random weights: y_i = ReLU(x_i W_enc + b_enc) W_dec + b_dec."""

    def __init__(self, n_layers: int, d: int = 128, d_sae: int = 48, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(n_layers, d, d_sae, generator=g) / math.sqrt(d))
        self.b_enc = nn.Parameter(torch.randn(n_layers, d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(n_layers, d_sae, d, generator=g) * 0.05)
        self.b_dec = nn.Parameter(torch.randn(n_layers, d, generator=g) * 0.05)

    def encode_layer(self, i: int, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_enc[i] + self.b_enc[i])

    def decode_layer(self, i: int, latents, inputs) -> Tensor:
        return latents[i] @ self.W_dec[i] + self.b_dec[i]


class MLPCopies(nn.Module):
    """'Transcoders' that are the MLPs themselves: latents = the input, output = MLP(input)."""

    def __init__(self, mlps):
        super().__init__()
        self.mlps = nn.ModuleList(mlps)

    def encode_layer(self, i, x):
        return x

    def decode_layer(self, i, latents, inputs):
        return self.mlps[i](latents[i])


# ----------------------------------------------------------------------------- the reference
def _ln(x: Tensor, module) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + module.eps) * module.weight.double() + module.bias.double()


def _gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@torch.no_grad()
def reference_logits(model, tokens: Tensor, special: Tensor, mlp_out=None) -> Tensor:
    """float64 logits [B, T, V] of the GPT-2 forward; mlp_out(layer, x [B, T, d]) -> [B, T, d]
    replaces each MLP output off the special positions (None: the MLP; "zero": 0)."""
    t, cfg = model.transformer, model.config
    w = lambda p: p.detach().double()  # noqa: E731
    B, T = tokens.shape
    h = w(t.wte.weight)[tokens] + w(t.wpe.weight)[:T]
    n_head, d = cfg.n_head, cfg.n_embd
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer, block in enumerate(t.h):
        a = _ln(h, block.ln_1)
        q, k, v = (a @ w(block.attn.c_attn.weight) + w(block.attn.c_attn.bias)).split(d, dim=-1)
        heads = lambda z: z.view(B, T, n_head, d // n_head).transpose(1, 2)  # noqa: E731
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // n_head)
        att = scores.masked_fill(~causal, -math.inf).softmax(-1) @ heads(v)
        h = h + att.transpose(1, 2).reshape(B, T, d) @ w(block.attn.c_proj.weight) + w(block.attn.c_proj.bias)
        x = _ln(h, block.ln_2)
        true = _gelu_new(x @ w(block.mlp.c_fc.weight) + w(block.mlp.c_fc.bias)) @ w(block.mlp.c_proj.weight) \
            + w(block.mlp.c_proj.bias)
        new = true if mlp_out is None else torch.zeros_like(true) if mlp_out == "zero" else mlp_out(layer, x)
        h = h + torch.where(special.unsqueeze(-1), true, new)
    return _ln(h, t.ln_f) @ w(t.wte.weight).T


def _losses(clean: Tensor, other: Tensor, tokens: Tensor, special: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(CE clean, CE other, KL(clean ‖ other)) per kept prediction, float64."""
    mask = ~special[:, :-1] & ~special[:, 1:]
    target = tokens[:, 1:][mask]
    lc, lo = clean[:, :-1][mask].log_softmax(-1), other[:, :-1][mask].log_softmax(-1)
    pick = lambda lp: -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return pick(lc), pick(lo), (lc.exp() * (lc - lo)).sum(-1)


def _relu_reference(tc: ReLUTranscoders):
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec))
    return lambda layer, x: torch.relu(x @ W_enc[layer] + b_enc[layer]) @ W_dec[layer] + b_dec[layer]


# ----------------------------------------------------------------------------- tests
def test_reference_forward_is_the_model(lm, batches):
    tokens, special = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(tokens).logits.double(), reference_logits(lm.model, tokens, special),
                                   rtol=1e-4, atol=1e-4)


def test_splice_of_every_mlp_matches_the_float64_reference(lm, batches):
    sites = mlp_sites(lm.model, [0, 1, 2, 3])
    tc = ReLUTranscoders(4)
    tokens, special = batches[0]
    with torch.no_grad(), replaced(lm.model, sites, tc, special):
        logits = lm.model(tokens, use_cache=False).logits
    expected = reference_logits(lm.model, tokens, special, _relu_reference(tc))
    assert (expected - reference_logits(lm.model, tokens, special)).abs().max() > 0.1  # the splice matters
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_replacement_metrics_match_the_float64_reference(lm, batches):
    sites = mlp_sites(lm.model, [0, 1, 2, 3])
    tc = ReLUTranscoders(4, seed=1)
    got = replacement_metrics(lm.model, sites, tc, batches)
    ref = _relu_reference(tc)
    ce_clean, ce_spliced, kl, ce_zero, alone = [], [], [], [], {i: ([], []) for i in range(4)}
    for tokens, special in batches:
        clean = reference_logits(lm.model, tokens, special)
        c, s, k = _losses(clean, reference_logits(lm.model, tokens, special, ref), tokens, special)
        ce_clean.append(c), ce_spliced.append(s), kl.append(k)
        ce_zero.append(_losses(clean, reference_logits(lm.model, tokens, special, "zero"), tokens, special)[1])
        for i in range(4):
            one = reference_logits(lm.model, tokens, special, lambda layer, x, i=i: ref(layer, x) if layer == i else
                                   _true_mlp(lm.model, layer, x))
            zero_i = reference_logits(lm.model, tokens, special, lambda layer, x, i=i: torch.zeros_like(x) if layer == i
                                      else _true_mlp(lm.model, layer, x))
            alone[i][0].append(_losses(clean, one, tokens, special))
            alone[i][1].append(_losses(clean, zero_i, tokens, special)[1])
    c, s, z, k = (torch.cat(v).mean() for v in (ce_clean, ce_spliced, ce_zero, kl))
    assert got["replacement_ce_clean"] == pytest.approx(float(c), rel=1e-5)
    assert got["replacement_ce_spliced"] == pytest.approx(float(s), rel=1e-5)
    assert got["replacement_ce_zero_ablation"] == pytest.approx(float(z), rel=1e-5)
    assert got["replacement_kl_div"] == pytest.approx(float(k), rel=1e-4, abs=1e-6)
    assert got["replacement_ce_loss_recovered"] == pytest.approx(float((z - s) / (z - c)), rel=1e-4, abs=1e-5)
    for i in range(4):
        s_i = torch.cat([run[1] for run in alone[i][0]]).mean()
        z_i = torch.cat(alone[i][1]).mean()
        layer = got["layers"][str(i)]
        assert layer["ce_loss_recovered"] == pytest.approx(float((z_i - s_i) / (z_i - c)), rel=1e-4, abs=1e-5)
        assert layer["kl_div"] == pytest.approx(float(torch.cat([run[2] for run in alone[i][0]]).mean()),
                                                rel=1e-4, abs=1e-6)
    # per-layer reconstruction on the clean run, L0 counted here
    for i in range(4):
        xs, ys = [], []
        for tokens, special in batches:
            x, y = _clean_mlp_pair(lm.model, tokens, i)
            keep = ~special.reshape(-1)
            xs.append(x.reshape(-1, 128)[keep]), ys.append(y.reshape(-1, 128)[keep])
        x, y = torch.cat(xs), torch.cat(ys)
        y_hat = ref(i, x)
        fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        l0 = (torch.relu(x @ tc.W_enc[i].double() + tc.b_enc[i].double()) > 0).sum(-1).double().mean()
        assert got["layers"][str(i)]["fvu"] == pytest.approx(float(fvu), rel=1e-4)
        assert got["layers"][str(i)]["l0"] == pytest.approx(float(l0), rel=1e-6)
    assert got["total_l0"] == pytest.approx(sum(got["layers"][str(i)]["l0"] for i in range(4)), rel=1e-12)


@torch.no_grad()
def _true_mlp(model, layer: int, x: Tensor) -> Tensor:
    mlp = model.transformer.h[layer].mlp
    w = lambda p: p.detach().double()  # noqa: E731
    return _gelu_new(x @ w(mlp.c_fc.weight) + w(mlp.c_fc.bias)) @ w(mlp.c_proj.weight) + w(mlp.c_proj.bias)


def _clean_mlp_pair(model, tokens: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """The float64 reference's MLP input and output of `layer` on a clean forward."""
    seen = {}

    def record(i, x):
        if i == layer:
            seen["x"] = x
        return _true_mlp(model, i, x)

    reference_logits(model, tokens, torch.zeros_like(tokens, dtype=torch.bool), record)
    return seen["x"], _true_mlp(model, layer, seen["x"])


def test_mlp_copies_reproduce_the_clean_loss_exactly(lm, batches):
    sites = mlp_sites(lm.model, [0, 1, 2, 3])
    copies = MLPCopies([copy.deepcopy(b.mlp) for b in lm.model.transformer.h])
    got = replacement_metrics(lm.model, sites, copies, batches)
    assert got["replacement_ce_spliced"] == got["replacement_ce_clean"]
    assert got["replacement_kl_div"] == 0.0 and got["replacement_ce_loss_recovered"] == 1.0
    for layer in got["layers"].values():
        assert layer["fvu"] == 0.0 and layer["kl_div"] == 0.0 and layer["ce_loss_recovered"] == 1.0


@pytest.mark.parametrize("keep_acts", [True, False])
def test_a_shared_reference_gives_the_same_record(lm, batches, monkeypatch, keep_acts):
    """compare --replace makes the clean and ablated runs once for every replacement: the records
    are those of each replacement measured alone, with the clean activations kept or captured again."""
    import dictlearn.replacement as replacement

    sites = mlp_sites(lm.model, [0, 1, 2, 3])
    alone = [replacement_metrics(lm.model, sites, ReLUTranscoders(4, seed=s), batches, per_layer=s == 3) for s in (3, 4)]
    monkeypatch.setattr(replacement, "KEEP_ACTS_BYTES", replacement.KEEP_ACTS_BYTES if keep_acts else 0)
    ref = reference(lm.model, sites, batches)
    assert (ref.acts is not None) == keep_acts
    shared = [replacement_metrics(lm.model, sites, ReLUTranscoders(4, seed=s), batches, per_layer=s == 3, ref=ref)
              for s in (3, 4)]
    assert shared == alone and alone[0] != alone[1]


def test_error_terms_give_the_clean_model_back(lm, batches):
    sites = mlp_sites(lm.model, [0, 1, 2, 3])
    tc = ReLUTranscoders(4, seed=2)
    tokens, special = batches[1]
    record: dict = {}
    with torch.no_grad():
        clean = lm.model(tokens).logits
        with replaced(lm.model, sites, tc, special, only=[], record=record):  # nothing replaced: clean inputs
            torch.testing.assert_close(lm.model(tokens).logits, clean, rtol=0, atol=0)
        from dictlearn.models.hooks import capture

        with capture(lm.model, [s.write for s in sites]) as acts:
            lm.model(tokens)
        errors = [acts[s.write] - out.reshape(acts[s.write].shape) for s, out in zip(sites, record["outputs"])]
        with replaced(lm.model, sites, tc, special, errors=errors):
            torch.testing.assert_close(lm.model(tokens).logits, clean, rtol=1e-5, atol=1e-5)


def test_a_set_of_topk_transcoders_is_each_dictionary_per_layer(lm, batches):
    """TranscoderSet decodes layer i from layer i's latents only: the splice equals splicing
    each real TopK transcoder's own forward (written here as an MLPCopies-like replacement)."""
    torch.manual_seed(0)
    dicts = [TopKSAE(d_in=128, d_sae=64, k=4, transcoder=True) for _ in range(2)]
    sites = mlp_sites(lm.model, [1, 3])
    tokens, special = batches[0]

    class Forwards(nn.Module):
        def encode_layer(self, i, x):
            return x

        def decode_layer(self, i, latents, inputs):
            return dicts[i](latents[i])

    with torch.no_grad():
        with replaced(lm.model, sites, TranscoderSet(dicts), special):
            got = lm.model(tokens).logits
        with replaced(lm.model, sites, Forwards(), special):
            expected = lm.model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    result = replacement_metrics(lm.model, sites, TranscoderSet(dicts), batches, per_layer=False)
    assert set(result["layers"]) == {"1", "3"} and 0 < result["layers"]["1"]["l0"] <= 4
    assert result["total_l0"] == pytest.approx(result["layers"]["1"]["l0"] + result["layers"]["3"]["l0"])


def test_sites_out_of_order_are_one_line(lm):
    with pytest.raises(ConfigError, match="increasing order"):
        mlp_sites(lm.model, [2, 1])
    with pytest.raises(ConfigError, match="no module"):
        mlp_sites(lm.model, [4])


def test_a_crosslayer_transcoder_splice_matches_the_float64_reference(lm, batches):
    """A CLT spliced into all 4 MLPs: layer ℓ' writes Σ_{ℓ ≤ ℓ'} a_ℓ W_dec^{ℓ→ℓ'} + b_dec^{ℓ'},
    a_ℓ from layer ℓ's input in the *replaced* forward — computed here from the reference's own
    MLP inputs, block by block."""
    from dictlearn.dictionaries import CrossLayerTopK

    n, d, m, k = 4, 128, 16, 3
    torch.manual_seed(0)
    clt = CrossLayerTopK(n_layers=n, d_in=n * d, d_sae=n * m, k=k)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.5)
        clt.b_dec.normal_(0, 0.05)
        clt.W_dec.mul_(0.3)  # rows of norm 0.3: reported latents are 0.3 x the training ones
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (clt.W_enc, clt.b_enc, clt.W_dec, clt.b_dec))

    def clt_out(cross: bool):
        seen: list[Tensor] = []

        def out(layer: int, x: Tensor) -> Tensor:
            x2 = x.reshape(-1, d)
            pre = x2 @ W_enc[layer * d:(layer + 1) * d, layer * m:(layer + 1) * m] + b_enc[layer * m:(layer + 1) * m]
            keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(k, dim=1).indices, True)
            seen.append(torch.where(keep, pre.relu(), 0.0))
            sources = range(layer + 1) if cross else [layer]
            y = b_dec[layer * d:(layer + 1) * d] + sum(
                seen[src] @ W_dec[src * m:(src + 1) * m, layer * d:(layer + 1) * d] for src in sources)
            return y.reshape(x.shape)

        return out

    tokens, special = batches[0]
    expected = reference_logits(lm.model, tokens, special, clt_out(cross=True))
    with torch.no_grad(), replaced(lm.model, mlp_sites(lm.model, range(n)), clt, special):
        got = lm.model(tokens, use_cache=False).logits
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    own_layer_only = reference_logits(lm.model, tokens, special, clt_out(cross=False))
    assert (own_layer_only - expected).abs().max() > 1e-2  # the cross-layer terms matter here
