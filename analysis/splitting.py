"""Feature splitting across dictionary sizes: decoder-cosine matches between each width and the next.

Drawn when the results hold one architecture at two or more `d_sae` (a `dictlearn compare
--d-sae 512,1024,2048,4096` sweep; lowest seed, the L0 target most widths share). Left: per size
pair, the distribution of each small latent's best cosine in the next larger dictionary (MMCS in
the legend). Right: one family, a small latent and its children in the next size (the large
latents whose best small match it is, cosine >= 0.5), each with its best concept label by F1
(when the activation file carries concept labels) and the bytes its decoder row promotes (logit
lens, when the model loads). The family shown is the one its labels name best (a labelled parent
with two or more children, by its F1 plus its labelled children's F1s), else the parent with the
most children (`splitting.rank_parents`). Matching: dictlearn/interpret/splitting.py.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import site_suffix, site_title
from dictlearn.analysis.results import is_outside
from dictlearn.analysis.style import Drawn, new_figure, save, styled

MIN_COS = 0.5  # a child's cosine with its parent
LABEL_ROWS = 20_000  # first rows of the activation file used to label latents (seconds on a CPU)
MIN_F1 = 0.2  # a concept label below this F1 is not shown


@dataclass
class Member:
    """One latent of a family: its index, cosine with the parent, concept label and promoted bytes."""

    latent: int
    cos: float = 1.0
    concept: tuple[str, float] | None = None
    promoted: list[str] = field(default_factory=list)

    def text(self, indent: str = "") -> str:
        """`#latent  concept (F1 ..)`, and on a second line the bytes it promotes."""
        label = f"{self.concept[0]} (F1 {self.concept[1]:.2f})" if self.concept and self.concept[1] >= MIN_F1 else "—"
        bytes_ = " ".join(self.promoted[:4])
        return f"#{self.latent}  {label}" + (f"\n{indent}promotes {bytes_}" if bytes_ else "")


@dataclass
class Family:
    small: int
    large: int
    parent: Member
    children: list[Member]


def ladder_lines(lines: list[dict]) -> tuple[str, dict[int, dict]] | None:
    """(architecture, {d_sae: line}) of the architecture with the most widths (>= 2), else None."""
    by_arch: dict[str, dict[int, dict]] = defaultdict(dict)
    lines = [line for line in lines if not is_outside(line)]  # not trained here: no family of widths
    targets = Counter((l["architecture"], l.get("l0_target")) for l in lines if l.get("export"))
    for line in sorted(lines, key=lambda l: (l.get("seed") or 0)):
        arch, d_sae = line["architecture"], line.get("d_sae")
        best_target = max((t for (a, t), _ in targets.items() if a == arch), key=lambda t: targets[(arch, t)],
                          default=None)
        if d_sae and line.get("export") and line.get("l0_target") == best_target:
            by_arch[arch].setdefault(int(d_sae), line)
    arch = max(by_arch, key=lambda a: len(by_arch[a]), default=None)
    return (arch, by_arch[arch]) if arch is not None and len(by_arch[arch]) >= 2 else None


def _lens(line: dict):
    """A function latent directions [n, d] -> promoted bytes (top 4 each), or None without a model."""
    name = line.get("model_name") or line.get("model")
    if not name:
        return None
    try:
        from dictlearn.interpret.contexts import token_display
        from dictlearn.interpret.directions import top_tokens, unembedding
        from dictlearn.models.loading import load_model

        lm = load_model(name)
        lens, show = unembedding(lm.model), token_display(lm.tokenizer)
    except Exception:  # no model recorded or it does not load: the family is drawn without bytes
        return None

    def promoted(directions):
        return [[show(t) for t, _ in top_tokens(logits, 4)[0]] for logits in lens.lens(directions)]

    return promoted


def find_family(lines_by_size: dict[int, dict]) -> tuple[list, Family]:
    """Load the ladder's exports, match them, pick and label a family. -> (SizePairs, Family)."""
    from dictlearn.export import load
    from dictlearn.interpret.splitting import rank_parents, rows_pass, size_ladder

    dictionaries = {d: load(line["export"]) for d, line in lines_by_size.items()}
    line = lines_by_size[min(lines_by_size)]
    seen = None  # without the activation file every latent takes part and nothing is labelled
    if line.get("data") and line.get("input_key") and Path(line["data"]).is_file():
        seen = rows_pass(dictionaries, line["data"], line["input_key"], LABEL_ROWS)
    pairs = size_ladder({d: m.W_dec for d, m in dictionaries.items()}, alive=seen.alive if seen else None)
    first = pairs[0]
    labels = seen.concepts if seen else None
    ranked = rank_parents(first, *((labels[first.small], labels[first.large]) if labels is not None else ()),
                          min_cos=MIN_COS, min_f1=MIN_F1)
    parent = ranked[0] if ranked else 0
    children = first.children(parent, MIN_COS)
    members = [Member(parent)] + [Member(i, c) for i, c in children]
    promoted = _lens(line)
    for role, member in enumerate(members):
        width = first.small if role == 0 else first.large
        if labels is not None:
            member.concept = labels[width][member.latent]
        if promoted is not None:
            W = dictionaries[width].W_dec.detach()
            member.promoted = promoted(W[member.latent : member.latent + 1])[0]
    return pairs, Family(first.small, first.large, members[0], members[1:])


