"""Feature splitting across sizes (dictlearn/interpret/splitting.py): the chunked matcher equals a
brute-force one; on hierarchical features (a parent direction whose children lie near it) the
small dictionary's parent latent has the large dictionary's children as its family, both with
constructed decoders and with two dictionaries trained on such data."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from conftest import quiet_trainer
from dictlearn import ActivationDataModule, TopKSAE
from dictlearn.errors import ConfigError
from dictlearn.interpret.splitting import latent_concepts, size_ladder, size_pair, top_cosines
from dictlearn.training import DictionaryTraining, TrainingConfig


@pytest.mark.parametrize("n, m, k, chunk", [(37, 53, 1, 8), (37, 53, 5, 8), (100, 30, 3, 7), (20, 20, 4, 64)])
def test_chunked_top_cosines_equal_brute_force(n, m, k, chunk):
    g = torch.Generator().manual_seed(n + m)
    a, b = torch.randn(n, 9, generator=g, dtype=torch.float64), torch.randn(m, 9, generator=g, dtype=torch.float64)
    full = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T  # the n x m matrix
    expected = full.topk(k, dim=1)
    values, indices = top_cosines(a * 3.0, b * 0.5, k=k, chunk=chunk)  # norms must not matter
    torch.testing.assert_close(values.double(), expected.values, rtol=0, atol=1e-6)
    assert torch.equal(indices, expected.indices)


def _hierarchy(seed=0, d=32, parents=6, children=4, others=10, spread=0.5):
    """Parent unit directions; each child = normalise(parent + spread · noise); independent
    features. -> (parents [P, d], children [P, C, d], others [O, d]) float64."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        v = torch.randn(*shape, d, generator=g, dtype=torch.float64)
        return v / v.norm(dim=-1, keepdim=True)

    P, O = unit(parents), unit(others)
    C = P[:, None] + spread * unit(parents, children)
    return P, C / C.norm(dim=-1, keepdim=True), O


def test_a_parent_latent_has_its_children_as_family_and_statistics_match_brute_force():
    P, C, O = _hierarchy()
    perm = torch.randperm(24 + 10, generator=torch.Generator().manual_seed(1))
    small = torch.cat([P, O])  # 6 parents then 10 others
    large = torch.cat([C.reshape(24, -1), O + 0.05 * torch.randn(O.shape, dtype=torch.float64)])[perm]
    pair = size_pair(small, large, chunk=5)
    cos = (small / small.norm(dim=1, keepdim=True)) @ (large / large.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(pair.max_cos.double(), cos.max(1).values, rtol=0, atol=1e-6)
    assert pair.mmcs == pytest.approx(float(cos.max(1).values.mean()), abs=1e-6)
    assert torch.equal(pair.parent, cos.argmax(0))
    where = perm.argsort()  # original index -> position in `large`
    for p in range(6):
        family = pair.children(p, min_cos=0.5)
        assert sorted(i for i, _ in family) == sorted(where[p * 4 : (p + 1) * 4].tolist())
        assert [c for _, c in family] == sorted((c for _, c in family), reverse=True)
    assert all(len(pair.children(6 + o)) == 1 for o in range(10))  # independent features: one match
    sizes = pair.family_sizes()
    assert sizes[:6].tolist() == [4] * 6 and pair.summary()["split_fraction"] == pytest.approx(6 / 16)


def test_the_ladder_pairs_each_size_with_the_next_and_needs_two():
    W = {64: torch.randn(64, 8), 16: torch.randn(16, 8), 32: torch.randn(32, 8)}
    assert [(p.small, p.large) for p in size_ladder(W)] == [(16, 32), (32, 64)]
    with pytest.raises(ConfigError, match="at least two sizes"):
        size_ladder({16: W[16]})
    with pytest.raises(ConfigError, match="same site"):
        top_cosines(torch.randn(3, 8), torch.randn(3, 9))


def test_latent_concepts_is_the_best_f1_concept():
    fires = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=torch.bool)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    (a, fa), (b, fb) = latent_concepts(fires, labels, ["keyword", "def"])
    assert (a, b) == ("keyword", "def")
    assert fa == pytest.approx(1.0) and fb == pytest.approx(2 * 2 / (3 + 2))  # def: TP 2 of 3 fired, 2 labelled


