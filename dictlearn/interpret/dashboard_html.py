"""A `Dashboard` as one self-contained HTML page: inline CSS and SVG, no external resource.

Everything is readable with JavaScript off; the only script sorts the index table when a column
header is clicked. Token shading uses ten CSS classes (a1..a9, by the value's share of the
latent's maximum) instead of an inline style per token, which keeps pages of thousands of
contexts small.
"""

from __future__ import annotations

import html
import math

from dictlearn.interpret.contexts import Context
from dictlearn.interpret.cards import Card, Dashboard, Interval

LEVELS = 9
_SHADES = "".join(f".a{i}{{background:rgba(249,115,22,{i / LEVELS * 0.85:.3f})}}" for i in range(1, LEVELS + 1))
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:18px 22px}
h1{font-size:21px;margin:6px 0 10px}h2{font-size:17px;margin:0}h3{font-size:13px;margin:12px 0 4px;color:#57606a;
text-transform:uppercase;letter-spacing:.04em}
#index{margin-top:14px}a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse}.facts td{padding:1px 14px 1px 0;vertical-align:top}.facts td:first-child{color:#57606a}
.index{max-height:420px;overflow:auto;border:1px solid #d0d7de;background:#fff;margin:6px 0 4px}
.index table{width:100%}.index th{position:sticky;top:0;background:#eef1f4;cursor:pointer;padding:4px 10px;
text-align:right;user-select:none}.index td{text-align:right;padding:1px 10px;font-variant-numeric:tabular-nums}
.index tr:nth-child(even){background:#f6f8fa}.index td.t,.index th.t{text-align:left}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:16px 0;padding:12px 16px}
.role{font-size:12px;color:#fff;background:#6e7781;border-radius:9px;padding:1px 8px;margin-left:6px;vertical-align:2px}
.stats{color:#57606a;margin:2px 0 6px}.cols{display:grid;grid-template-columns:minmax(0,1fr) 340px;gap:20px}
.ctx{font:12px/1.65 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre;overflow:hidden;
text-overflow:ellipsis;border-bottom:1px solid #f0f1f3}
.ctx .v{display:inline-block;min-width:4.2em;color:#57606a;text-align:right;margin-right:10px}
.ctx .l{display:inline-flex;justify-content:flex-end;overflow:hidden;vertical-align:bottom}
.ctx .f{outline:1.5px solid #9a3412;font-weight:700}.ctx .r{color:#8c959f}
.lens td{padding:0 8px 0 0;font-variant-numeric:tabular-nums}.lens code{background:#f6f8fa;padding:0 3px}
.family td,.family th{padding:1px 14px 1px 0;text-align:left;font-variant-numeric:tabular-nums}
.family th{color:#57606a;font-weight:600}.family tr.parent td:first-child{color:#8250df}
.family tr.child td:first-child{color:#0969da}
.up{color:#1a7f37}.down{color:#cf222e}.muted{color:#57606a}.nb{margin:0;padding-left:18px}
""" + _SHADES

SCRIPT = """document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], rows = Array.from(body.rows), up = th.dataset.up !== "1";
  th.dataset.up = up ? "1" : "0";
  const key = r => r.cells[i].dataset.v ?? r.cells[i].textContent;
  rows.sort((a, b) => { const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const c = isNaN(nx) || isNaN(ny) ? String(x).localeCompare(String(y)) : nx - ny; return up ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}));"""

esc = html.escape


def render(dashboard: Dashboard) -> str:
    """The whole page."""
    carded = {card.latent for card in dashboard.cards}
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(dashboard.title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body><main>',
        f"<h1>{esc(dashboard.title)}</h1>", _facts(dashboard), _index(dashboard, carded), _card_links(dashboard),
        *(_card(card, dashboard, carded) for card in dashboard.cards), _notes(dashboard),
        f"</main><script>{SCRIPT}</script></body></html>\n",
    ]
    return "".join(parts)


def _facts(dashboard: Dashboard) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in dashboard.facts)
    return f'<table class="facts">{rows}</table>'


def _percent(x: float) -> str:
    return f"{100 * x:.3g} %" if x >= 1e-4 else f"{100 * x:.2g} %"


def _index(dashboard: Dashboard, carded: set[int]) -> str:
    stats, concepts = dashboard.stats, dashboard.concepts
    alive = stats.alive.nonzero().flatten()
    order = alive[stats.density[alive].argsort(descending=True)].tolist()
    head = ['<th class="t">latent</th>', "<th>density</th>", "<th>max act.</th>", "<th>mean act.</th>"]
    if concepts is not None:
        head += ['<th class="t">best concept</th>', "<th>F1</th>"]
    rows = []
    for latent in order:
        density, top, mean = float(stats.density[latent]), float(stats.max_activation[latent]), float(stats.mean_activation[latent])
        name = f'<a href="#f{latent}">{latent}</a>' if latent in carded else str(latent)
        cells = [f'<td class="t" data-v="{latent}">{name}</td>', f'<td data-v="{density:.6g}">{_percent(density)}</td>',
                 f"<td>{top:.3g}</td>", f"<td>{mean:.3g}</td>"]
        if concepts is not None:
            concept = concepts.get(latent)
            cells += [f'<td class="t">{esc(concept[0]) if concept else "–"}</td>',
                      f'<td data-v="{concept[1] if concept else -1:.4f}">{f"{concept[1]:.2f}" if concept else "–"}</td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<h2 id="index">Index: {len(order):,} alive latents</h2><p class="muted">Sorted by density; click a '
            f'column to sort (JavaScript). Latent numbers with a card link to it.</p><div class="index">'
            f'<table class="sortable"><thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _card_links(dashboard: Dashboard) -> str:
    links = " · ".join(f'<a href="#f{c.latent}">{c.latent}</a>' for c in dashboard.cards)
    return f'<p><b>Cards</b> ({len(dashboard.cards)}): {links}</p>'


def _card(card: Card, dashboard: Dashboard, carded: set[int]) -> str:
    fired = int(dashboard.stats.fire_count[card.latent])
    stats = (f"density {_percent(card.density)} ({fired:,} of {dashboard.stats.n_rows:,} rows) · max activation "
             f"{card.max_activation:.4g} · mean when firing {card.mean_activation:.4g}")
    if card.concept is not None:
        stats += f" · best concept <b>{esc(card.concept[0])}</b> (F1 {card.concept[1]:.2f})"
    before = dashboard.window[0]
    left = "<h3>Top activations</h3>" + _contexts(card.top, card.max_activation, before)
    left += "".join(_interval(interval, card.max_activation, before) for interval in card.intervals)
    right = "<h3>Activation histogram</h3>" + _histogram(card, dashboard.stats.intervals)
    if card.promoted:
        right += "<h3>Logit lens</h3>" + _lens(card)
    if card.neighbours:
        right += "<h3>Nearest latents (decoder cosine)</h3>" + _neighbours(card, carded)
    extra = "".join(f"<h3>{esc(s.title)}</h3>{s.html}" for s in card.extra)
    return (f'<section class="card" id="f{card.latent}"><h2>Latent {card.latent}<span class="role">{esc(card.role)}'
            f'</span></h2><div class="stats">{stats} · <a href="#index">index</a></div>'
            f'<div class="cols"><div>{left}</div><div>{right}</div></div>{extra}</section>')


def _contexts(contexts: list[Context], top: float, before: int) -> str:
    if not contexts:
        return '<p class="muted">none</p>'
    return "".join(_context(c, top, before) for c in contexts)


def _context(context: Context, top: float, before: int) -> str:
    """One line: the value at the focus, the tokens before it right-aligned in a box of `before`
    characters (so the focus tokens of a list line up; longer text is cut on the left), the
    focus (outlined) and the tokens after it, shaded by value; row numbers when there is no text."""
    if not context.tokens:
        return (f'<div class="ctx"><span class="v">{context.value:.3g}</span><span class="r">row '
                f'{context.row:,}</span></div>')
    spans = [_token(text, value, top, i == context.focus)
             for i, (text, value) in enumerate(zip(context.tokens, context.values))]
    left, right = "".join(spans[: context.focus]), "".join(spans[context.focus :])
    return (f'<div class="ctx" title="row {context.row:,}"><span class="v">{context.value:.3g}</span>'
            f'<span class="l" style="width:{before + 1}ch">{left}</span>{right}</div>')


def _token(text: str, value: float, top: float, focus: bool) -> str:
    level = min(LEVELS, math.ceil(value / top * LEVELS)) if top > 0 and value > 0 else 0
    classes = " ".join(([f"a{level}"] if level else []) + (["f"] if focus else []))
    return f'<span class="{classes}" title="{value:.4g}">{esc(text)}</span>' if classes else esc(text)


def _interval(interval: Interval, top: float, before: int) -> str:
    return (f"<h3>Interval {interval.low:.3g}–{interval.high:.3g} holds {_percent(interval.fraction)}</h3>"
            + _contexts(interval.contexts, top, before))


def _histogram(card: Card, intervals: int, width: int = 330, height: int = 110) -> str:
    """Inline SVG: one bar per bin of (0, max], intervals on alternating backgrounds."""
    counts, n = card.histogram, len(card.histogram)
    peak = max(counts) or 1
    bar = width / n
    per = n // intervals
    shade = "".join(f'<rect x="{j * per * bar:.1f}" y="0" width="{per * bar:.1f}" height="{height}" fill="#f3f4f6"/>'
                    for j in range(0, intervals, 2))
    bars = "".join(f'<rect x="{i * bar + 0.5:.1f}" y="{height - c / peak * height:.1f}" width="{max(bar - 1, 0.5):.1f}" '
                   f'height="{c / peak * height:.1f}" fill="#f97316"><title>{c:,}</title></rect>'
                   for i, c in enumerate(counts) if c)
    labels = (f'<text x="0" y="{height + 13}" font-size="11" fill="#57606a">0</text>'
              f'<text x="{width}" y="{height + 13}" font-size="11" fill="#57606a" text-anchor="end">'
              f"{card.max_activation:.3g}</text>"
              f'<text x="{width / 2}" y="{height + 13}" font-size="11" fill="#57606a" text-anchor="middle">'
              f"activation (peak bin {peak:,} rows)</text>")
    return (f'<svg width="{width}" height="{height + 16}" viewBox="0 0 {width} {height + 16}" role="img" '
            f'aria-label="activation histogram">{shade}{bars}{labels}</svg>')


def _lone(text: str) -> str:
    """A token shown on its own: its spaces visible (␣)."""
    return esc(text.replace(" ", "␣"))


def _lens(card: Card) -> str:
    rows = "".join(
        f'<tr><td><code>{_lone(u[0])}</code></td><td class="up">{u[1]:+.2f}</td>'
        f'<td><code>{_lone(d[0])}</code></td><td class="down">{d[1]:+.2f}</td></tr>'
        for u, d in zip(card.promoted, card.suppressed))
    return f'<table class="lens"><tr><th>promoted</th><th></th><th>suppressed</th><th></th></tr>{rows}</table>'


def _neighbours(card: Card, carded: set[int]) -> str:
    link = lambda other: f'<a href="#f{other}">{other}</a>' if other in carded else str(other)
    items = "".join(f'<li>{link(o)} <span class="muted">{cos:.3f}</span></li>' for o, cos in card.neighbours)
    return f'<ol class="nb">{items}</ol>'


def _notes(dashboard: Dashboard) -> str:
    stats = dashboard.stats
    notes = [
        f"Statistics: two streaming passes over rows {stats.first_row:,}–{stats.first_row + stats.n_rows - 1:,} "
        "(pass 1: counts and the running top activations, whose first is the maximum; pass 2: the histogram on "
        "equal-width bins of (0, max] and a uniform sample of each interval, by smallest random key).",
        "A latent fires where its value is non-zero; density is the fraction of the rows inspected.",
        f"Contexts: up to {dashboard.window[0]} tokens before and {dashboard.window[1]} after the activating token "
        "(outlined), within its document; "
        "shading is the token's value as a share of the latent's maximum; hover a token for its value.",
    ]
    if dashboard.lens:
        notes.append(f"Logit lens: {dashboard.lens} — the direct effect of one unit of the latent on the logits "
                     "(later blocks ignored).")
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f'<h2>How this page was made</h2><ul class="muted">{items}</ul>'
