"""Feature dashboards (`dictlearn inspect`): streamed statistics against brute force over the whole
data, contexts against the file's token ids, the logit lens against a float64 reference, the page
through an HTML parser, and bad input as one line with exit 2."""

from __future__ import annotations

import html.parser
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dictlearn import TopKSAE
from dictlearn.cli import main
from dictlearn.export import export
from dictlearn.interpret.contexts import TokenRows, latent_column, read_contexts, token_display
from dictlearn.interpret.dashboard import InspectOptions, build_dashboard, choose_latents, inspect
from dictlearn.interpret.dashboard_html import render
from dictlearn.interpret.directions import nearest_latents, top_tokens, unembedding
from dictlearn.interpret.statistics import GroupedTop, latent_statistics
from dictlearn.models.tiny import TINY_NAME, ByteTokenizer

HOOK = "transformer.h.2"


# ----------------------------------------------------------------------------- shared inputs
def random_topk(d_in: int, d_sae: int, k: int, seed: int = 0) -> TopKSAE:
    """A TopK SAE with seeded random weights, as an export would load it (scales 1, unit rows)."""
    torch.manual_seed(seed)
    model = TopKSAE(d_in=d_in, d_sae=d_sae, k=k)
    with torch.no_grad():
        model.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        model.b_enc.copy_(0.1 * torch.randn(d_sae))
        model.b_dec.zero_()
    return model.requires_grad_(False).eval()


