"""Downstream (spliced) metrics against float64 references written here, and exact splicing cases.

References: CE and KL from a float64 log-softmax in numpy; spliced logits from a plain forward hook
written in this file (not dictlearn's hooks). Exact cases: an identity dictionary (ReLU(x) − ReLU(−x)
= x, built as a real ReLUL1SAE and sent through export + load) changes nothing; a dictionary whose
output is the constant 0 (or the mean) is the zero (or mean) ablation.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

import dictlearn
import dictlearn.metrics.downstream as downstream
from dictlearn import ReLUL1SAE, load
from dictlearn.downstream import SpliceSite, downstream_metrics, run_replaced, zero_replacement
from dictlearn.export import export
from dictlearn.metrics import METRIC_NAMES
from dictlearn.metrics.downstream import DOWNSTREAM_KEYS, DownstreamMetrics
from dictlearn.models.tiny import tiny_config

BOS, D, SEQ = 256, 32, 24


# ----------------------------------------------------------------------------- the metric
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(logits: list[np.ndarray], targets: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """logits: 4 × [..., V] float64 (clean, spliced, zero, mean), targets/mask [...]: the
    definitions of docs/evaluate.md, by hand."""
    lps = [_log_softmax(x)[mask] for x in logits]
    t = targets[mask]
    ce = [-lp[np.arange(len(t)), t].mean() for lp in lps]
    p_clean = np.exp(lps[0])
    kl = (p_clean * (lps[0] - lps[1])).sum(-1).mean()
    return {
        "ce_clean": ce[0], "ce_spliced": ce[1], "ce_zero_ablation": ce[2], "ce_mean_ablation": ce[3],
        "ce_loss_recovered": (ce[2] - ce[1]) / (ce[2] - ce[0]),
        "ce_loss_recovered_mean": (ce[3] - ce[1]) / (ce[3] - ce[0]),
        "kl_div": kl, "delta_ce": ce[1] - ce[0],
    }  # fmt: skip


def _random_case(seed: int = 0, shape=(6, 9), vocab: int = 13):
    g = torch.Generator().manual_seed(seed)
    clean = 2.0 * torch.randn(*shape, vocab, generator=g)
    # spliced close to clean, the ablations further off: a recovered fraction well inside (0, 1)
    logits = [clean] + [clean + s * torch.randn(*shape, vocab, generator=g) for s in (1.5, 3.0, 2.5)]
    targets = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    return logits, targets, mask


def test_keys_are_the_documented_names():
    assert set(DOWNSTREAM_KEYS) <= set(METRIC_NAMES)
    logits, targets, mask = _random_case()
    metric = DownstreamMetrics()
    metric.update(*logits, targets, mask)
    assert tuple(metric.compute()) == DOWNSTREAM_KEYS


@pytest.mark.parametrize("use_mask", [True, False])
def test_metric_matches_float64_reference(use_mask):
    logits, targets, mask = _random_case()
    metric = DownstreamMetrics()
    metric.update(*logits, targets, mask if use_mask else None)
    got = {k: v.item() for k, v in metric.compute().items()}
    want = reference([x.double().numpy() for x in logits], targets.numpy(), mask.numpy() if use_mask else
                     np.ones(targets.shape, dtype=bool))
    assert 0.1 < want["ce_loss_recovered"] < 0.99 and want["kl_div"] > 0.01  # a case that tells formulas apart
    for key in DOWNSTREAM_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert int(metric.n_tokens) == int(mask.sum() if use_mask else mask.numel())


def test_updates_accumulate_like_one_update_and_chunks_do_not_matter(monkeypatch):
    logits, targets, mask = _random_case(seed=1, shape=(10, 7))
    whole = DownstreamMetrics()
    whole.update(*logits, targets, mask)
    monkeypatch.setattr(downstream, "_CHUNK_ELEMENTS", 13 * 3)  # 3 predictions per log-softmax chunk
    parts = DownstreamMetrics()
    for rows in (slice(0, 1), slice(1, 6), slice(6, 10)):
        parts.update(*(x[rows] for x in logits), targets[rows], mask[rows])
    for key, value in whole.compute().items():
        assert parts.compute()[key].item() == pytest.approx(value.item(), rel=1e-12), key
    assert parts.sum_ce_clean.dtype == torch.float64


def test_tokens_the_clean_model_rules_out_add_no_kl():
    logits, targets, mask = _random_case(seed=2)
    logits[0][..., 0] = float("-inf")  # P_clean(token 0) = 0: 0 · log(0 / p) = 0
    targets = targets.clamp_min(1)  # the clean CE stays finite
    metric = DownstreamMetrics()
    metric.update(*logits, targets, mask)
    lp_clean = _log_softmax(logits[0].double().numpy()[..., 1:])[mask.numpy()]  # the other tokens
    lp_spliced = _log_softmax(logits[1].double().numpy())[..., 1:][mask.numpy()]
    want = (np.exp(lp_clean) * (lp_clean - lp_spliced)).sum(-1).mean()
    assert metric.compute()["kl_div"].item() == pytest.approx(want, rel=1e-9)


def test_shape_mismatch_is_an_error():
    logits, targets, mask = _random_case()
    with pytest.raises(ValueError, match="do not match"):
        DownstreamMetrics().update(logits[0], logits[1][:, :-1], logits[2], logits[3], targets, mask)


# ----------------------------------------------------------------------------- splicing
@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, n_embd=D, n_head=2, context=SEQ)
    config.initializer_range = 0.2  # larger than GPT-2's 0.02: ablations must move the loss visibly
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def batches():
    """Two batches of windows shaped like iter_windows': BOS at 0 and a document separator inside."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (3, 2):
        tokens = torch.randint(0, 256, (n, SEQ), generator=g)
        tokens[:, 0] = BOS
        tokens[0, 10] = BOS
        out.append((tokens, tokens == BOS))
    return out


