"""A latent's family across sizes on its dashboard card (dictlearn/interpret/families.py): on
dictionaries whose decoders are a constructed hierarchy (parents, children near them, independent
features) and data drawn from it, the parent's card lists exactly its children in the next width
(the indices the construction put them at), each child's card its parent, with links between the
pages, cosines against a brute-force matrix and concept labels against a brute-force F1."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch

from dictlearn import TopKSAE
from dictlearn.export import export
from dictlearn.interpret.dashboard import InspectOptions
from dictlearn.interpret.families import Ladder, ladder_dashboards
from dictlearn.data.concepts import write_concept_labels

PARENTS, CHILDREN, OTHERS, D = 6, 4, 10, 32


def _hierarchy(seed=0, spread=0.5):
    """Unit parents [P, d]; children normalise(parent + spread · noise) [P, C, d]; others [O, d]."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        v = torch.randn(*shape, D, generator=g)
        return v / v.norm(dim=-1, keepdim=True)

    P, O = unit(PARENTS), unit(OTHERS)
    C = P[:, None] + spread * unit(PARENTS, CHILDREN)
    return P, C / C.norm(dim=-1, keepdim=True), O


def _tied(W: torch.Tensor, k: int) -> TopKSAE:
    """A TopK SAE whose decoder rows are W and whose encoder is their transpose."""
    model = TopKSAE(d_in=D, d_sae=len(W), k=k)
    with torch.no_grad():
        model.W_dec.copy_(W)
        model.W_enc.copy_(W.T)
        model.b_enc.zero_()
        model.b_dec.zero_()
    return model


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Exports at d_sae 16 (parents, others) and 34 (children, others, shuffled), and a file whose
    rows each hold one child or one independent feature, labelled with the child's family.
    -> (exports {d_sae: folder}, data file, where [34] (construction index -> latent), P, C, O)."""
    folder = tmp_path_factory.mktemp("families")
    P, C, O = _hierarchy()
    perm = torch.randperm(PARENTS * CHILDREN + OTHERS, generator=torch.Generator().manual_seed(1))
    large = torch.cat([C.reshape(-1, D), O])[perm]
    exports = {16: export(_tied(torch.cat([P, O]), 1), folder / "e16"),
               34: export(_tied(large, 1), folder / "e34")}
    rng = np.random.default_rng(0)
    n = 6000
    pick = rng.integers(0, PARENTS * CHILDREN + OTHERS, n)
    table = torch.cat([C.reshape(-1, D), O]).numpy()
    acts = (table[pick] * rng.uniform(0.5, 1.5, (n, 1))).astype(np.float32)
    family = np.where(pick < PARENTS * CHILDREN, pick // CHILDREN, -1)
    values = family[:, None] == np.arange(PARENTS)[None]
    path = folder / "acts.h5"
    with h5py.File(path, "w") as f:
        f["acts"] = acts
        f["token_ids"] = rng.integers(32, 127, n).astype(np.int32)
        f["doc_index"] = np.arange(n, dtype=np.int32) // 500
        write_concept_labels(f, [f"family{p}" for p in range(PARENTS)], values)
    return exports, str(path), perm.argsort(), (P, C, O), (acts, values)


def _card(page: str, latent: int) -> str:
    match = re.search(rf'<section class="card" id="f{latent}">(.*?)</section>', page, re.S)
    assert match, f"no card for latent {latent}"
    return match.group(1)


def _family_rows(card: str) -> list[tuple[str, int, int, str, float, str]]:
    """(relation, d_sae, latent, href or '', cosine, concept) of each row of the card's family table."""
    table = re.search(r'<table class="family">(.*?)</table>', card, re.S)
    rows = []
    for row in re.findall(r'<tr class="(parent|child)">(.*?)</tr>', table.group(1) if table else "", re.S):
        cells = re.findall(r"<td>(.*?)</td>", row[1], re.S)
        link = re.match(r'<a href="([^"]*)">(\d+)</a>', cells[2])
        latent = int(link.group(2)) if link else int(cells[2])
        rows.append((row[0], int(cells[1]), latent, link.group(1) if link else "", float(cells[3]), cells[4]))
    return rows