@pytest.mark.slow
def test_trained_small_and_large_dictionaries_split_a_parent_into_its_children(tmp_path):
    """Tokens carry one child of a family (or an independent feature): a dictionary with room for
    only the parents learns their common direction, one with room for the children learns each;
    the splitting analysis finds a parent latent's children as its family (300 steps a size)."""
    P, C, O = _hierarchy(seed=2, spread=1.0)
    rng = np.random.default_rng(0)
    n = 60_000
    pick = rng.integers(0, 24 + 10, size=(n, 2))  # two active features per token
    table = torch.cat([C.reshape(24, -1), O]).float().numpy()
    acts = (table[pick] * rng.uniform(0.5, 1.5, size=(n, 2, 1))).sum(1).astype(np.float32)
    path = tmp_path / "families.h5"
    with h5py.File(path, "w") as f:
        f["acts"] = acts
    decoders = {}
    for d_sae in (16, 64):
        L.seed_everything(0)
        model = TopKSAE(d_in=32, d_sae=d_sae, k=2)
        quiet_trainer(max_steps=300).fit(DictionaryTraining(model, TrainingConfig(lr=3e-3, lr_decay_fraction=0.3)),
                                         ActivationDataModule(str(path), batch_size=512))
        decoders[d_sae] = model.W_dec.detach()
    (pair,) = size_ladder(decoders)
    parent_cos, parent_latents = (t[:, 0] for t in top_cosines(P, decoders[16], 1))
    child_latents = top_cosines(C.reshape(24, -1), decoders[64], 1)[1][:, 0].view(6, 4)
    families = [sorted(i for i, _ in pair.children(int(parent_latents[p]), min_cos=0.5)) for p in range(6)]
    print(f"parents in the small dictionary: cos {[round(c, 3) for c in parent_cos.tolist()]}; "
          f"MMCS(16 -> 64) {pair.mmcs:.3f}; families {families}; true children's latents {child_latents.tolist()}")
    # The small dictionary's 16 latents hold 6 families and 10 other features: most families
    # collapse onto one latent (its direction near the children's mean, cos ≈ 0.89 with the parent
    # at this spread); measured: 4 of 6 families have >= 3 of their 4 children's latents as the
    # parent latent's family (the other two share small latents with independent features).
    split = [p for p in range(6) if len(set(families[p]) & set(child_latents[p].tolist())) >= 3]
    assert len(split) >= 4, (families, child_latents.tolist())
    assert all(parent_cos[p] > 0.75 for p in split)


def test_the_analysis_figure_draws_the_ladder_and_the_largest_family(tmp_path):
    """Exports whose decoders are the constructed hierarchy: the figure's family is a parent with
    its 4 children, its histograms hold each pair's max cosines, and one width draws nothing."""
    from dictlearn.analysis import splitting as figure
    from dictlearn.export import export

    P, C, O = _hierarchy()
    rows = {16: torch.cat([P, O]), 34: torch.cat([C.reshape(24, -1), O])}
    lines = []
    for d_sae, W in rows.items():
        model = TopKSAE(d_in=32, d_sae=d_sae, k=2)
        with torch.no_grad():
            model.W_dec.copy_(W.float())
        folder = export(model, tmp_path / f"e{d_sae}")
        lines.append({"architecture": "topk", "d_sae": d_sae, "seed": 0, "l0_target": 2, "export": str(folder)})
    notes: list[str] = []
    (drawn,) = figure.draw(lines, tmp_path, notes)
    assert notes == [] and drawn.png.is_file() and drawn.png.stat().st_size > 10_000
    pairs, family = figure.find_family(figure.ladder_lines(lines)[1])
    assert family.parent.latent < 6 and len(family.children) == 4
    assert {i for i, _ in pairs[0].children(family.parent.latent)} == {m.latent for m in family.children}
    assert figure.draw(lines[:1], tmp_path, notes) == []