def _identity_sae(scale_dec: float = 1.0, b_dec: torch.Tensor | None = None) -> ReLUL1SAE:
    """d_sae = 2 d: W_enc = [I, −I], W_dec = [I; −I]·scale_dec, zero biases: ReLU(x) − ReLU(−x) = x."""
    sae = ReLUL1SAE(d_in=D, d_sae=2 * D)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) * scale_dec)
        sae.b_dec.copy_(torch.zeros(D) if b_dec is None else b_dec)
    return sae.eval()


def _exported(sae, tmp_path, name: str):
    attrs = {"model_name": "random-gpt2", "hook_name": "transformer.h.0", "context_size": SEQ}
    return load(export(sae, tmp_path / name, attrs))


def _mean_activation(gpt2, batches, hook="transformer.h.0") -> torch.Tensor:
    with torch.no_grad():
        out = gpt2(batches[0][0], output_hidden_states=True)
    return out.hidden_states[1][~batches[0][1]].mean(0)  # block 0's output at non-BOS positions


def test_identity_dictionary_changes_nothing(gpt2, batches, tmp_path):
    identity = _exported(_identity_sae(), tmp_path, "identity")
    x = torch.randn(5, D)
    torch.testing.assert_close(identity(x), x, rtol=0, atol=1e-6)  # the export really is the identity
    metrics, n = downstream_metrics(gpt2, identity, SpliceSite("transformer.h.0"), batches,
                                    _mean_activation(gpt2, batches))
    assert n == sum(int((~s[:, :-1] & ~s[:, 1:]).sum()) for _, s in batches)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=1e-6)
    assert metrics["kl_div"] == pytest.approx(0.0, abs=1e-8)
    assert metrics["delta_ce"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ce_loss_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"] + 0.1  # the ablation does matter here


@pytest.mark.parametrize("constant", ["zero", "mean"])
def test_constant_dictionary_is_the_ablation(gpt2, batches, tmp_path, constant):
    mean = _mean_activation(gpt2, batches)
    b_dec = torch.zeros(D) if constant == "zero" else mean
    sae = _exported(_identity_sae(scale_dec=0.0, b_dec=b_dec), tmp_path, constant)  # W_dec = 0: output b_dec
    metrics, _ = downstream_metrics(gpt2, sae, SpliceSite("transformer.h.0"), batches, mean)
    ablation = metrics["ce_zero_ablation" if constant == "zero" else "ce_mean_ablation"]
    assert metrics["ce_spliced"] == pytest.approx(ablation, abs=1e-6)
    assert metrics["ce_zero_ablation"] != pytest.approx(metrics["ce_mean_ablation"], abs=1e-3)


def _hand_spliced_logits(gpt2, tokens, special, module, fn, read_module=None):
    """Reference: a raw forward hook replacing `module`'s output by fn(activation) at non-special positions."""
    stash = {}

    def read_hook(mod, args):
        stash["in"] = args[0]

    def write_hook(mod, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        source = stash["in"] if read_module is not None else hidden
        new = hidden.clone()
        new[~special] = fn(source[~special])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [module.register_forward_hook(write_hook)]
    if read_module is not None:
        handles.append(read_module.register_forward_pre_hook(read_hook))
    try:
        with torch.no_grad():
            return gpt2(tokens).logits
    finally:
        for h in handles:
            h.remove()


def test_random_sae_matches_hand_spliced_reference(gpt2, batches):
    g = torch.Generator().manual_seed(5)
    sae = ReLUL1SAE(d_in=D, d_sae=48).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, 48, generator=g) / D**0.5)
        sae.W_dec.copy_(torch.randn(48, D, generator=g) / 48**0.5)
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
    mean = _mean_activation(gpt2, batches)
    metrics, _ = downstream_metrics(gpt2, sae, SpliceSite("transformer.h.0"), batches, mean)
    block = gpt2.transformer.h[0]
    logits = {name: [] for name in ("clean", "spliced", "zero", "mean")}
    targets, masks = [], []
    with torch.no_grad():
        for tokens, special in batches:
            logits["clean"].append(gpt2(tokens).logits)
            logits["spliced"].append(_hand_spliced_logits(gpt2, tokens, special, block, sae))
            logits["zero"].append(_hand_spliced_logits(gpt2, tokens, special, block, torch.zeros_like))
            logits["mean"].append(_hand_spliced_logits(gpt2, tokens, special, block, lambda a: mean.expand_as(a)))
            targets.append(tokens[:, 1:].reshape(-1))
            masks.append((~special[:, :-1] & ~special[:, 1:]).reshape(-1))
    flat = [torch.cat([x[:, :-1].reshape(-1, x.shape[-1]) for x in logits[k]]).double().numpy() for k in logits]
    want = reference(flat, torch.cat(targets).numpy(), torch.cat(masks).numpy())
    assert 0.05 < want["ce_loss_recovered"] < 0.95  # a random SAE: neither clean nor ablated
    for key in DOWNSTREAM_KEYS:
        assert metrics[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_transcoder_wiring_keeps_special_positions_clean(gpt2, batches):
    """Transcoder site: read the MLP input, write the MLP output; at BOS the clean MLP output stays."""
    tokens, special = batches[0]
    site = SpliceSite("transformer.h.1.mlp", read="transformer.h.1.mlp:input")
    mlp = copy.deepcopy(gpt2.transformer.h[1].mlp)  # a copy: calling the hooked module would recurse
    with torch.no_grad():
        clean = gpt2(tokens).logits
        same = run_replaced(gpt2, tokens, site, lambda source, c: mlp(source), special)
        zeroed = run_replaced(gpt2, tokens, site, zero_replacement, special)
        all_kept = run_replaced(gpt2, tokens, site, zero_replacement, torch.ones_like(special))
    torch.testing.assert_close(same, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_kept, clean, rtol=0, atol=0)
    block = gpt2.transformer.h[1]
    want = _hand_spliced_logits(gpt2, tokens, special, block.mlp, torch.zeros_like, read_module=block.mlp)
    torch.testing.assert_close(zeroed, want, rtol=0, atol=1e-6)
    assert (zeroed - clean).abs().max() > 1e-2
    # the BOS position itself is unchanged (causal: nothing before it was replaced)
    torch.testing.assert_close(zeroed[:, 0], clean[:, 0], rtol=0, atol=1e-6)


def test_site_from_metadata():
    assert SpliceSite.from_metadata("a.b", None, transcoder=False) == SpliceSite("a.b")
    assert SpliceSite.from_metadata("m:input", "m", transcoder=True) == SpliceSite("m", read="m:input")
    with pytest.raises(Exception, match="hook_name_out"):
        SpliceSite.from_metadata("m:input", None, transcoder=True)


# ----------------------------------------------------------------------------- prepared inputs
def test_prepare_builds_the_shared_inputs_once(gpt2):
    from dictlearn.callbacks import DownstreamMetricsCallback
    from dictlearn.downstream import MEAN_SAMPLE_ROWS, DownstreamCache, prepare
    from dictlearn.models.loading import LanguageModel
    from dictlearn.models.tiny import ByteTokenizer

    lm = LanguageModel(gpt2, ByteTokenizer(), "random-gpt2", None)
    rows = torch.randn(1000, D, generator=torch.Generator().manual_seed(7)) * 3 + 1
    cache = DownstreamCache()
    inputs = prepare(lm, SpliceSite("transformer.h.0"), {"context_size": SEQ}, rows, contexts=3, batch_size=2,
                     cache=cache)
    assert [tuple(t.shape) for t, _ in inputs.batches] == [(2, SEQ), (1, SEQ)] and inputs.n_contexts == 3
    assert all(bool(s[:, 0].all()) for _, s in inputs.batches)  # BOS kept clean (exclude_special default)
    want = rows.numpy().astype(np.float64).mean(0)
    np.testing.assert_allclose(inputs.mean_activation.numpy(), want, rtol=1e-6)
    again = prepare(lm, SpliceSite("transformer.h.0"), {"context_size": SEQ}, rows, contexts=3, batch_size=2,
                    cache=cache)
    assert again.batches is inputs.batches  # the windows are built once per cache
    with pytest.raises(Exception, match=f"takes at most {SEQ} tokens"):
        prepare(lm, SpliceSite("transformer.h.0"), {}, rows, contexts=3, batch_size=2, context=SEQ + 1)
    default = inspect.signature(DownstreamMetricsCallback).parameters["mean_sample_rows"].default
    assert default == MEAN_SAMPLE_ROWS  # the callback's mean_sample_rows default is the one constant


def test_model_modules_import_transformers_only_to_load_a_model():
    """`import dictlearn` pulls transformers in through lightning -> torchmetrics (its BERTScore
    module) today; dictlearn's model modules must not add a second reason (the package stubbed
    here so that its __init__, and lightning, stay out)."""
    package = Path(dictlearn.__file__).parent
    code = (
        "import sys, types; pkg = types.ModuleType('dictlearn'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['dictlearn'] = pkg; import dictlearn.models.tiny, dictlearn.models.loading; "
        "assert 'transformers' not in sys.modules, 'a model module imports transformers at import time'"
    )
    subprocess.run([sys.executable, "-c", code, str(package)], check=True)


# ----------------------------------------------------------------------------- computed once, started mid-model
@pytest.mark.parametrize("write, read", [("transformer.h.0", None), ("transformer.h.1", None),
                                         ("transformer.h.0.mlp", "transformer.h.0.mlp:input"),
                                         ("transformer.h.1.mlp", "transformer.h.1.mlp:input")])
def test_cached_runs_equal_the_four_whole_passes(gpt2, batches, write, read):
    """The clean and ablated runs computed once, and the spliced run started at the first block the
    site touches, give what four whole forwards per batch give (update_from_batch)."""
    from dictlearn.downstream import clean_runs, update_from_batch

    torch.manual_seed(5)
    dictionary = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.ReLU(), torch.nn.Linear(2 * D, D))
    site, mean = SpliceSite(write, read=read), 0.3 * torch.randn(D)
    reference_metric = DownstreamMetrics()
    for tokens, special in batches:
        update_from_batch(reference_metric, gpt2, dictionary, site, tokens, special, mean)
    expected = {k: float(v) for k, v in reference_metric.compute().items()}
    clean = clean_runs(gpt2, site, batches, mean)
    # an SAE at block 0's output starts at block 1, fed by the dictionary; the others at their block
    start = {"transformer.h.0": 1, "transformer.h.1": 1, "transformer.h.0.mlp": 0, "transformer.h.1.mlp": 1}[write]
    assert (clean.blocks, clean.start, clean.fed) == ("transformer.h", start, write == "transformer.h.0")
    metrics, n = downstream_metrics(gpt2, dictionary, site, batches, mean, clean)
    assert n == int(reference_metric.n_tokens)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # clean logits too large to keep (a large vocabulary): the clean forward reruns, same numbers
    again, _ = downstream_metrics(gpt2, dictionary, site, batches, mean,
                                  dataclasses.replace(clean, logits=[None] * len(clean.logits)))
    assert again == metrics
    assert len(gpt2.transformer.h) == 2  # the block list is restored


