"""A report as a list of blocks, rendered twice: Markdown beside its figures, and one
self-contained HTML file (figures embedded as base64 PNG) that opens from disk anywhere.

Text inside blocks may use two inline marks, `code` and **bold**; both renderers know them.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    swatch_column: int | None = None  # its cells start with an architecture: HTML adds its colour


@dataclass(frozen=True)
class Legend:
    """The architectures' colours and markers, as every figure draws them."""

    items: tuple[tuple[str, str, str], ...]  # (architecture, colour, matplotlib marker)


@dataclass(frozen=True)
class Image:
    png: Path
    caption: str
    number: int = 0  # "Figure N." when > 0


@dataclass(frozen=True)
class Code:
    text: str
    summary: str  # the HTML shows it folded under this line


@dataclass(frozen=True)
class Links:
    """A list of links to files beside the report (e.g. the dashboards): (text, relative path)."""

    items: tuple[tuple[str, str], ...]


def markdown(blocks: list, base: Path) -> str:
    """Markdown; image links are relative to `base` (the report's folder)."""
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            cells = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
            rule = cells(["---"] * len(block.header))
            out.append("\n".join([cells(block.header), rule] + [cells(r) for r in block.rows]))
        elif isinstance(block, Image):
            link = Path(os.path.relpath(block.png, base)).as_posix()
            out.append(f"![{block.caption}]({link})\n\n{_figure_label(block)}{block.caption}")
        elif isinstance(block, Legend):
            out.append("Markers: " + ", ".join(f"{GLYPHS.get(m, '●')} {a}" for a, _, m in block.items))
        elif isinstance(block, Code):
            out.append(f"{block.summary}\n\n```\n{block.text.rstrip()}\n```")
        elif isinstance(block, Links):
            out.append("\n".join(f"- [{text}]({href})" for text, href in block.items))
    return "\n\n".join(out) + "\n"


#: matplotlib marker -> the Unicode glyph that looks like it, for legends in text
GLYPHS = {"o": "●", "s": "■", "^": "▲", "D": "◆", "v": "▼", "P": "✚", "X": "✖", "h": "⬢", "p": "⬟",
          "*": "★", "<": "◀", ">": "▶", "d": "◆", "H": "⬢", "8": "●"}


def _figure_label(block: Image) -> str:
    return f"**Figure {block.number}.** " if block.number else ""


def _swatch(colour: str, marker: str) -> str:
    return f'<span class="sw" style="color:{colour}">{GLYPHS.get(marker, "●")}</span>'


def inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1b1b1b;
       max-width: 1180px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; border-bottom: 1px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
code { font: 0.9em ui-monospace, Menlo, Consolas, monospace; background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 0.85em; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.82em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .25em .6em; text-align: left; white-space: nowrap; }
th { background: #fafafa; border-bottom: 2px solid #ccc; }
th.n, td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:hover td { background: #f7fbff; }
figure { margin: 1.5em 0; }
figure img { width: 100%; max-width: 860px; height: auto; display: block; }
.sw { font-size: 1.05em; margin-right: .25em; }
.legend span.item { margin-right: 1.1em; white-space: nowrap; }
figcaption { font-size: 0.9em; color: #444; margin-top: .3em; }
details summary { cursor: pointer; color: #333; }
"""


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?\s*%?|–", text.strip()))


def _table_html(block: Table, swatches: dict[str, str]) -> str:
    """Columns of numbers (a dash for a missing one) are right-aligned, header included."""
    numeric = [all(_is_number(row[i]) for row in block.rows) for i in range(len(block.header))]
    cls = lambda i: ' class="n"' if numeric[i] else ""
    head = "".join(f"<th{cls(i)}>{inline_html(h)}</th>" for i, h in enumerate(block.header))
    rows = []
    for row in block.rows:
        cells = []
        for i, cell in enumerate(row):
            text = inline_html(cell)
            if i == block.swatch_column:
                text = swatches.get(cell, swatches.get(cell.split(" ")[0], "")) + text
            cells.append(f"<td{cls(i)}>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def html_page(blocks: list, title: str) -> str:
    """One HTML page with no external reference: CSS inline, PNGs as data URIs."""
    swatches = {a: _swatch(c, m) for block in blocks if isinstance(block, Legend) for a, c, m in block.items}
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            body.append(_table_html(block, swatches))
        elif isinstance(block, Legend):
            items = "".join(f'<span class="item">{_swatch(c, m)}{html.escape(a)}</span>' for a, c, m in block.items)
            body.append(f'<p class="legend">{items}</p>')
        elif isinstance(block, Image):
            data = base64.b64encode(Path(block.png).read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                        f"<figcaption>{inline_html(_figure_label(block) + block.caption)}</figcaption></figure>")
        elif isinstance(block, Code):
            body.append(f"<details><summary>{inline_html(block.summary)}</summary>"
                        f"<pre>{html.escape(block.text)}</pre></details>")
        elif isinstance(block, Links):
            body.append("<ul>" + "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>'
                                         for text, href in block.items) + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")
