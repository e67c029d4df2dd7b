"""A latent's family across dictionary sizes, on its dashboard card (issue 15).

Dictionaries of one architecture at several widths (a `dictlearn compare --d-sae 512,1024,...`
sweep) get one dashboard each; a card whose latent has children in the next width, or a parent in
the previous one, lists them: the width, the latent (a link to its card in that width's page when
it has one), the decoder cosine and its best concept label with F1. Parent and children are the
matches of splitting.py: a large latent's parent is the small latent its decoder row is closest to,
kept at cosine >= MIN_COS, as the analysis figure (analysis/splitting.py) draws them.

So that a family is there to see, each page also gets cards for it: the smallest width the
`FAMILY_PARENTS` best-ranked parents (`rank_parents`: the families their concept labels name best
first), each next width the children (up to `FAMILY_CHILDREN` per parent) of the previous width's
family cards. Latents that never fire on the rows the dashboards read take part in no match; the
concept labels come from the same rows (`splitting.rows_pass`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from dictlearn.evaluate import Entry
from dictlearn.interpret.cards import Section
from dictlearn.interpret.dashboard import InspectOptions, build_dashboard, check_hooks, input_array
from dictlearn.interpret.dashboard_html import render
from dictlearn.interpret.splitting import SizePair, rank_parents, rows_pass, size_ladder
from dictlearn.io import atomic_write_text

MIN_COS = 0.5  # a child's decoder cosine with its parent (analysis/splitting.py MIN_COS)
FAMILY_PARENTS, FAMILY_CHILDREN = 2, 6


@dataclass(frozen=True)
class Relative:
    """A latent of another width in a card's family."""

    relation: str  # "parent" or "child"
    d_sae: int
    latent: int
    cos: float
    concept: tuple[str, float] | None


@dataclass
class Ladder:
    """Widths of one architecture (ascending), each width's match with the next, and concepts."""

    widths: list[int]
    pairs: list[SizePair]  # pairs[i]: widths[i] -> widths[i + 1]
    concepts: dict[int, list[tuple[str, float]]] | None  # per width, each latent's best (concept, F1)

    @classmethod
    def of(cls, dictionaries: dict, data: str | None = None, input_key: str | None = None, rows: int = 20_000,
           device: str = "cpu") -> Ladder:
        """{d_sae: Dictionary} (two or more) -> their ladder. With `data`: matched among the latents
        that fire on its first `rows` rows, with concepts when it has labels (`rows_pass`)."""
        seen = rows_pass(dictionaries, data, input_key, rows, device) if data and input_key else None
        pairs = size_ladder({d: m.W_dec for d, m in dictionaries.items()}, alive=seen.alive if seen else None)
        return cls(sorted(dictionaries), pairs, seen.concepts if seen else None)

    def _concept(self, d_sae: int, latent: int):
        return self.concepts[d_sae][latent] if self.concepts is not None else None

    def relatives(self, d_sae: int, latent: int, min_cos: float = MIN_COS) -> list[Relative]:
        """The latent's parent in the previous width (if it matches one at >= min_cos), then its
        children in the next width, best cosine first."""
        i = self.widths.index(d_sae)
        found = []
        if i > 0:
            pair = self.pairs[i - 1]
            cos = float(pair.parent_cos[latent])
            if cos >= min_cos:
                parent = int(pair.parent[latent])
                found.append(Relative("parent", pair.small, parent, cos, self._concept(pair.small, parent)))
        if i < len(self.pairs):
            pair = self.pairs[i]
            found += [Relative("child", pair.large, child, cos, self._concept(pair.large, child))
                      for child, cos in pair.children(latent, min_cos)]
        return found

    def family_cards(self, parents: int = FAMILY_PARENTS, children: int = FAMILY_CHILDREN) -> dict[int, list[int]]:
        """{d_sae: latents to draw a card for}: the best-ranked parents at the smallest width, then
        at each width the children of the previous width's family cards."""
        first = self.pairs[0]
        labels = (self.concepts[first.small], self.concepts[first.large]) if self.concepts else ()
        cards = {first.small: rank_parents(first, *labels, min_cos=MIN_COS)[:parents]}
        for pair in self.pairs:
            cards[pair.large] = [c for p in cards[pair.small] for c, _ in pair.children(p, MIN_COS)[:children]]
        return cards


def family_section(ladder: Ladder, d_sae: int, pages: dict[int, tuple[str, set[int]]]):
    """A SectionMaker (dashboard.py) for the cards of width `d_sae`: its family as a table.
    pages: {d_sae: (the page's file name, the latents it has cards for)}, for the links."""
    def make(card) -> Section | None:
        relatives = ladder.relatives(d_sae, card.latent)
        if not relatives:
            return None
        return Section(f"Family across sizes (decoder cosine ≥ {MIN_COS})",
                       family_table(relatives, pages))

    return make


def family_table(relatives: list[Relative], pages: dict[int, tuple[str, set[int]]]) -> str:
    """HTML rows: relation, d_sae, latent (linked when its page has a card for it), cosine, concept, F1."""
    rows = []
    for r in relatives:
        page, carded = pages.get(r.d_sae, (None, set()))
        latent = (f'<a href="{html.escape(page)}#f{r.latent}">{r.latent}</a>' if page and r.latent in carded
                  else str(r.latent))
        concept = (f"<td>{html.escape(r.concept[0])}</td><td>{r.concept[1]:.2f}</td>" if r.concept
                   else "<td>–</td><td>–</td>")
        rows.append(f'<tr class="{r.relation}"><td>{r.relation}</td><td>{r.d_sae}</td><td>{latent}</td>'
                    f"<td>{r.cos:.3f}</td>{concept}</tr>")
    head = "<tr><th>relation</th><th>d_sae</th><th>latent</th><th>cosine</th><th>best concept</th><th>F1</th></tr>"
    return f'<table class="family">{head}{"".join(rows)}</table>'


def ladder_dashboards(exports: dict[int, str | Path], data: str | Path, pages: dict[int, Path], options=None,
                      lm=None) -> list[Path]:
    """One dashboard per width of `exports` ({d_sae: export folder}, one architecture) on `data`,
    written to `pages` ({d_sae: html path}, one folder), each card with its family and each page
    with cards for the ladder's family (`Ladder.family_cards`). lm: the loaded model or None."""
    options = options or InspectOptions()
    data = str(data)
    entries = {d: Entry.from_path(path) for d, path in exports.items()}
    if lm is not None:
        for entry in entries.values():
            check_hooks(entry, lm)
    first = entries[min(entries)]
    key = input_array(first, data, options.input_key).key
    rows = options.rows or input_array(first, data, options.input_key).n_rows
    ladder = Ladder.of({d: e.dictionary.to(options.device).eval() for d, e in entries.items()}, data, key, rows,
                       options.device)
    family = ladder.family_cards()
    boards = {d: build_dashboard(entries[d], data, options, lm, also=family[d]) for d in ladder.widths}
    links = {d: (Path(pages[d]).name, {card.latent for card in boards[d].cards}) for d in ladder.widths}
    for d, board in boards.items():
        section = family_section(ladder, d, links)
        for card in board.cards:
            card.extra += [s for s in (section(card),) if s is not None]
        atomic_write_text(pages[d], render(board))
    return [Path(pages[d]) for d in ladder.widths]