def test_downstream_standard_errors_resample_documents(gpt2, batches):
    """ce_loss_recovered_se and kl_div_se: the spread of the ratio of sums over resampled documents,
    against a loop that rebuilds each resample from its documents' predictions in float64."""
    from dictlearn.downstream import clean_runs, spliced_losses
    from dictlearn.metrics.bootstrap import resample_counts

    torch.manual_seed(6)
    dictionary = torch.nn.Linear(D, D)
    site, mean = SpliceSite("transformer.h.0"), torch.zeros(D)
    documents = [torch.arange(t.numel()).reshape(t.shape) // 7 for t, _ in batches]  # 7-token documents
    clean = clean_runs(gpt2, site, batches, mean, documents)
    metrics, _ = downstream_metrics(gpt2, dictionary, site, batches, mean, clean)
    losses = spliced_losses(gpt2, dictionary, site, batches, clean)
    ce_clean, ce_spliced, kl = (torch.cat([b[i] for b in losses]).numpy() for i in range(3))
    zero, doc = torch.cat(clean.ce_zero).numpy(), torch.cat(clean.documents).numpy()
    ids = np.unique(doc)
    counts = resample_counts(len(ids))
    recovered, kls = [], []
    for row in counts:
        chosen = np.concatenate([np.flatnonzero(doc == ids[j]) for j in range(len(ids)) for _ in range(row[j])])
        recovered.append((zero[chosen] - ce_spliced[chosen]).sum() / (zero[chosen] - ce_clean[chosen]).sum())
        kls.append(kl[chosen].mean())
    assert metrics["ce_loss_recovered_se"] == pytest.approx(np.std(recovered, ddof=1), rel=1e-9)
    assert metrics["kl_div_se"] == pytest.approx(np.std(kls, ddof=1), rel=1e-9)
    assert metrics["kl_div_se"] > 0


def test_spliced_inputs_built_by_hand_run_and_keep_their_clean_runs(gpt2, batches):
    from dictlearn.downstream import SplicedInputs

    lm = type("LM", (), {"model": gpt2, "name": "tiny"})()
    inputs = SplicedInputs(lm, SpliceSite("transformer.h.0"), list(batches), torch.zeros(D), None, SEQ)
    first, n = inputs.run(torch.nn.Identity())
    assert first["kl_div"] == pytest.approx(0.0, abs=1e-10) and "kl_div_se" not in first
    assert len(inputs.cache.cleans) == 1 and inputs.run(torch.nn.Identity(), standard_errors=True)[1] == n