def test_widths_that_share_their_initial_rows_are_flagged():
    from dictlearn.analysis.splitting import same_index_fraction

    small = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    large = torch.cat([small + 0.01 * torch.randn(8, 16), torch.randn(8, 16)])  # one seed's first rows
    assert same_index_fraction(size_pair(small, large)) == 1.0
    shifted = torch.cat([large[:8].roll(1, 0), large[8:]])  # the same rows, each at another index
    assert same_index_fraction(size_pair(small, shifted)) == 0.0


def test_rank_parents_puts_the_family_the_labels_name_first():
    """Small latents 0 (3 unlabelled children), 1 (2 children, both labelled), 2 (2 children, the
    parent unlabelled), 3 (one child); large latent 7 matches 0 below the cosine bar."""
    from dictlearn.interpret.splitting import SizePair, rank_parents

    parent = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0, 3])
    parent_cos = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.9, 0.9, 0.9, 0.4, 0.9])
    pair = SizePair(4, 9, torch.ones(4), parent, parent_cos)
    small = [("a", 0.5), ("b", 0.3), ("c", 0.1), ("d", 0.9)]
    large = [("x", 0.0)] * 3 + [("y", 0.4), ("y", 0.25), ("z", 0.6), ("z", 0.6), ("x", 0.9), ("w", 0.9)]
    assert rank_parents(pair) == [0, 1, 2, 3]  # by number of children
    # 0: F1 0.5, no labelled child -> 0.5; 1: 0.3 + 0.4 + 0.25 -> 0.95; 2: parent below 0.2 -> 0; 3: one child -> 0
    assert rank_parents(pair, small, large) == [1, 0, 2, 3]
    assert rank_parents(pair, small) == [0, 1, 2, 3]  # parent F1 alone: 0.5 > 0.3
    assert rank_parents(pair, small, large, min_f1=0.35) == [0, 1, 2, 3]  # 1: 0.3 < 0.35 -> unnamed


def test_dead_latents_take_part_in_no_match():
    """A dead large latent (never fired) is nobody's child even where it is the best match; a dead
    small latent has no best match, and MMCS is the mean over the alive ones (brute force)."""
    P, C, O = _hierarchy()
    small, large = torch.cat([P, O]), torch.cat([C.reshape(24, -1), O])
    small_alive, large_alive = torch.ones(16, dtype=torch.bool), torch.ones(34, dtype=torch.bool)
    small_alive[[3, 9]] = False
    large_alive[[0, 5]] = False  # the first child of parents 0 and 1
    pair = size_pair(small, large, chunk=4, small_alive=small_alive, large_alive=large_alive)
    unit = lambda W: W / W.norm(dim=1, keepdim=True)
    cos = unit(small) @ unit(large).T
    cos_alive = cos[small_alive][:, large_alive]
    assert pair.mmcs == pytest.approx(float(cos_alive.max(1).values.mean()), abs=1e-6)
    assert pair.max_cos[[3, 9]].isnan().all() and len(pair.matched_cos) == 14
    assert sorted(i for i, _ in pair.children(0)) == [1, 2, 3] and sorted(i for i, _ in pair.children(1)) == [4, 6, 7]
    assert pair.children(3) == [] and pair.parent[[0, 5]].tolist() == [-1, -1]
    expected_parent = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15])[cos_alive.argmax(0)]
    assert torch.equal(pair.parent[large_alive], expected_parent)
    assert pair.summary()["alive_small"] == 14 and pair.summary()["alive_large"] == 32
