"""Cross-layer transcoders (dictlearn.dictionaries.crosslayer) against float64 references written here.

The reference computes each layer's latents from that layer's input and encoder block alone, and
each layer's output as Σ_{ℓ ≤ ℓ'} a_ℓ W_dec^{ℓ→ℓ'} + b_dec^{ℓ'} over explicit blocks — never through
the masked matrices. Ground truth: on `dictlearn.data.crosslayer` data a CLT recovers the
write-everywhere decoders where per-layer transcoders, which see one layer, cannot (slow).
"""

from __future__ import annotations

import h5py
import lightning as L
import pytest
import torch

from conftest import assert_same_state, crash_and_resume, quiet_trainer
from dictlearn import ActivationDataModule, TopKSAE, load
from dictlearn.data.crosslayer import input_key, output_key, write_crosslayer_file
from dictlearn.dictionaries import CrossLayerJumpReLU, CrossLayerTopK
from dictlearn.errors import ConfigError, DataError
from dictlearn.export import export
from dictlearn.metrics import mmcs
from dictlearn.training import DictionaryTraining, Member

NL, D, M, K = 3, 8, 6, 2


def _randomised(clt, seed: int = 0):
    """Random weights in the allowed blocks (the masks applied by `constrain_parameters`), data
    scales away from 1 so the raw-unit conversions are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        clt.constrain_parameters()
        clt.input_scale.fill_(2.0)
        clt.target_scale.fill_(0.5)
    return clt


def reference(clt, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """float64 (latents a_ℓ [n, M] in training units, outputs y_ℓ' [n, D] raw) from the blocks."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (clt.W_enc, clt.b_enc, clt.W_dec, clt.b_dec))
    s_in, s_t = float(clt.input_scale), float(clt.target_scale)
    latents = []
    for layer in range(NL):
        x_l = x[:, layer * D:(layer + 1) * D].double() * s_in
        pre = x_l @ W_enc[layer * D:(layer + 1) * D, layer * M:(layer + 1) * M] + b_enc[layer * M:(layer + 1) * M]
        if isinstance(clt, CrossLayerTopK):
            keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(K, dim=1).indices, True)
            latents.append(torch.where(keep, pre.relu(), 0.0))
        else:
            theta = clt.threshold.detach().double()[layer * M:(layer + 1) * M]
            latents.append(torch.where(pre > theta, pre, 0.0))
    outputs = []
    for target in range(NL):
        y = b_dec[target * D:(target + 1) * D].expand(len(x), D).clone()
        for source in range(target + 1):
            y = y + latents[source] @ W_dec[source * M:(source + 1) * M, target * D:(target + 1) * D]
        outputs.append(y / s_t)
    return latents, outputs


@pytest.mark.parametrize("make", [
    lambda: CrossLayerTopK(n_layers=NL, d_in=NL * D, d_sae=NL * M, k=K),
    lambda: CrossLayerJumpReLU(n_layers=NL, d_in=NL * D, d_sae=NL * M),
], ids=["topk", "jumprelu"])
def test_forward_matches_the_float64_reference(make):
    clt = _randomised(make())
    if isinstance(clt, CrossLayerJumpReLU):
        with torch.no_grad():
            clt.log_threshold.copy_(torch.full((NL * M,), 0.3).log())
    x = torch.randn(50, NL * D, generator=torch.Generator().manual_seed(1))
    latents, outputs = reference(clt, x)
    with torch.no_grad():
        y = clt(x)
        z = clt.encode(x)
    torch.testing.assert_close(y.double(), torch.cat(outputs, 1), rtol=1e-5, atol=1e-5)
    # reported latents are training latents times ‖decoder row‖ / target scale (docs/conventions.md)
    scale = clt.W_dec.detach().double().norm(dim=1) / 0.5
    torch.testing.assert_close(z.double(), torch.cat(latents, 1) * scale, rtol=1e-5, atol=1e-5)
    assert all(((a > 0).sum(1) <= K).all() for a in latents) or isinstance(clt, CrossLayerJumpReLU)
    # one layer at a time (the replacement model's calls) gives the same numbers
    per_layer = [clt.encode_layer(i, x[:, i * D:(i + 1) * D]) for i in range(NL)]
    for i in range(NL):
        torch.testing.assert_close(per_layer[i], z[:, i * M:(i + 1) * M], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(clt.decode_layer(i, per_layer[: i + 1]).double(), outputs[i], rtol=1e-5, atol=1e-5)


def test_the_zero_blocks_stay_zero_through_training_and_export(tmp_path):
    path = tmp_path / "cl.h5"
    write_crosslayer_file(path, 6000, n_layers=NL, d=D, n_features=16, mean_active=2.0, seed=2)
    keys = [",".join(f(layer) for layer in range(NL)) for f in (input_key, output_key)]
    L.seed_everything(0)
    clt = CrossLayerTopK(n_layers=NL, d_in=NL * D, d_sae=NL * M, k=K)
    dm = ActivationDataModule(path, input_key=keys[0], target_key=keys[1], batch_size=256, block_size=64)
    quiet_trainer(max_steps=20).fit(DictionaryTraining(clt), dm)
    enc, dec = clt._masks()
    assert (clt.W_enc[~enc] == 0).all() and (clt.W_dec[~dec] == 0).all()
    assert (clt.W_enc[enc] != 0).any() and (clt.W_dec[dec] != 0).all()
    loaded = load(export(clt.eval(), tmp_path / "e", dm.provenance()))
    assert type(loaded) is CrossLayerTopK and loaded.n_layers == NL
    x = torch.cat([x for x, _ in dm.val_dataloader()])[:200]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clt(x), rtol=1e-4, atol=1e-5)