def test_the_ladder_relatives_are_the_constructed_families():
    P, C, O = _hierarchy()
    perm = torch.randperm(34, generator=torch.Generator().manual_seed(1))
    where = perm.argsort()
    small, large = _tied(torch.cat([P, O]), 1), _tied(torch.cat([C.reshape(-1, D), O])[perm], 1)
    ladder = Ladder.of({34: large, 16: small})
    assert ladder.widths == [16, 34] and ladder.concepts is None
    unit = lambda m: torch.nn.functional.normalize(m.W_dec.detach(), dim=1)
    cos = unit(small) @ unit(large).T
    for p in range(PARENTS):
        relatives = ladder.relatives(16, p)
        assert {r.latent for r in relatives} == set(where[p * CHILDREN : (p + 1) * CHILDREN].tolist())
        assert all(r.relation == "child" and r.d_sae == 34 for r in relatives)
        assert [r.cos for r in relatives] == pytest.approx([float(cos[p, r.latent]) for r in relatives], abs=1e-6)
        for child in where[p * CHILDREN : (p + 1) * CHILDREN].tolist():
            (parent,) = ladder.relatives(34, child)
            assert (parent.relation, parent.d_sae, parent.latent) == ("parent", 16, p)
    cards = ladder.family_cards(parents=2, children=3)
    assert len(cards[16]) == 2 and all(p < PARENTS for p in cards[16])  # parents with 4 children, not others
    assert cards[34] == [c.latent for p in cards[16] for c in ladder.relatives(16, p)[:3]]


def test_the_parent_card_lists_its_children_with_links_and_labels(sweep, tmp_path):
    exports, data, where, _, (acts, values) = sweep
    pages = {16: tmp_path / "topk_d16.html", 34: tmp_path / "topk_d34.html"}
    options = InspectOptions(rows=None, cards=3, extremes=1, record=False)
    assert ladder_dashboards(exports, data, pages, options) == [pages[16], pages[34]]
    small, large = pages[16].read_text(), pages[34].read_text()
    from dictlearn.export import load

    z = {d: load(folder).encode(torch.from_numpy(acts)) > 0 for d, folder in exports.items()}
    y = values.astype(float)

    def best_concept(d, latent):  # brute-force detector F1 over all rows
        f = z[d][:, latent].numpy().astype(float)
        f1 = 2 * (f @ y) / (f.sum() + y.sum(0))
        return f"family{int(f1.argmax())}", float(f1.max())

    carded = {int(m) for m in re.findall(r'<section class="card" id="f(\d+)">', small)}
    ladder = Ladder.of({d: load(folder) for d, folder in exports.items()}, data, "acts", len(acts))
    family = ladder.family_cards()[16]
    assert len(family) == 2 and set(family) <= carded and all(p < PARENTS for p in family)
    carded_large = {int(m) for m in re.findall(r'<section class="card" id="f(\d+)">', large)}
    for p in sorted(carded & set(range(PARENTS))):
        rows = _family_rows(_card(small, p))
        children = set(where[p * CHILDREN : (p + 1) * CHILDREN].tolist())
        assert {r[2] for r in rows} == children
        if p in family:  # its children have cards in the next page
            assert children <= carded_large
        for relation, d, child, link, cos, concept in rows:
            assert (relation, d) == ("child", 34)
            assert link == (f"topk_d34.html#f{child}" if child in carded_large else "")
            assert concept == best_concept(34, child)[0] == f"family{p}"
        for child in children & carded_large:
            (back,) = _family_rows(_card(large, child))
            assert back[:4] == ("parent", 16, p, f"topk_d16.html#f{p}")
        assert f"best concept <b>family{p}</b> (F1 {best_concept(16, p)[1]:.2f})" in _card(small, p)


def test_compare_draws_a_page_per_width_of_a_size_sweep():
    from dictlearn.compare.plan import CompareConfig, plan
    from dictlearn.compare.run import _page_names, dashboard_members, dashboard_pages

    planned = plan(CompareConfig(architectures=["topk", "relu_l1"], l0=[8, 16], seeds=[1, 0],
                                 d_sae=[128, 64]).resolved())
    for chosen in dashboard_members(planned):
        members = dashboard_pages(planned, chosen)
        assert list(members) == [64, 128]
        assert all((m.architecture, m.l0_target, m.seed) == (chosen.architecture, chosen.l0_target, chosen.seed)
                   for m in members.values())
        assert _page_names(chosen.architecture, members) == {d: f"{chosen.architecture}_d{d}.html" for d in (64, 128)}
    single = plan(CompareConfig(architectures=["topk"], l0=[8], seeds=[0], d_sae=[64]).resolved())
    assert _page_names("topk", dashboard_pages(single, single[0])) == {64: "topk.html"}