@styled
def draw_figure(pairs, family: Family | None, architecture: str, site=None):
    fig, (left, right) = new_figure(ncols=2, height_in=3.6)
    bins = np.linspace(0, 1, 41)
    for pair in pairs:
        alive = pair.summary()
        left.hist(pair.matched_cos.numpy(), bins=bins, histtype="step", density=True, linewidth=1.4,
                  label=f"{pair.small} → {pair.large}: MMCS {pair.mmcs:.3f} ({alive['alive_small']} → "
                        f"{alive['alive_large']} alive)")
    left.set_xlabel("best decoder cosine in the next size")
    left.set_ylabel("density")
    left.set_title(f"{architecture}: best match in the next size"
                   + (f"\n{site_title(site)}" if site is not None else ""))
    left.set_ylim(0, left.get_ylim()[1] * 1.4)  # room for the legend above the bars
    left.legend(frameon=False, loc="upper right", fontsize=7.5)
    right.axis("off")
    if family is not None:
        rows = [f"d_sae {family.small}  parent  {family.parent.text(' ' * 23)}",
                f"d_sae {family.large}  children (cosine):"]
        rows += [f"   {m.cos:.2f}  {m.text(' ' * 9)}" for m in family.children[:10]]
        if len(family.children) > 10:
            rows.append(f"   … {len(family.children) - 10} more")
        right.set_title(f"latent {family.parent.latent} and its children")
        right.text(0.0, 1.0, "\n".join(rows), va="top", ha="left", family="monospace", fontsize=7.2,
                   transform=right.transAxes)
    return fig


SAME_INDEX_NOTE = 0.2  # above this share of same-index matches, the figure carries a note


def same_index_fraction(pair) -> float:
    """Share of small latents whose best large match has the same index: a dictionary's initial
    decoder rows are drawn from its seed alone (`Dictionary.reset_parameters`), so two widths of
    one seed start with the same first rows, and a short run keeps them close."""
    import torch

    index = torch.arange(pair.large)
    hits = (pair.parent == index) & (index < pair.small)  # large latent j's best small match is j
    return float(hits.sum()) / pair.small


def draw(lines: list[dict], out_dir: Path, notes: list[str], site=None) -> list[Drawn]:
    """The splitting figure of the results' size ladder; [] when no architecture has two widths."""
    ladder = ladder_lines(lines)
    if ladder is None:
        return []
    architecture, by_size = ladder
    try:
        pairs, family = find_family(by_size)
    except Exception as error:  # an export moved or unreadable: a note, not a failed report
        notes.append(f"splitting figure skipped: {str(error).splitlines()[0]}")
        return []
    shared = same_index_fraction(pairs[0])
    if shared > SAME_INDEX_NOTE:
        notes.append(f"splitting: {shared:.0%} of the d_sae {pairs[0].small} latents match the latent of the same "
                     f"index at d_sae {pairs[0].large}: widths trained from one seed share their first initial "
                     "decoder rows, so short runs match by initialisation, not by splitting; train longer or give "
                     "each width its own seed")
    fig = draw_figure(pairs, family, architecture, site)
    stem = f"splitting{site_suffix(site)}"
    widths = " → ".join(str(p.small) for p in pairs) + f" → {pairs[-1].large}"
    caption = (f"Feature splitting of {architecture} across d_sae {widths}: each alive small latent's best decoder "
               f"cosine among the next size's alive latents (alive: fired on the activation file's first "
               f"{LABEL_ROWS:,} rows), and latent {family.parent.latent} of d_sae {family.small} with its "
               f"{len(family.children)} children at cosine ≥ {MIN_COS}.")
    return [Drawn(stem, caption, tuple(save(fig, out_dir, stem)), site)]


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