def harvested_like(path: Path, n_rows: int = 3000, d: int = 16, docs: int = 7, seed: int = 0) -> Path:
    """A file laid out as harvest writes it: activations, token_ids (bytes), doc_index."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n_rows), docs - 1, replace=False))
    doc = np.zeros(n_rows, dtype=np.int32)
    for c in cuts:
        doc[c:] += 1
    with h5py.File(path, "w") as f:
        f.create_dataset("acts", data=rng.standard_normal((n_rows, d)).astype(np.float32))
        f.create_dataset("token_ids", data=rng.integers(32, 127, n_rows).astype(np.int32))
        f.create_dataset("doc_index", data=doc)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(dictionary, file, z [rows, d_sae] float32 as the dashboard computes it)."""
    path = harvested_like(tmp_path_factory.mktemp("dash") / "acts.h5")
    dictionary = random_topk(16, 48, 4)
    with h5py.File(path) as f:
        z = dictionary.encode(torch.from_numpy(f["acts"][:]))
    return dictionary, str(path), z


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A random TopK SAE at the embedded model's middle block, exported, and a real harvested file
    of 4,000 rows. -> (export folder, data file)."""
    from dictlearn.harvest import harvest
    from dictlearn.models.loading import load_model

    folder = tmp_path_factory.mktemp("embedded")
    data = folder / "acts.h5"
    lm = load_model()
    harvest(lm, [HOOK, "transformer.h.2.mlp:input", "transformer.h.2.mlp"], data, tokens=4000, context=64,
            progress=False)
    attrs = {"model_name": TINY_NAME, "hook_name": HOOK, "context_size": 64, "input_key": HOOK, "path": str(data)}
    return export(random_topk(128, 64, 4, seed=1), folder / "export", attrs), data


# ----------------------------------------------------------------------------- running top-k
def test_grouped_top_equals_brute_force_over_chunks():
    g = torch.Generator().manual_seed(0)
    groups, k, n = 7, 5, 900
    group = torch.randint(0, groups, (n,), generator=g)
    key = torch.randn(n, generator=g)
    top = GroupedTop(groups, k)
    for chunk in torch.arange(n).split(128):  # updates across chunks merge with the state
        top.update(group[chunk], key[chunk], chunk)
    for c in range(groups):
        rows = torch.nonzero(group == c).flatten()
        expected = rows[key[rows].argsort(descending=True)][:k]
        assert top.rows[c].tolist() == expected.tolist()
        assert torch.equal(top.keys[c], key[expected])


def test_grouped_top_with_random_keys_is_a_uniform_sample():
    """Bottom-k of uniform keys over 20 items offered in 4 chunks: each item kept with probability
    k/20 = 0.25 (2,000 draws: standard error 0.0097)."""
    kept = torch.zeros(20)
    g = torch.Generator().manual_seed(1)
    for _ in range(2000):
        top = GroupedTop(1, 5)
        for rows in torch.arange(20).split(5):
            top.update(torch.zeros(5, dtype=torch.long), -torch.rand(5, generator=g), rows)
        kept[top.rows[0]] += 1
    assert ((kept / 2000 - 0.25).abs() < 0.04).all(), kept / 2000


# ----------------------------------------------------------------------------- statistics
def test_statistics_equal_brute_force(small):
    dictionary, path, z = small
    with h5py.File(path) as f:
        x = torch.from_numpy(f["acts"][:])
    n, d_sae = z.shape
    stats = latent_statistics(dictionary.encode, lambda a, b: x[a:b], d_sae, 0, n, top=6, bins=20, intervals=5,
                              per_interval=3, chunk_rows=700)
    zz = z.double().numpy()
    fired = zz != 0
    assert stats.fire_count.tolist() == fired.sum(0).tolist()
    assert torch.allclose(stats.density, torch.from_numpy(fired.mean(0)))
    assert np.allclose(stats.mean_activation.numpy(), np.where(fired.any(0), zz.sum(0) / np.maximum(fired.sum(0), 1), 0))
    for latent in range(d_sae):
        column = zz[:, latent]
        order = np.argsort(-column, kind="stable")[: min(6, fired[:, latent].sum())]
        assert stats.top_rows[latent, : len(order)].tolist() == order.tolist()  # brute-force argmax, in order
        top = column.max()
        if top <= 0:
            continue
        values = column[fired[:, latent]]
        bins = np.clip(np.floor(values / top * 20), 0, 19).astype(int)
        assert stats.histogram[latent].tolist() == np.bincount(bins, minlength=20).tolist()
        for j, (low, high) in enumerate(stats.interval_bounds(latent)):
            rows = [r for r in stats.sample_rows[latent, j].tolist() if r >= 0]
            inside = ((values >= low - 1e-6) & (values <= high + 1e-6)).sum()
            assert len(rows) == min(3, inside) and len(set(rows)) == len(rows)
            assert all(low - 1e-6 <= column[r] <= high + 1e-6 for r in rows), (latent, j)
        fractions = stats.interval_fractions(latent)
        assert abs(sum(fractions) - 1) < 1e-9


def test_choose_latents_takes_extremes_and_a_sample(small):
    dictionary, path, z = small
    x = torch.from_numpy(h5py.File(path)["acts"][:])
    stats = latent_statistics(dictionary.encode, lambda a, b: x[a:b], 48, 0, len(x))
    chosen = choose_latents(stats, cards=5, extremes=2, seed=0)
    density = (z != 0).double().mean(0)
    by_density = density.argsort(descending=True).tolist()
    roles = dict(chosen)
    assert {l for l, r in roles.items() if r == "densest"} == set(by_density[:2])
    alive = [l for l in by_density if density[l] > 0]
    assert {l for l, r in roles.items() if r == "rarest"} == set(alive[-2:])
    assert sum(r == "sample" for r in roles.values()) == 5


# ----------------------------------------------------------------------------- contexts
def test_contexts_are_the_rows_tokens_within_the_document(small):
    dictionary, path, z = small
    with h5py.File(path) as f:
        x, ids, doc = (torch.from_numpy(f[k][:]) for k in ("acts", "token_ids", "doc_index"))
    tokens = TokenRows(path)
    rows = [0, 5, 1500, len(x) - 1] + [int(torch.nonzero(doc == 3)[0])]  # the ends and a document's first row
    read = lambda slices: torch.cat([x[a:b] for a, b in slices])
    contexts = read_contexts(tokens, read, latent_column(dictionary.encode, 7), rows, len(x),
                             token_display(ByteTokenizer()), before=10, after=4)
    for row, context in zip(rows, contexts):
        first, stop = context.first, context.first + len(context.tokens)
        assert first <= row < stop and context.focus == row - first
        assert (doc[first:stop] == doc[row]).all()  # never across a document boundary
        assert stop - row <= 5 and row - first <= 10
        assert first == max(0, row - 10) or doc[first - 1] != doc[row]  # as long as the document allows
        assert context.tokens == [chr(int(t)) for t in ids[first:stop]]
        assert np.allclose(context.values, z[first:stop, 7].numpy())


def test_token_display_makes_bytes_printable():
    show = token_display(ByteTokenizer())
    assert [show(t) for t in (ord("a"), 10, 9, 0xE2, 256)] == ["a", "↵", "⇥", "\\xe2", "⟨BOS⟩"]
    assert token_display(None)(42) == "⟨42⟩"


# ----------------------------------------------------------------------------- directions
def test_logit_lens_is_the_centred_scaled_direction_through_the_unembedding():
    from transformers import GPT2LMHeadModel

    from dictlearn.models.tiny import tiny_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(n_layer=1, n_embd=32, n_head=2, context=16)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
    lens = unembedding(model)
    assert lens.centre and lens.norm_path == "transformer.ln_f"
    d = torch.randn(3, 32)
    W_U, gamma = model.lm_head.weight.double(), model.transformer.ln_f.weight.double()
    reference = ((d.double() - d.double().mean(-1, keepdim=True)) * gamma) @ W_U.T
    assert torch.allclose(lens.lens(d).double(), reference, atol=1e-5)
    # exactly the direct-path change of the logits for a direction orthogonal to the residual (no
    # change of σ to first order): LN(x + εd) − LN(x) = ε γ ⊙ d̄ / σ(x)
    x = torch.randn(32, dtype=torch.float64)
    x_bar = x - x.mean()
    u = d[0].double() - d[0].double().mean()
    u = u - (u @ x_bar) / (x_bar @ x_bar) * x_bar  # centred and orthogonal to x̄
    ln = lambda v: torch.nn.functional.layer_norm(v, (32,), gamma, model.transformer.ln_f.bias.double(), 1e-5)
    eps = 1e-6
    change = (ln(x + eps * u) - ln(x)) @ W_U.T / eps
    sigma = (x_bar.pow(2).mean() + 1e-5).sqrt()
    assert torch.allclose(change, lens.lens(u.float()[None])[0].double() / sigma, rtol=1e-3, atol=1e-4)


def test_top_tokens_respect_the_allowed_set():
    logits = torch.tensor([5.0, -4.0, 3.0, 9.0, -8.0])
    up, down = top_tokens(logits, 2, allowed=torch.tensor([True, True, True, False, False]))
    assert up == [(0, 5.0), (2, 3.0)] and down == [(1, -4.0), (2, 3.0)]


def test_nearest_latents_equal_brute_force():
    W = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    found = nearest_latents(W, [0, 7, 299], k=4, chunk=2)
    unit = W.double() / W.double().norm(dim=-1, keepdim=True)
    for latent, neighbours in found.items():
        cos = unit @ unit[latent]
        cos[latent] = -2
        expected = cos.argsort(descending=True)[:4].tolist()
        assert [o for o, _ in neighbours] == expected
        assert np.allclose([c for _, c in neighbours], cos[expected].numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- the page
class _Checker(html.parser.HTMLParser):
    """Collects tags, ids, links and resource references; checks that tags nest."""

    VOID = {"meta", "br", "img", "link", "input", "hr", "rect", "path"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.links, self.resources, self.errors = [], set(), [], [], []
        self.style = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.links.append(attrs.get("href", ""))
        for name in ("src", "srcset", "data", "poster"):
            if name in attrs:
                self.resources.append(attrs[name])
        if tag in ("link", "iframe", "img", "object", "embed") or (tag == "script" and "src" in attrs):
            self.resources.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "style":
            self.style += data

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def _check_page(text: str, cards: list[int]) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert not checker.resources
    assert all(link.startswith("#") for link in checker.links), [l for l in checker.links if not l.startswith("#")]
    assert {link[1:] for link in checker.links} <= checker.ids  # every link lands on the page
    assert {f"f{c}" for c in cards} <= checker.ids and "index" in checker.ids
    assert "url(" not in checker.style and "@import" not in checker.style
    return checker


@pytest.mark.slow
def test_dashboard_of_an_embedded_model_export_parses_and_is_self_contained(embedded, tmp_path):
    export_dir, data = embedded
    out = tmp_path / "page.html"
    inspect(export_dir, data, out, InspectOptions(cards=4, extremes=2, rows=3000), echo=False)
    text = out.read_text()
    cards = [int(i) for i in __import__("re").findall(r'<section class="card" id="f(\d+)"', text)]
    assert len(cards) >= 4
    _check_page(text, cards)
    assert "Logit lens" in text and "transformer.ln_f" in text
    # the statistics steering reads were recorded beside the weights
    from dictlearn.interpret import export_statistics

    saved = export_statistics.read(export_dir)
    assert saved is not None and saved.max_activation.shape == (64,) and float(saved.max_activation.max()) > 0


def test_dashboard_without_model_or_tokens_still_renders(small, tmp_path):
    dictionary, path, z = small
    from dictlearn.evaluate import Entry

    entry = Entry(dictionary, {"architecture": "topk", "metadata": {}}, None)
    board = build_dashboard(entry, path, InspectOptions(features=(3, 3, 11), input_key="acts", rows=None))
    assert [c.latent for c in board.cards] == [3, 11] and board.lens is None and board.concepts is None
    card = board.cards[0]
    top_row = int(z[:, 3].argmax())
    assert card.top[0].row == top_row and abs(card.top[0].value - float(z[top_row, 3])) < 1e-6
    assert abs(card.density - float((z[:, 3] != 0).double().mean())) < 1e-12
    text = render(board)
    _check_page(text, [3, 11])
    assert text.count("<tr>") >= int((z != 0).any(0).sum())  # one index row per alive latent



def test_the_header_names_the_trained_class_not_only_the_saved_format(small):
    """A BatchTopK export is stored as a SAELens 'jumprelu'; the page must still say BatchTopK."""
    from dictlearn import BatchTopKSAE
    from dictlearn.evaluate import Entry

    _, path, _ = small
    torch.manual_seed(0)
    dictionary = BatchTopKSAE(d_in=16, d_sae=48, k=4)
    entry = Entry(dictionary, {"architecture": "jumprelu", "metadata": {}}, None)
    board = build_dashboard(entry, path, InspectOptions(features=(2, 2, 5), input_key="acts", rows=None))
    described = dict(board.facts)["dictionary"]
    assert "BatchTopKSAE, SAE, saved as SAELens 'jumprelu'; d_in 16, d_sae 48" in described

# ----------------------------------------------------------------------------- bad input
def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(embedded, tmp_path, capsys):
    export_dir, data = embedded
    code, err = _run(["inspect", str(export_dir), "--data", str(data), "--features", "3,64", "--out",
                      str(tmp_path / "x.html")], capsys)
    assert code == 2 and "--features 64" in err and "0..63" in err and len(err.splitlines()) == 1
    # an export whose width does not match the file (a 16-wide dictionary on the 128-wide residual)
    narrow = export(random_topk(16, 32, 4), tmp_path / "narrow", {"model_name": TINY_NAME, "hook_name": HOOK})
    code, err = _run(["inspect", str(narrow), "--data", str(data), "--out", str(tmp_path / "y.html")], capsys)
    assert code == 2 and "width 128" in err and "d_in=16" in err and len(err.splitlines()) == 1
    # a model without the export's hook: a one-layer copy of the embedded architecture
    from transformers import GPT2LMHeadModel

    from dictlearn.models.tiny import tiny_config

    GPT2LMHeadModel(tiny_config(n_layer=1)).save_pretrained(tmp_path / "one_layer")
    capsys.readouterr()  # transformers' progress bar
    code, err = _run(["inspect", str(export_dir), "--data", str(data), "--model", str(tmp_path / "one_layer"),
                      "--out", str(tmp_path / "z.html")], capsys)
    assert code == 2 and "transformer.h.2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "z.html").exists()


def test_best_concept_is_the_brute_force_best_f1(small, tmp_path):
    """A file with concept labels: each card's best concept and F1 equal a brute-force F1 over
    the labelled rows (2 TP / (fires + positives))."""
    from dictlearn.evaluate import Entry
    from dictlearn.data.concepts import write_concept_labels

    dictionary, path, z = small
    with h5py.File(path) as f:
        arrays = {k: f[k][:] for k in ("acts", "token_ids", "doc_index")}
    n = len(z)
    rng = np.random.default_rng(5)
    fires = (z > 0).numpy()
    # concept "a" is latent 2's firing with 10 % of rows flipped; "b" is random
    values = np.stack([fires[:, 2] ^ (rng.random(n) < 0.1), rng.random(n) < 0.3], axis=1)
    labelled = rng.random(n) < 0.9
    values[~labelled] = False
    labelled_path = tmp_path / "labelled.h5"
    with h5py.File(labelled_path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        write_concept_labels(f, ["a", "b"], values, labelled)
    entry = Entry(dictionary, {"architecture": "topk", "metadata": {}}, None)
    board = build_dashboard(entry, str(labelled_path), InspectOptions(features=(2, 9), input_key="acts", rows=None))
    f_l, y = fires[labelled].astype(float), values[labelled].astype(float)
    f1 = 2 * (f_l.T @ y) / (f_l.sum(0)[:, None] + y.sum(0)[None, :])
    for card in board.cards:
        best = int(f1[card.latent].argmax())
        assert card.concept[0] == ["a", "b"][best] and card.concept[1] == pytest.approx(f1[card.latent, best])
    assert board.cards[0].concept[0] == "a" and board.cards[0].concept[1] > 0.5
    assert set(board.concepts) == set(np.nonzero(fires.any(0))[0].tolist())
    assert "best concept" in render(board)


def test_compare_draws_one_dashboard_per_architecture_and_the_report_links_them(tmp_path):
    from dictlearn.analysis.render import html_page, markdown
    from dictlearn.analysis.report import dashboard_blocks
    from dictlearn.compare.plan import CompareConfig, plan
    from dictlearn.compare.run import dashboard_members

    planned = plan(CompareConfig(architectures=["topk", "relu_l1"], l0=[8, 32, 16], seeds=[3, 1], d_sae=[64]).resolved())
    chosen = dashboard_members(planned)
    assert [(p.architecture, p.l0_target, p.seed) for p in chosen] == [("topk", 16, 3), ("relu_l1", 16, 3)]
    assert dashboard_blocks(tmp_path) == []
    (tmp_path / "dashboards").mkdir()
    for name in ("topk", "relu_l1"):
        (tmp_path / "dashboards" / f"{name}.html").write_text("<html></html>")
    blocks = dashboard_blocks(tmp_path)
    assert "- [relu_l1](dashboards/relu_l1.html)" in markdown(blocks, tmp_path)
    assert '<a href="dashboards/topk.html">topk</a>' in html_page(blocks, "t")