def test_bad_shapes_and_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 3"):
        CrossLayerTopK(n_layers=3, d_in=16, d_sae=12, k=2)
    with pytest.raises(ConfigError, match="n_layers"):
        CrossLayerTopK(n_layers=1, d_in=16, d_sae=12, k=2)
    with pytest.raises(ConfigError, match="skip"):
        CrossLayerTopK(n_layers=2, d_in=16, d_sae=12, k=2, skip_connection=True)
    path = tmp_path / "cl.h5"
    write_crosslayer_file(path, 500, n_layers=NL, d=D, n_features=16, seed=0)
    with h5py.File(path, "a") as f:
        f["wide.3"] = torch.zeros(500, D + 1).numpy()
    with pytest.raises(DataError, match="not in layer order"):
        ActivationDataModule(path, input_key="mlp_in.1,mlp_in.0", target_key="mlp_out.0,mlp_out.1")
    with pytest.raises(DataError, match="equal widths"):
        ActivationDataModule(path, input_key="mlp_in.0,wide.3", target_key="mlp_out.0,mlp_out.1")
    with pytest.raises(DataError, match="'mlp_in.5' not found"):
        ActivationDataModule(path, input_key="mlp_in.0,mlp_in.5", target_key="mlp_out.0,mlp_out.1")


def test_a_sweep_of_clts_and_per_layer_transcoders_resumes_bit_identical(tmp_path):
    """A CLT (TopK and JumpReLU) beside a per-layer transcoder in one sweep, killed and resumed
    mid-run: every parameter, buffer (dead counters, data scales) ends bit-identical."""
    path = tmp_path / "cl.h5"
    write_crosslayer_file(path, 8000, n_layers=NL, d=D, n_features=16, mean_active=2.0, seed=3)
    keys = [",".join(f(layer) for layer in range(NL)) for f in (input_key, output_key)]

    def make():
        return DictionaryTraining({
            "clt_topk": Member(CrossLayerTopK(n_layers=NL, d_in=NL * D, d_sae=NL * M, k=K), seed=0),
            "clt_jumprelu": Member(CrossLayerJumpReLU(n_layers=NL, d_in=NL * D, d_sae=NL * M), seed=0),
            "tc0": Member(TopKSAE(d_in=D, d_sae=M, k=K, transcoder=True), input_key=input_key(0),
                          target_key=output_key(0), seed=0),
        })

    reference, resumed, _ = crash_and_resume(make, str(path), tmp_path, steps=30, checkpoint_every=6, crash_at=14,
                                             resume_step=12, data_kwargs=dict(input_key=keys[0], target_key=keys[1]))
    assert_same_state(reference, resumed)
    assert not torch.equal(reference.members["clt_topk"].W_dec, CrossLayerTopK(
        n_layers=NL, d_in=NL * D, d_sae=NL * M, k=K).W_dec)  # it trained


@pytest.mark.slow
def test_clt_recovers_write_everywhere_decoders_where_per_layer_transcoders_split_them(tmp_path):
    """3 layers of d = 16, 32 features per layer (2 active per row and layer), each written to its
    own layer and the next: the CLT's decoder rows, over all layers, match the true ones (MMCS ≥
    0.9); per-layer transcoders, whose rows each cover one layer, cannot (≈ 1/√2 on the two
    thirds of the features that write to two layers, so ≈ 0.8 in all)."""
    path = tmp_path / "cl.h5"
    n_layers, d, m = 3, 16, 64
    write_crosslayer_file(path, 60_000, n_layers=n_layers, d=d, n_features=32, mean_active=2.0, seed=0)
    with h5py.File(path) as f:
        true = torch.cat([torch.from_numpy(f[f"decoders.{layer}"][:]) for layer in range(n_layers)])
    keys = [",".join(f(layer) for layer in range(n_layers)) for f in (input_key, output_key)]
    L.seed_everything(0)
    clt = CrossLayerTopK(n_layers=n_layers, d_in=n_layers * d, d_sae=n_layers * m, k=2)
    data = ActivationDataModule(path, input_key=keys[0], target_key=keys[1], batch_size=BATCH)
    quiet_trainer(max_steps=STEPS).fit(DictionaryTraining(clt), data)
    clt_score = mmcs(true, clt.W_dec.detach())
    rows = []
    for layer in range(n_layers):
        L.seed_everything(0)
        tc = TopKSAE(d_in=d, d_sae=m, k=2, transcoder=True)
        data = ActivationDataModule(path, input_key=input_key(layer), target_key=output_key(layer), batch_size=BATCH)
        quiet_trainer(max_steps=STEPS).fit(DictionaryTraining(tc), data)
        placed = torch.zeros(m, n_layers * d)
        placed[:, layer * d:(layer + 1) * d] = tc.W_dec.detach()
        rows.append(placed)
    per_layer_score = mmcs(true, torch.cat(rows))
    print(f"MMCS of the write-everywhere decoders: CLT {clt_score:.3f}, per-layer transcoders {per_layer_score:.3f}")
    assert clt_score >= 0.9
    assert per_layer_score < 0.85


STEPS, BATCH = 400, 512
